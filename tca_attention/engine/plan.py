"""What the executors take besides q/k/v and the scaling, one definition per operation.

TokenPlan: what each head keeps after prefill (produced by method policies; sparse_prefill, the cache).
RaggedCacheView: the ragged cache as decode queries see it (built by the cache; ragged_decode).
DecodeSelection: the tail pages each (row, KV head) attends to at one decode step (ragged_decode).
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


@dataclass(frozen=True)
class DecodeSelection:
    """Which pages of a RaggedCacheView's tail each (row, KV head) attends to at one decode step.

    Page p of the tail is slots [p * page_size, (p + 1) * page_size) (the last page may be partial:
    slots past T do not exist); page_size is a power of two >= 1 (1 = token-level selection).
    pages (B, KV, P) int32: for (row b, KV head h) the listed page ids, valid ones (0 <= id <
    cdiv(T, page_size)) first, strictly ascending (sorted and unique), then -1 entries (unused).
    With a selection, the queries of (b, h) attend to its whole global part plus only the tail slots
    of its listed pages, each slot still visible iff 0 <= pos <= q_pos. No selection (None) is
    the whole tail, as is `all_pages`.
    """

    page_size: int
    pages: torch.Tensor  # (B, KV, P) int32

    @staticmethod
    def all_pages(view: RaggedCacheView, page_size: int = 1) -> DecodeSelection:
        """Every page of the view's tail listed for every (row, KV head): the same as no selection."""
        B, KV, T = view.t_keys.shape[:3]
        n = -(-T // page_size)
        pages = torch.arange(n, dtype=torch.int32, device=view.t_keys.device).expand(B, KV, n).contiguous()
        return DecodeSelection(page_size, pages)

    def validate(self, view: RaggedCacheView) -> None:
        """Raise ValueError unless this selection is well formed for view (syncs: tests, reference)."""
        ps, p = self.page_size, self.pages
        if not isinstance(ps, int) or ps < 1 or ps & (ps - 1):
            raise ValueError(f"page_size must be a power of two >= 1, got {ps!r}")
        B, KV, T = view.t_keys.shape[:3]
        if p.dim() != 3 or tuple(p.shape[:2]) != (B, KV):
            raise ValueError(f"pages must be (B, KV, P) = ({B}, {KV}, P), got {tuple(p.shape)}")
        if p.dtype != torch.int32:
            raise ValueError(f"pages must be int32, got {p.dtype}")
        if p.device != view.t_keys.device:
            raise ValueError(f"pages are on {p.device}, the tail on {view.t_keys.device}")
        n = -(-T // ps)
        if p.numel() and (int(p.min()) < -1 or int(p.max()) >= n):
            raise ValueError(f"page ids must lie in [0, {n}) (cdiv(T={T}, page_size={ps})) or be -1")
        valid = p >= 0
        if (valid[..., 1:] & ~valid[..., :-1]).any():
            raise ValueError("-1 (unused) entries must come after every valid page id")
        if ((p[..., 1:] <= p[..., :-1]) & valid[..., 1:]).any():
            raise ValueError("valid page ids must be strictly ascending (sorted, unique)")

    def tail_mask(self, T: int) -> torch.Tensor:
        """(B, KV, T) bool: the tail slots of the listed pages."""
        B, KV, _ = self.pages.shape
        slots = self.pages.long()[..., None] * self.page_size + torch.arange(self.page_size, device=self.pages.device)
        slots = torch.where((self.pages[..., None] >= 0) & (slots < T), slots, T).view(B, KV, -1)  # T: a dump slot
        mask = torch.zeros(B, KV, T + 1, dtype=torch.bool, device=self.pages.device)
        return mask.scatter_(2, slots, True)[..., :T]
