"""Full attention through the sparse engine: every token kept (the equality baseline)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.plan import TokenPlan, pack_mask
from .base import Method, global_region, local_geometry, row_geometry


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
        if geo is None:  # even a row without padding stays dense
            return None
        _, local_start = geo
        _, row_ls = row_geometry(L, key_start, self.block_size, self.window) if padded else (None, None)
        ls = row_ls if row_ls is not None else torch.full_like(key_start, local_start)
        mask = global_region(L, key_start, ls)[:, None, :].expand(B, KV, L)  # each row's [key_start, ls)
        kept_idx, kept_len = pack_mask(mask, max_len=local_start)  # the unpadded row's [0, local_start): no sync
        return TokenPlan(kept_idx, kept_len, local_start, self.window, self.block_size, key_start,
                         self.decode_keep(layer_idx, KV), row_local_start=row_ls)
