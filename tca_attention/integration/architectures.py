"""Which models can run a method, how to find their attention layers, and what kind each layer is.

Any decoder whose self-attention goes through transformers' attention interface (the standard
`fn(module, query, key, value, attention_mask, ...)` signature) is supported. `TESTED` lists the
families the test suite runs on tiny random configs (full budget equals dense, prefill and decode,
padded batches); anything that cannot work is refused with the reason.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from ..introspect import _LAYER_KINDS, UnsupportedModelError, attention_modules, key_projection_weight, layer_kinds, text_config  # noqa: F401

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Architecture:
    model_type: str
    family: str
    note: str = ""


TESTED: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        Architecture("llama", "Llama", "Llama 2/3/3.1, SmolLM2"),
        Architecture("qwen2", "Qwen2", "Qwen2, Qwen2.5, Qwen2.5-Coder"),
        Architecture("qwen3", "Qwen3", "q/k norms; sliding layers (if any) untouched"),
        Architecture("mistral", "Mistral", "every layer when sliding_window is None (v0.2+); else untouched"),
        Architecture("gemma2", "Gemma2", "global layers only; models with attention logit softcapping are refused"),
        Architecture("gemma3_text", "Gemma3", "sliding-window layers untouched; the global layers"),
        Architecture("phi3", "Phi-3", "fused qkv projection; every layer when sliding_window is None"),
        Architecture("olmo2", "OLMo2", "q/k norms over all heads"),
    )
}
SUPPORTED = TESTED  # kept name: the table the README shows

def check_supported(model: nn.Module) -> Architecture:
    """The model's entry in TESTED, or a generic entry; UnsupportedModelError naming why not."""
    cfg = text_config(model)
    mt = getattr(cfg, "model_type", None)
    tested = ", ".join(f"{a.family} ({a.model_type})" for a in TESTED.values())
    why = _why_unsupported(model, cfg)
    if why:
        raise UnsupportedModelError(f"{type(model).__name__} ({mt!r}) cannot run tca-attention: {why}. "
                                    f"Tested families: {tested}")
    if mt not in TESTED:
        log.warning("%s is not in tca-attention's tested table (%s); every forward is still checked", mt, tested)
        return Architecture(str(mt), str(mt), "untested")
    return TESTED[mt]


def _why_unsupported(model: nn.Module, cfg) -> str | None:
    if getattr(cfg, "is_encoder_decoder", False):
        return "encoder-decoder models are not supported (decoder-only causal LMs are)"
    if not getattr(model, "_supports_attention_backend", False):
        return "its attention does not go through transformers' attention interface"
    try:
        mods = attention_modules(model)
    except UnsupportedModelError as e:
        return str(e)
    if not all(getattr(m, "is_causal", True) for m in mods):
        return "bidirectional attention is not supported (causal attention is)"
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        return ("attention logit softcapping is not implemented by the sparse executors "
                "(a Gemma2 config with attn_logit_softcapping=None runs)")
    types = getattr(cfg, "layer_types", None) or []
    other = sorted({t for t in types if t not in _LAYER_KINDS})
    if other:
        return f"layer types {other} are not supported (only {sorted(_LAYER_KINDS)})"
    return None
