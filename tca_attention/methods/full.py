"""Full attention through the sparse engine: every token kept (the equality baseline)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import selection as sel
from ..engine.plan import TokenPlan
from .base import Method, key_validity, local_geometry


@dataclass(frozen=True)
class FullBudget(Method):
    """Sparse path with nothing dropped: must equal dense attention (used by the tests)."""

    window: int = 64
    block_size: int = 16
    name: str = "full-budget"

    def decode_keep(self, layer_idx: int, num_kv_heads: int) -> torch.Tensor:
        return torch.full((num_kv_heads,), self.block_size, dtype=torch.long)

    def plan(self, layer_idx, q, k, key_start, scaling, *, backend="auto", padded=True) -> TokenPlan | None:
        B, KV, L, _ = k.shape
        geo = local_geometry(L, self.block_size, self.window)
        if geo is None:
            return None
        _, local_start = geo
        mask = key_validity(local_start, key_start)[:, None, :].expand(B, KV, local_start)
        kept_idx, kept_len = sel.pack_mask(mask)
        return TokenPlan(kept_idx, kept_len, local_start, self.window, self.block_size, key_start,
                         self.decode_keep(layer_idx, KV))
