"""Plug a method into a transformers model: attention + mask registration, the cache, hooks.

Only public extension points are used: `AttentionInterface.register` (with the SDPA mask
function under the same name), `model.set_attn_implementation`, the `Cache` classes, and
removable forward pre-hooks that tell the attention function which cache the call uses.
Everything is undone by `Session.disable()` (or leaving the `with` block).
"""
from __future__ import annotations

import warnings
import weakref
from typing import Any, Callable

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..cache import TCACache, TCALayer
from ..engine import dispatch
from ..methods.base import Method
from .architectures import attention_modules, check_supported, layer_kinds, text_config

ATTN_NAME = "tca"
_SESSIONS: "weakref.WeakKeyDictionary[nn.Module, Session]" = weakref.WeakKeyDictionary()
# observer(layer_idx, q, k, v, scaling) is called on full layers during an observed dense forward
Observer = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float], None]


def _register() -> None:
    AttentionInterface.register(ATTN_NAME, tca_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def tca_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The registered attention function: routes each call to the session owning the module."""
    session = _SESSIONS.get(module)
    if session is None:
        raise RuntimeError(
            f"attn_implementation={ATTN_NAME!r} is set but no tca_attention session owns this model; "
            "use `with tca_attention.enable(model, method):`"
        )
    return session.attend(module, query, key, value, attention_mask, dropout, scaling, kwargs)


def key_start_from_mask(mask: torch.Tensor | None, batch: int, seq_len: int, device) -> torch.Tensor:
    """(B,) count of leading padding keys, read off the last query's row of a prefill mask."""
    if mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    row = mask[:, 0, -1, -seq_len:] if mask.dim() == 4 else mask[:, -seq_len:]
    valid = row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2
    if valid.shape[0] != batch:
        valid = valid.expand(batch, -1)
    key_start = (~valid).long().cumprod(-1).sum(-1)
    holes = (~valid) & (torch.arange(seq_len, device=device)[None, :] >= key_start[:, None])
    if bool(holes.any()):
        raise ValueError("TCA supports left padding only (pass padding_side='left' to the tokenizer)")
    return key_start


class Session:
    """One model running one method. Build caches with new_cache(); close with disable()."""

    def __init__(self, model: nn.Module, method: Method | None, backend: dispatch.Backend = "auto",
                 observer: Observer | None = None) -> None:
        self.arch = check_supported(model)
        dispatch.check_name(backend)
        if method is not None:
            method.check_model(model)
        self.model, self.method, self.backend, self.observer = model, method, backend, observer
        self.kinds = layer_kinds(model)
        self.max_positions = getattr(text_config(model), "max_position_embeddings", None)
        self.last_prefill: dict[int, dict[str, Any]] = {}  # layer -> retained / kept fraction
        self._caches: "weakref.WeakKeyDictionary[nn.Module, Cache | None]" = weakref.WeakKeyDictionary()
        self._hooks: list = []
        self._prev_impl: str | None = None
        self._active = False

    # -- lifecycle --------------------------------------------------------------------------
    def enable(self) -> "Session":
        if self._active:
            return self
        _register()
        modules = attention_modules(self.model)
        for m in modules:
            if m in _SESSIONS:
                raise RuntimeError("this model already has an active tca_attention session")
        self._prev_impl = self.model.config._attn_implementation
        self.model.set_attn_implementation(ATTN_NAME)
        for m in modules:
            _SESSIONS[m] = self
            self._hooks.append(m.register_forward_pre_hook(self._remember_cache, with_kwargs=True))
        self._active = True
        return self

    def disable(self) -> None:
        if not self._active:
            return
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for m in attention_modules(self.model):
            _SESSIONS.pop(m, None)
        self.model.set_attn_implementation(self._prev_impl or "sdpa")
        self._active = False

    def __enter__(self) -> "Session":
        return self.enable()

    def __exit__(self, *exc) -> None:
        self.disable()

    def _remember_cache(self, module, args, kwargs):
        self._caches[module] = kwargs.get("past_key_values")

    # -- caches -------------------------------------------------------------------------------
    def new_cache(self) -> Cache:
        """The cache to pass to generate()/forward as past_key_values."""
        cfg = text_config(self.model)
        if self.method is None:
            return DynamicCache(config=self.model.config)
        return TCACache(self.kinds, self.method.block_size, self.method.window,
                        getattr(cfg, "sliding_window", None), self.backend)

    # -- the attention call -----------------------------------------------------------------
    def attend(self, module, q, k, v, mask, dropout, scaling, kwargs):
        idx = module.layer_idx
        scaling = module.scaling if scaling is None else scaling
        if self.kinds[idx] == "sliding" or self.method is None or self.observer is not None:
            if self.observer is not None and self.kinds[idx] == "full":
                self.observer(idx, q, k, v, scaling)
            return sdpa_attention_forward(module, q, k, v, mask, dropout=dropout, scaling=scaling, **kwargs)
        if self.max_positions and q.shape[2] > self.max_positions and idx == self.kinds.index("full"):
            warnings.warn(f"prompt of {q.shape[2]} tokens is beyond the model's trained length "
                          f"({self.max_positions})", stacklevel=2)
        cache = self._caches.get(module)
        layer = cache.layers[idx] if cache is not None else None
        if cache is not None and not isinstance(layer, TCALayer):
            raise TypeError(
                f"TCA needs its own cache: pass past_key_values=session.new_cache() (got {type(cache).__name__})"
            )
        if layer is not None and layer.pending is None:
            if layer.device != q.device:
                raise RuntimeError(f"cache on {layer.device} but queries on {q.device}")
            return layer.attend(q, scaling), None
        return self._prefill(idx, module, q, k, v, mask, dropout, scaling, kwargs, layer)

    def _prefill(self, idx, module, q, k, v, mask, dropout, scaling, kwargs, layer: TCALayer | None):
        B, _, L, _ = q.shape
        if L == 0:
            raise ValueError("empty prompt")
        key_start = key_start_from_mask(mask, B, L, q.device)
        plan = self.method.plan(idx, q, k, key_start, scaling, backend=self.backend, padded=mask is not None)
        if plan is None:
            out, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=dropout, scaling=scaling, **kwargs)
            self.last_prefill[idx] = {"kept_fraction": None, "retained": None}
        else:
            out = dispatch.sparse_prefill(q, k, v, plan, scaling, backend=self.backend)
            # tensors, read on demand by prefill_report(): no host sync on the prefill path
            self.last_prefill[idx] = {"kept_fraction": plan.kept_fraction(L), "retained": plan.retained}
        if layer is not None:
            keep = plan.decode_keep if plan is not None else self.method.decode_keep(idx, k.shape[1])
            layer.commit_prefill(plan, key_start, keep)
        return out, None

    def prefill_report(self) -> dict[str, float | None]:
        """Mean over layers and heads of the last prefill's kept fraction and of the last query's
        retained attention mass (dense layers count as 1), and the smallest retained mass."""
        rows = list(self.last_prefill.values())
        if not rows:
            return {"kept_fraction": None, "retained": None, "retained_min": None}
        kept = [1.0 if r["kept_fraction"] is None else float(r["kept_fraction"].mean()) for r in rows]
        # dense layers retain everything; sparse plans of methods that do not score (None) are left out
        ret = [torch.ones(1) if r["kept_fraction"] is None else r["retained"] for r in rows]
        ret = [t for t in ret if t is not None]
        return {
            "kept_fraction": sum(kept) / len(kept),
            "retained": sum(float(t.mean()) for t in ret) / len(ret) if ret else None,
            "retained_min": min(float(t.min()) for t in ret) if ret else None,
        }


def enable(model: nn.Module, method: Method | None, backend: dispatch.Backend = "auto") -> Session:
    """Run `model` with `method` until disable() or the end of the `with` block.

    method=None is plain attention (a session whose new_cache() is a DynamicCache).
    """
    return Session(model, method, backend).enable()
