"""What the executors take besides q/k/v and the scaling, one definition per operation.

TokenPlan: what each head keeps after prefill (produced by method policies; sparse_prefill, the cache).
SelectionSpec: TCA Phase 2's block geometry and keep counts for one layer (select_and_pack).
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
class SelectionSpec:
    """TCA Phase 2 for one layer: which blocks each row ranks and how many tokens each rank keeps.

    Row r's global blocks are [key_start[r] + j b, key_start[r] + (j + 1) b) for j < n_r, b =
    block_size (blocks count from the row's first real token, so a left-padded row selects exactly
    what it selects alone); n_blocks: n_r as an int (every row) or a (B,) tensor (<= n_max);
    keep_rank (KV, n_max) or (B, KV, n_max): the keep count of the block at each rank of the row's
    own block count (selection.keep_per_rank(p, n_r, b), or keep_per_rank_rows; ranks >= n_r are
    ignored); alpha, mass_norm ("sum" or "max"): Eq. 6's block score; max_kept: the width of
    kept_idx, >= every head's kept count (the Triton path needs it: no host sync; the reference
    uses the largest kept count when it is None).
    """

    key_start: torch.Tensor  # (B,) int64
    keep_rank: torch.Tensor
    n_blocks: int | torch.Tensor
    block_size: int
    alpha: float
    mass_norm: str
    max_kept: int | None = None

    @property
    def n_max(self) -> int:
        return self.keep_rank.shape[-1]

    def rows_blocks(self, batch: int, device: torch.device) -> torch.Tensor:
        """(B,) int64 global block count of each row."""
        return rows_blocks(self.n_blocks, batch, device)


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


def _cdiv(a: torch.Tensor | int, b: int) -> torch.Tensor | int:
    return -(-a // b)


@dataclass(frozen=True)
class BlockPlan:
    """Block-sparse prefill: which key blocks (and extra key columns) each query block attends to.

    Geometry, per batch row b (blocks count from the row's first real token, so a prompt's plan
    does not depend on its left padding): query block i covers positions
    [key_start[b] + i block_q, + block_q), key block j covers [key_start[b] + j block_k, + block_k),
    both clipped to L. Positions before key_start[b] are padding: never attended, zero output.
    For (b, head h, query block i) the listed key blocks are
    indices[b, h, indptr[b, h, i] : indptr[b, h, i + 1]] (ascending, unique); extra_cols[b, h, i]
    lists extra absolute key positions (-1 = unused slot). Query t of query block i sees key s iff
    key_start[b] <= s <= t and s lies in a listed key block of i or is one of i's extra columns (a
    key in both counts once). The diagonal block is listed explicitly if wanted; a query that sees
    no key outputs zeros. h ranges over Hp = H (a list per query head) or Hp = KV (a list per KV
    head, shared by its query heads). NQ = ceil((L - min(key_start)) / block_q).
    """

    block_q: int
    block_k: int
    key_start: torch.Tensor  # (B,) int64
    indptr: torch.Tensor  # (B, Hp, NQ + 1) int32
    indices: torch.Tensor  # (B, Hp, NNZ) int32, entries outside [indptr[.., 0], indptr[.., NQ]) unused
    extra_cols: torch.Tensor | None = None  # (B, Hp, NQ, C) int64 absolute positions, -1 = unused

    def __post_init__(self) -> None:
        for name in ("block_q", "block_k"):
            size = getattr(self, name)
            if not isinstance(size, int) or size < 16 or size & (size - 1):
                raise ValueError(f"BlockPlan.{name} must be a power of two >= 16, got {size!r}")

    @property
    def n_qblocks(self) -> int:
        return self.indptr.shape[-1] - 1

    @staticmethod
    def dense(B: int, Hp: int, L: int, key_start: torch.Tensor, block_q: int, block_k: int) -> BlockPlan:
        """The plan listing every causal key block of every query block (= dense causal attention).
        Syncs (NQ and NNZ are read from key_start)."""
        dev = key_start.device
        ks = key_start.to(torch.long)
        nq = int(_cdiv(L - int(ks.min()), block_q))
        i = torch.arange(nq, device=dev)
        last = torch.minimum(((i + 1) * block_q - 1) // block_k, _cdiv(L - ks, block_k)[:, None] - 1)  # (B, NQ)
        counts = torch.where(i[None, :] < _cdiv(L - ks, block_q)[:, None], last + 1, 0)  # rows' real query blocks
        indptr = torch.nn.functional.pad(counts.cumsum(-1), (1, 0))  # (B, NQ + 1)
        e = torch.arange(max(int(indptr[:, -1].max()), 1), device=dev).expand(B, -1).contiguous()  # (B, NNZ)
        blk = torch.searchsorted(indptr[:, 1:].contiguous(), e, right=True).clamp(max=nq - 1)  # entry's query block
        indices = torch.where(e < indptr[:, -1:], e - indptr.gather(1, blk), 0)  # (B, NNZ)
        return BlockPlan(
            block_q, block_k, ks,
            indptr.to(torch.int32)[:, None].expand(B, Hp, -1).contiguous(),
            indices.to(torch.int32)[:, None].expand(B, Hp, -1).contiguous(),
        )

    def _entry_blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Hp, NNZ) query block of each entry of indices, and whether the entry is listed."""
        e = torch.arange(self.indices.shape[-1], device=self.indices.device).expand_as(self.indices).contiguous()
        ptr = self.indptr.long()
        blk = torch.searchsorted(ptr[..., 1:].contiguous(), e, right=True).clamp(max=max(self.n_qblocks - 1, 0))
        return blk, (e >= ptr[..., :1]) & (e < ptr[..., -1:])

    def kept_fraction(self, seq_len: int) -> torch.Tensor:
        """Attended (query, key) pairs over causal pairs, real tokens only. -> (B, Hp) float64."""
        L, bq, bk = seq_len, self.block_q, self.block_k
        ks = self.key_start.long()[:, None, None]  # (B, 1, 1)
        blk, listed = self._entry_blocks()  # (B, Hp, NNZ)

        def below(T: torch.Tensor, c: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
            """sum over keys s in [c, c + n) of max(0, T - s): pairs s <= t < T."""
            m = (T - c).clamp(min=0).minimum(n)
            return m * T - m * c - m * (m - 1) // 2

        a = ks + blk * bq  # first query of each entry's query block
        nq = (L - a).clamp(0, bq)
        c = ks + self.indices.long() * bk
        nk = (L - c).clamp(0, bk)
        pairs = torch.where(listed, below(a + nq, c, nk) - below(a, c, nk), 0).sum(-1)  # (B, Hp)
        if self.extra_cols is not None:
            cols = self.extra_cols.long()  # (B, Hp, NQ, C)
            NQ, C = cols.shape[-2:]
            i = torch.arange(NQ, device=cols.device)[:, None]
            a = ks[..., None] + i * bq  # (B, 1, NQ, 1)
            nq = (L - a).clamp(0, bq)
            ok = (cols >= ks[..., None]) & (cols < L)
            # Dedup: is (query block, key block of the column) listed? Entry keys i * NKB + j ascend.
            nkb = _cdiv(L, bk) + 1
            key = torch.where(listed, blk * nkb + self.indices.long(), torch.iinfo(torch.long).max)
            want = (i * nkb + (cols - ks[..., None]).div(bk, rounding_mode="floor")).flatten(2)  # (B, Hp, NQ*C)
            pos = torch.searchsorted(key, want.contiguous()).clamp(max=key.shape[-1] - 1)
            dup = (key.gather(-1, pos) == want).view_as(cols) if key.shape[-1] else torch.zeros_like(ok)
            seen = (a + nq - torch.maximum(a, cols)).clamp(0, bq)  # queries of the block at or after the column
            pairs = pairs + torch.where(ok & ~dup, seen, 0).sum((-1, -2))
        n = (L - self.key_start.long()).clamp(min=1).to(torch.float64)[:, None]
        return pairs.to(torch.float64) / (n * (n + 1) / 2)

    def validate(self, H: int, KV: int, L: int) -> None:
        """Raise ValueError on malformed shapes, dtypes or values (syncs; tests and the reference)."""
        ks, ptr, idx, extra = self.key_start, self.indptr, self.indices, self.extra_cols

        def fail(msg: str) -> None:
            raise ValueError(f"BlockPlan: {msg}")

        if H % KV:
            fail(f"query heads {H} must be a multiple of KV heads {KV}")
        if ks.dim() != 1 or ks.dtype != torch.int64:
            fail(f"key_start must be a (B,) int64 tensor, got {tuple(ks.shape)} {ks.dtype}")
        B = ks.shape[0]
        if ks.numel() and (int(ks.min()) < 0 or int(ks.max()) > L):
            fail(f"key_start must lie in [0, L={L}], got {ks.tolist()}")
        for name, t in (("indptr", ptr), ("indices", idx)):
            if t.dim() != 3 or t.dtype != torch.int32:
                fail(f"{name} must be a 3-d int32 tensor, got {tuple(t.shape)} {t.dtype}")
            if t.shape[:2] != ptr.shape[:2]:
                fail(f"indptr and indices disagree on (B, Hp): {tuple(ptr.shape[:2])} vs {tuple(t.shape[:2])}")
        if ptr.shape[0] != B or ptr.shape[1] not in (H, KV):
            fail(f"indptr must be (B={B}, Hp in ({H}, {KV}), NQ + 1), got {tuple(ptr.shape)}")
        nq = int(_cdiv(L - int(ks.min()), self.block_q)) if B else 0
        if self.n_qblocks != nq:
            fail(f"indptr needs NQ + 1 = {nq + 1} entries (NQ = ceil((L - min key_start) / block_q)), "
                 f"got {ptr.shape[-1]}")
        if any(t.device != ks.device for t in (ptr, idx) + ((extra,) if extra is not None else ())):
            fail("all tensors must be on key_start's device")
        if ptr.numel() and (int(ptr.min()) < 0 or int(ptr.max()) > idx.shape[-1] or bool((ptr.diff(dim=-1) < 0).any())):
            fail(f"indptr must be non-decreasing within [0, NNZ={idx.shape[-1]}]")
        blk, listed = self._entry_blocks()
        nkb = _cdiv(L - ks, self.block_k)[:, None, None]  # (B, 1, 1) the row's key blocks
        if bool((listed & ((idx < 0) | (idx >= nkb))).any()):
            fail("indices out of range: key block j of row b needs 0 <= j < ceil((L - key_start[b]) / block_k)")
        same = listed[..., 1:] & listed[..., :-1] & (blk[..., 1:] == blk[..., :-1])
        if bool((same & (idx[..., 1:] <= idx[..., :-1])).any()):
            fail("the key blocks of a query block must be sorted ascending and unique")
        if extra is not None:
            if extra.dim() != 4 or extra.dtype != torch.int64 or extra.shape[:3] != ptr.shape[:2] + (nq,):
                fail(f"extra_cols must be a (B, Hp, NQ={nq}, C) int64 tensor, got {tuple(extra.shape)} {extra.dtype}")
            used = extra != -1
            if bool((used & ((extra < ks[:, None, None, None]) | (extra >= L))).any()):
                fail("extra_cols must be -1 or real key positions key_start[b] <= s < L")
            srt = extra.sort(-1).values
            if bool(((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] != -1)).any()):
                fail("extra_cols must not repeat a position within a query block")
