"""StreamingLLM (attention sinks): the first `sinks` tokens plus a recent window.

Runs on the shared engine: the recent window is the local region, so it holds between
`window` and `window + block_size` tokens (evicted a block at a time in decode).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import selection as sel
from ..engine.plan import TokenPlan
from .base import Method, local_geometry, sink_mask


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

    def plan(self, layer_idx, q, k, key_start, scaling, *, backend="auto", padded=True) -> TokenPlan | None:
        B, KV, L, _ = k.shape
        geo = local_geometry(L, self.block_size, self.window)
        if geo is None:
            return None
        _, local_start = geo
        sinks = sink_mask(local_start, key_start, self.sinks)
        kept_idx, kept_len = sel.pack_mask(sinks[:, None, :].expand(B, KV, local_start))
        return TokenPlan(kept_idx, kept_len, local_start, self.window, self.block_size, key_start,
                         self.decode_keep(layer_idx, KV))
