"""The one table of supported architectures, and how to find their attention layers."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Architecture:
    model_type: str
    family: str
    note: str = ""


SUPPORTED: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        Architecture("llama", "Llama", "Llama 2/3/3.1, SmolLM2"),
        Architecture("qwen2", "Qwen2", "Qwen2, Qwen2.5, Qwen2.5-Coder"),
        Architecture("mistral", "Mistral", "TCA on every layer when sliding_window is None (v0.2+); else untouched"),
        Architecture("gemma3_text", "Gemma3", "sliding-window layers untouched; TCA on global layers"),
    )
}


class UnsupportedModelError(ValueError):
    pass


def text_config(model: nn.Module):
    cfg = model.config
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def check_supported(model: nn.Module) -> Architecture:
    mt = getattr(text_config(model), "model_type", None)
    if mt not in SUPPORTED:
        names = ", ".join(f"{a.family} ({a.model_type})" for a in SUPPORTED.values())
        raise UnsupportedModelError(f"architecture {mt!r} is not supported by tca-attention; supported: {names}")
    return SUPPORTED[mt]


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Self-attention modules ordered by layer_idx (those with q/k/v projections and a layer_idx)."""
    mods = [
        m
        for m in model.modules()
        if hasattr(m, "layer_idx") and hasattr(m, "k_proj") and hasattr(m, "q_proj") and hasattr(m, "v_proj")
    ]
    mods.sort(key=lambda m: m.layer_idx)
    if not mods:
        raise UnsupportedModelError("no attention modules with q_proj/k_proj/v_proj and layer_idx were found")
    return mods


def layer_kinds(model: nn.Module) -> list[str]:
    """'full' (TCA applies) or 'sliding' (left to SDPA and a sliding-window cache) per layer."""
    cfg = text_config(model)
    n = cfg.num_hidden_layers
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * n
    if cfg.model_type == "mistral":
        return ["sliding" if getattr(cfg, "sliding_window", None) else "full"] * n
    return ["sliding" if t == "sliding_attention" else "full" for t in types]
