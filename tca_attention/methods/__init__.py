"""Sparse-attention policies on the shared engine."""
from .base import Method

__all__ = ["Method"]
