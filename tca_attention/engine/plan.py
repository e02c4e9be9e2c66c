"""Plan kinds produced by method policies and consumed by the executors and the cache."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenPlan:
    """What each KV head keeps after prefill, and what each query attends to.

    Geometry: keys [0, local_start) are the global region, of which each (batch, KV head) keeps
    kept_idx[b, h, :kept_len[b, h]] (ascending); keys [local_start, L) are the local region,
    always kept. Query j attends to every key k <= j that is kept or lies in its causal window
    (j - window, j]. Keys before key_start[b] are padding and never attended.
    decode_keep[h]: tokens a KV head keeps when decode compresses one block of block_size.
    """

    kept_idx: torch.Tensor  # (B, KV, M) int64, padded with local_start
    kept_len: torch.Tensor  # (B, KV) int32
    local_start: int
    window: int
    block_size: int
    key_start: torch.Tensor  # (B,) int64
    decode_keep: torch.Tensor  # (KV,) int64
    retained: torch.Tensor | None = None  # (B, KV) last query's attention mass on what is kept
    kept_total: int | None = None  # kept_len.sum() when known on the host without a sync, else None

    def kept_fraction(self, seq_len: int) -> torch.Tensor:
        """Fraction of the (valid) prompt each (B, KV) head keeps after prefill. -> (B, KV)."""
        valid = (seq_len - self.key_start).clamp_min(1).to(torch.float64)[:, None]
        local = (seq_len - torch.clamp(self.key_start, min=self.local_start)).to(torch.float64)[:, None]
        return (self.kept_len.to(torch.float64) + local) / valid


def band_start(j: torch.Tensor, window: int, local_start: int) -> torch.Tensor:
    """First key of query j's dense band: its window, extended to the local region's start."""
    lo = j - window + 1
    return torch.where(j >= local_start, torch.minimum(lo, torch.full_like(lo, local_start)), lo)
