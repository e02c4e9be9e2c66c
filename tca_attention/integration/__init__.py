"""transformers integration through its public extension points."""
from .hf import Session, enable

__all__ = ["Session", "enable"]
