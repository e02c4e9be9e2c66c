"""What a transformers decoder looks like from the outside: its text config, its attention modules
in layer order, the kind of each layer, the weight that makes its keys. Plain module introspection
(no transformers import), shared by methods (model identity, calibration) and the integration."""
from __future__ import annotations

from torch import nn

_LAYER_KINDS = {"full_attention": "full", "sliding_attention": "sliding"}


class UnsupportedModelError(ValueError):
    """A model tca-attention cannot run, with the reason."""


def text_config(model: nn.Module):
    cfg = model.config
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Self-attention modules ordered by layer_idx (decoder layers' `self_attn` with a layer_idx)."""
    mods = [m for name, m in model.named_modules()
            if name.rsplit(".", 1)[-1] == "self_attn" and isinstance(getattr(m, "layer_idx", None), int)]
    mods.sort(key=lambda m: m.layer_idx)
    if not mods:
        raise UnsupportedModelError(
            f"{type(model).__name__}: no decoder self-attention modules (`self_attn` with a layer_idx) were found")
    return mods


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList holding the decoder layers (the parents of the attention modules, in order)."""
    attn = {id(m) for m in attention_modules(model)}
    for m in model.modules():
        if (isinstance(m, nn.ModuleList) and len(m) == len(attn)
                and all(any(id(c) in attn for c in layer.children()) for layer in m)):
            return m
    raise UnsupportedModelError(
        f"{type(model).__name__}: no ModuleList of decoder layers holding the attention modules")


def key_projection_weight(module: nn.Module):
    """The weight that produces the keys (k_proj, or the fused qkv_proj)."""
    for name in ("k_proj", "qkv_proj", "query_key_value"):
        if hasattr(module, name):
            return getattr(module, name).weight
    return next(module.parameters())


def layer_kinds(model: nn.Module) -> list[str]:
    """'full' (the method applies) or 'sliding' (left to SDPA and a sliding-window cache) per layer.

    From `layer_types` where the config has them; otherwise every layer is sliding when the config
    sets a `sliding_window` (Mistral v0.1, windowed Phi-3), else full.
    """
    cfg = text_config(model)
    types = getattr(cfg, "layer_types", None)
    if types:
        return [_LAYER_KINDS[t] for t in types]
    return ["sliding" if getattr(cfg, "sliding_window", None) else "full"] * cfg.num_hidden_layers
