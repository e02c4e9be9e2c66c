"""One decode token into a static ring buffer, in PyTorch: the reference of triton_ring_append.

Used by the static caches' decode steps (static_cache.py): StaticRaggedLayer's tail ring and
StaticWindowLayer's sliding-window ring. The token's k/v (B, KV, 1, D) go to slot
(counter - t_pos0) mod T of t_keys/t_values (B, KV, T, D); with t_pos (B, T) its position (the
counter) goes to t_pos[:, slot] for every row; with q_pos (1,) q_pos <- counter (the position the
step's query attends from); then counter += 1. The counter is a one-element int64 device tensor:
nothing syncs with the host, and a CUDA graph can replay it.
"""
from __future__ import annotations

import torch


def ring_append_ref(t_keys: torch.Tensor, t_values: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    counter: torch.Tensor, t_pos0: int = 0, t_pos: torch.Tensor | None = None,
                    q_pos: torch.Tensor | None = None) -> None:
    B = k.shape[0]
    slot = torch.remainder(counter.view(1) - t_pos0, t_keys.shape[2])  # (1,)
    t_keys.index_copy_(2, slot, k)
    t_values.index_copy_(2, slot, v)
    if t_pos is not None:
        t_pos.index_copy_(1, slot, counter.view(1, 1).expand(B, 1))
    if q_pos is not None:
        q_pos.copy_(counter.view(1))
    counter.add_(1)


def check(t_keys: torch.Tensor, t_values: torch.Tensor, k: torch.Tensor, v: torch.Tensor, counter: torch.Tensor,
          t_pos: torch.Tensor | None, q_pos: torch.Tensor | None) -> None:
    """Shapes and dtypes both backends need (a wrong one would write the wrong slots silently)."""
    B, KV, T, D = t_keys.shape
    if t_values.shape != t_keys.shape or tuple(k.shape) != (B, KV, 1, D) or v.shape != k.shape:
        raise ValueError(f"ring_append: k/v {tuple(k.shape)}/{tuple(v.shape)} must be (B, KV, 1, D) of the ring "
                         f"{tuple(t_keys.shape)} (values {tuple(t_values.shape)})")
    if t_pos is not None and (tuple(t_pos.shape) != (B, T) or t_pos.dtype != torch.long):
        raise ValueError(f"ring_append: t_pos must be int64 (B, T) = {(B, T)}, got {t_pos.dtype} {tuple(t_pos.shape)}")
    for name, x in (("counter", counter), ("q_pos", q_pos)):
        if x is not None and (x.numel() != 1 or x.dtype != torch.long):
            raise ValueError(f"ring_append: {name} must be one int64, got {x.dtype} {tuple(x.shape)}")
