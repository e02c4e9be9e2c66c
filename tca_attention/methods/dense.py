"""Full attention as a method: SDPA at prefill and decode, a plain DynamicCache (the reference)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Method


@dataclass(frozen=True)
class Dense(Method):
    """Plain attention: what every method is compared with. Plans nothing, keeps everything."""

    name: str = "full"
    block_size: int = 1
    window: int = 1
    is_dense: bool = True

    def plan(self, layer_idx, q, k, key_start, scaling, *, backend="auto", padded=True) -> None:
        return None

    def decode_keep(self, layer_idx: int, num_kv_heads: int) -> torch.Tensor:
        return torch.full((num_kv_heads,), self.block_size, dtype=torch.long)
