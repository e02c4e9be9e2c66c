"""What the executors take besides q/k/v and the scaling, one definition per operation.

TokenPlan: what each head keeps after prefill (produced by method policies; sparse_prefill, the cache).
RaggedCacheView: the ragged cache as decode queries see it (built by the cache; ragged_decode).
Frozen dataclasses of tensor references: building one copies and synchronises nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenPlan:
    """What each KV head keeps after prefill, and what each query attends to.

    Geometry, per batch row r (blocks are counted from the row's first real token, so a prompt's
    plan does not depend on its left padding): keys before key_start[r] are padding and never
    attended; keys [key_start[r], ls_r) are the row's global region, of which each KV head keeps
    kept_idx[r, h, :kept_len[r, h]] (absolute positions, ascending); keys [ls_r, L) are its local
    region, always kept. ls_r = row_local_start[r], or local_start for every row when
    row_local_start is None (a batch without padding). Query j attends to every key k <= j that is
    kept or lies in its causal window (j - window, j] (see band_start).
    local_start: the host-known local start of a row without padding (n_max * block_size, or 0
    when such a row stays dense); exact for every row when row_local_start is None.
    decode_keep[h]: tokens a KV head keeps when decode compresses one block of block_size.
    """

    kept_idx: torch.Tensor  # (B, KV, M) int64, entries past kept_len are padding (>= every kept index)
    kept_len: torch.Tensor  # (B, KV) int32
    local_start: int
    window: int
    block_size: int
    key_start: torch.Tensor  # (B,) int64
    decode_keep: torch.Tensor  # (KV,) int64
    retained: torch.Tensor | None = None  # (B, KV) last query's attention mass on what is kept
    kept_total: int | None = None  # kept_len.sum() when known on the host without a sync, else None
    row_local_start: torch.Tensor | None = None  # (B,) int64 per-row local starts (padded batches)

    def local_starts(self) -> torch.Tensor:
        """(B,) int64 local start of each row, on the plan's device."""
        if self.row_local_start is not None:
            return self.row_local_start
        return torch.full_like(self.key_start, self.local_start)

    def kept_fraction(self, seq_len: int) -> torch.Tensor:
        """Fraction of the (valid) prompt each (B, KV) head keeps after prefill. -> (B, KV)."""
        valid = (seq_len - self.key_start).clamp_min(1).to(torch.float64)[:, None]
        local = (seq_len - torch.maximum(self.key_start, self.local_starts())).to(torch.float64)[:, None]
        return (self.kept_len.to(torch.float64) + local) / valid


def band_start(j: torch.Tensor, window: int, local_start: int | torch.Tensor) -> torch.Tensor:
    """First key of query j's dense band: its window, extended to the local region's start.

    local_start: an int, or a tensor broadcastable against j (e.g. (B, 1) per-row starts with j
    (1, L) or (L,)), giving per-row bands."""
    lo = j - window + 1
    ls = torch.as_tensor(local_start, device=j.device)
    return torch.where(j >= ls, torch.minimum(lo, ls), lo)


def rows_blocks(n_blocks: int | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """(B,) int64 block count of each row from an int (every row) or a (B,) tensor."""
    if isinstance(n_blocks, int):
        return torch.full((batch,), n_blocks, dtype=torch.long, device=device)
    return n_blocks.to(device=device, dtype=torch.long)


@dataclass(frozen=True)
class RaggedCacheView:
    """The ragged cache as a step's queries see it: a global part packed over heads plus a dense tail.

    Keys of (row b, KV head h): the segment g_offsets[b*KV+h : b*KV+h+2] of g_keys/g_values (N, D)
    with positions g_pos (N,), then the tail t_keys/t_values[b, h] ((B, KV, T, D)) with positions
    t_pos[b] ((B, T), -1 = invalid slot). q_pos (B, Q): the queries' positions. A key is visible
    to a query iff 0 <= pos <= q_pos.
    """

    q_pos: torch.Tensor
    g_keys: torch.Tensor
    g_values: torch.Tensor
    g_pos: torch.Tensor
    g_offsets: torch.Tensor  # (B*KV + 1,)
    t_keys: torch.Tensor
    t_values: torch.Tensor
    t_pos: torch.Tensor


def pack_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending indices of True entries, padded: (..., N) bool -> idx (..., M) int64, len (...) int32.

    Padding entries hold N (one past the end) so they sort last and are easy to spot.
    """
    N = mask.shape[-1]
    lengths = mask.sum(-1)
    M = int(lengths.max()) if mask.numel() else 0
    ar = torch.arange(N, device=mask.device)
    key = torch.where(mask, ar, ar + N)
    idx = torch.sort(key, dim=-1).values[..., :M]
    idx = torch.where(idx >= N, torch.full_like(idx, N), idx)
    return idx, lengths.to(torch.int32)
