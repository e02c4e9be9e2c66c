"""tca-attention: training-free context-adaptive sparse attention (TCA-Attention) and its peers
for HuggingFace transformers causal LMs.

    import tca_attention as tca
    model, tok = tca.load_model("smollm2")                    # packaged model, .gguf or HF dir
    budgets = tca.load_or_calibrate(model, tok, "smollm2", tca.PRESETS["small-context"])
    with tca.enable(model, tca.TCA(budgets)) as session:     # reversible
        out = session.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=32)
    print(tok.decode(out[0, -32:]), session.cache.kv_bytes(), session.prefill_report())

Names are imported on first use, so `import tca_attention` (and `tca --help`) stays light.
"""
from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "enable": "integration.hf",
    "Session": "integration.hf",
    "CacheNotUsedError": "integration.hf",
    "AdapterError": "integration.adapter",
    "UnsupportedModelError": "integration.architectures",
    "load_model": "models",
    "calibrate": "calibration",
    "load_or_calibrate": "calibration_cache",
    "Budgets": "budgets",
    "BudgetError": "budgets",
    "TCAConfig": "config",
    "PRESETS": "config",
    "TCA": "methods.tca",
    "StreamingLLM": "methods.streaming",
    "FullBudget": "methods.full",
    "Method": "methods.base",
    "create": "methods.registry",
    "TCACache": "cache",
    "run_prompt": "generation",
}
__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tca_attention' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # for type checkers and IDEs only; nothing is imported at run time
    from .budgets import BudgetError, Budgets
    from .cache import TCACache
    from .calibration import calibrate
    from .calibration_cache import load_or_calibrate
    from .config import PRESETS, TCAConfig
    from .generation import run_prompt
    from .integration.adapter import AdapterError
    from .integration.architectures import UnsupportedModelError
    from .integration.hf import CacheNotUsedError, Session, enable
    from .methods.base import Method
    from .methods.full import FullBudget
    from .methods.registry import create
    from .methods.streaming import StreamingLLM
    from .methods.tca import TCA
    from .models import load_model
