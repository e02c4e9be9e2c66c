"""StreamingLLM (attention sinks): the first `sinks` tokens plus a recent window.

Runs on the shared engine: the recent window is the local region, so it holds between
`window` and `window + block_size` tokens (evicted a block at a time in decode). In a left-padded
batch each row's sinks and window are its own (counted from its first real token).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

import torch

from ..engine.plan import TokenPlan, pack_mask
from .base import Method, global_region, local_geometry, row_geometry, sink_mask


@dataclass(frozen=True)
class StreamingLLM(Method):
    sinks: int = 4
    window: int = 512
    block_size: int = 128
    name: str = "streaming"

    def __post_init__(self) -> None:
        if self.sinks < 0 or self.window < 1 or self.block_size < 1:
            raise ValueError("StreamingLLM needs sinks >= 0, window >= 1, block_size >= 1")

    def decode_keep(self, layer_idx: int, num_kv_heads: int) -> torch.Tensor:
        return torch.zeros(num_kv_heads, dtype=torch.long)

    def kept_tokens(self, seq_len: int) -> int:
        """Tokens each head keeps after the prefill of an unpadded seq_len prompt: the sinks in
        the global region plus the local region (window + the part short of a whole block)."""
        geo = local_geometry(seq_len, self.block_size, self.window)
        if geo is None:
            return seq_len
        return min(self.sinks, geo[1]) + seq_len - geo[1]

    def plan(self, layer_idx, q, k, key_start, scaling, *, backend="auto", padded=True) -> TokenPlan | None:
        B, KV, L, _ = k.shape
        geo = local_geometry(L, self.block_size, self.window)
        if geo is None:  # even a row without padding stays dense
            return None
        _, local_start = geo
        _, row_ls = row_geometry(L, key_start, self.block_size, self.window) if padded else (None, None)
        ls = row_ls if row_ls is not None else torch.full_like(key_start, local_start)
        sinks = sink_mask(L, key_start, self.sinks) & global_region(L, key_start, ls)
        kept_idx, kept_len = pack_mask(sinks[:, None, :].expand(B, KV, L))
        return TokenPlan(kept_idx, kept_len, local_start, self.window, self.block_size, key_start,
                         self.decode_keep(layer_idx, KV), row_local_start=row_ls)


def window_for(kept_fraction: float, seq_len: int, params: Mapping[str, Any]) -> int:
    """The window keeping closest to kept_fraction of a seq_len prompt (the registry's density knob).

    Kept tokens never decrease with the window (steps of block_size), so a bisection finds the
    smallest window reaching the target; the one below it is the other candidate.
    """
    base = StreamingLLM(**params)
    target = kept_fraction * seq_len

    def kept(window: int) -> int:
        return replace(base, window=window).kept_tokens(seq_len)

    lo, hi = 1, max(1, seq_len)
    while lo < hi:
        mid = (lo + hi) // 2
        if kept(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    return min({lo, max(1, lo - 1)}, key=lambda w: (abs(kept(w) - target), w))
