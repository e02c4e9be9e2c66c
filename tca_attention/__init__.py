"""tca-attention: training-free context-adaptive sparse attention (TCA-Attention) and its peers
for HuggingFace transformers causal LMs.

    import tca_attention as tca
    model, tok = tca.load_model("smollm2")                    # packaged model, .gguf or HF dir
    method = tca.create(tca.DEFAULT_METHOD, model=model, tokenizer=tok)  # calibrates once, then cached
    with tca.enable(model, method) as session:               # reversible
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
    "UnsupportedModelError": "introspect",
    "load_model": "models",
    "calibrate": "integration.probe",
    "load_or_calibrate": "integration.probe",
    "Budgets": "methods.tca.budgets",
    "BudgetError": "methods.tca.budgets",
    "StateError": "methods.state",
    "TCAConfig": "methods.tca.config",
    "PRESETS": "methods.tca.config",
    "TCA": "methods.tca.method",
    "StreamingLLM": "methods.streaming",
    "FullBudget": "methods.full_budget",
    "Dense": "methods.dense",
    "Method": "methods.base",
    "create": "registry",
    "DEFAULT_METHOD": "registry",
    "PAPER_METHOD": "registry",
    "describe": "registry",
    "RaggedCache": "ragged_cache",
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
    from .generation import run_prompt
    from .integration.adapter import AdapterError
    from .integration.hf import CacheNotUsedError, Session, enable
    from .integration.probe import calibrate, load_or_calibrate
    from .introspect import UnsupportedModelError
    from .methods.base import Method
    from .methods.dense import Dense
    from .methods.full_budget import FullBudget
    from .methods.state import StateError
    from .methods.streaming import StreamingLLM
    from .methods.tca.budgets import BudgetError, Budgets
    from .methods.tca.config import PRESETS, TCAConfig
    from .methods.tca.method import TCA
    from .models import load_model
    from .ragged_cache import RaggedCache
    from .registry import create, describe
