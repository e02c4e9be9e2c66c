"""What the executors take besides q/k/v and the scaling, one definition per operation.

TokenPlan: what each head keeps after prefill (produced by method policies; sparse_prefill, the cache).
RaggedCacheView: the ragged cache as decode queries see it (built by the cache; ragged_decode).
DecodeSelection: the tail pages each (row, KV head) attends to at one decode step (ragged_decode).
Frozen dataclasses of tensor references: building one copies and synchronises nothing.
"""
from __future__ import annotations

import dataclasses
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
    head_keep (optional, (B, H) bool): query heads whose prefill output is kept; a dropped head
    outputs zeros at this layer's prefill (SpAtten's head pruning; applied by
    dispatch.sparse_prefill on every backend). Decode and the cache are not affected.
    head_window (optional, (B, KV) int64, each >= 1): the causal window of each (row, KV head) in
    place of `window` at prefill (MoA's per-head spans): query j of head h attends to (j - w, j],
    extended to the local start as usual. `window` stays the cache's (the local region every head
    keeps), so a head's window should be >= it; see window_of().
    compensate (optional, (KV,) bool): KV heads whose dropped tokens are not lost but folded into one
    compensation entry (RazorAttention): the mean key and mean value of every real token of the
    row's global region the head does not keep, weighted by their count n (a logit bias of log n),
    visible to every later query; decode folds the tokens a compressed block drops into it too.
    attend_all: the prefill queries attend to every causal key (plain attention); the plan then
    says only what the cache keeps (a cache-compression method's plan; executed by the caller's
    dense attention, never by sparse_prefill).
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
    head_keep: torch.Tensor | None = None  # (B, H) bool query heads whose prefill output is kept (None: all)
    compensate: torch.Tensor | None = None  # (KV,) bool heads folding what they drop into one entry
    attend_all: bool = False  # prefill is plain causal attention; the plan is what the cache keeps
    head_window: torch.Tensor | None = None  # (B, KV) int64 per-head prefill window (None: `window` everywhere)

    def window_of(self, batch: int, num_kv_heads: int, device: torch.device | None = None) -> torch.Tensor:
        """(B, KV) int64 prefill window of each (row, KV head): head_window, or `window` everywhere."""
        if self.head_window is not None:
            return self.head_window.to(device=device or self.head_window.device, dtype=torch.long)
        return torch.full((batch, num_kv_heads), self.window, dtype=torch.long, device=device or self.key_start.device)

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


def sliding_window_plan(batch: int, num_kv_heads: int, seq_len: int, window: int, key_start: torch.Tensor
                        ) -> TokenPlan:
    """Exact causal sliding-window attention as a TokenPlan: no kept global keys, no local region,
    query j attends to the keys (j - window, j] from its row's key_start on (a model's own
    sliding-window layers, computed by the sparse prefill kernels instead of a dense (L, L) mask)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    dev = key_start.device
    return TokenPlan(
        kept_idx=torch.full((batch, num_kv_heads, 1), seq_len, dtype=torch.long, device=dev),
        kept_len=torch.zeros(batch, num_kv_heads, dtype=torch.int32, device=dev),
        local_start=seq_len, window=window, block_size=1, key_start=key_start.to(torch.long),
        decode_keep=torch.full((num_kv_heads,), window, dtype=torch.long, device=dev), kept_total=0)


def band_start(j: torch.Tensor, window: int | torch.Tensor, local_start: int | torch.Tensor) -> torch.Tensor:
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
    Compensation (optional, TokenPlan.compensate): (row b, KV head h) has one more key c_keys[b, h]
    with value c_values[b, h] and logit bias c_logw[b, h] (natural log; -inf = no entry), visible
    to every query: its logit is q . c_key * scaling + c_logw (the mean of n dropped tokens counted
    n times). A DecodeSelection never drops it.
    """

    q_pos: torch.Tensor
    g_keys: torch.Tensor
    g_values: torch.Tensor
    g_pos: torch.Tensor
    g_offsets: torch.Tensor  # (B*KV + 1,)
    t_keys: torch.Tensor
    t_values: torch.Tensor
    t_pos: torch.Tensor
    c_keys: torch.Tensor | None = None  # (B, KV, D)
    c_values: torch.Tensor | None = None  # (B, KV, D)
    c_logw: torch.Tensor | None = None  # (B, KV) fp32


def pack_mask(mask: torch.Tensor, max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending indices of True entries, padded: (..., N) bool -> idx (..., M) int64, len (...) int32.

    Padding entries hold N (one past the end) so they sort last and are easy to spot. max_len: the
    largest count when the caller knows it (M then needs no read of the counts on the host, a
    sync on a GPU); it must be at least every row's count.
    """
    N = mask.shape[-1]
    lengths = mask.sum(-1)
    M = max_len if max_len is not None else (int(lengths.max()) if mask.numel() else 0)
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

    In-loop skipping (BLASST; optional): with skip_threshold (B,) fp32 = lambda_b >= 0, each
    query row (one query head at one position) walks its listed key blocks in ascending order and
    drops key block j when m_j < M_j + log2(lambda_b) in the log2 domain, where m_j is the row's
    largest logit (q.k x scaling x log2 e) over the visible keys of block j and M_j the running
    maximum over the blocks before j (a dropped block never raises it, so M_j is simply the max
    over every earlier listed block). Its softmax, V load and P.V are skipped: each of its weights
    is below lambda_b times the largest weight seen so far. The decision is per row and per key
    block of block_k keys, so it does not depend on the kernel's tiles. lambda_b = 0 never drops;
    extra columns are never dropped. The executors write into skip_dropped (B, H) int64 the
    (query, key) pairs each query head dropped in the last run; kept_fraction subtracts them.
    """

    block_q: int
    block_k: int
    key_start: torch.Tensor  # (B,) int64
    indptr: torch.Tensor  # (B, Hp, NQ + 1) int32
    indices: torch.Tensor  # (B, Hp, NNZ) int32, entries outside [indptr[.., 0], indptr[.., NQ]) unused
    extra_cols: torch.Tensor | None = None  # (B, Hp, NQ, C) int64 absolute positions, -1 = unused
    skip_threshold: torch.Tensor | None = None  # (B,) fp32 BLASST lambda per row (in-loop skipping)
    skip_dropped: torch.Tensor | None = None  # (B, H) int64 pairs dropped by the last run (written by executors)

    def __post_init__(self) -> None:
        for name in ("block_q", "block_k"):
            size = getattr(self, name)
            if not isinstance(size, int) or size < 16 or size & (size - 1):
                raise ValueError(f"BlockPlan.{name} must be a power of two >= 16, got {size!r}")
        if (self.skip_threshold is None) != (self.skip_dropped is None):
            raise ValueError("BlockPlan: skip_threshold and skip_dropped go together (see with_skip)")

    def with_skip(self, threshold: torch.Tensor | float, num_heads: int) -> BlockPlan:
        """This plan with in-loop skipping at lambda = threshold (a float, or (B,) per row) and a
        zeroed (B, num_heads) counter of dropped pairs."""
        B = self.key_start.shape[0]
        dev = self.key_start.device
        lam = torch.as_tensor(threshold, dtype=torch.float32, device=dev).expand(B).contiguous()
        return dataclasses.replace(self, skip_threshold=lam,
                                   skip_dropped=torch.zeros(B, num_heads, dtype=torch.int64, device=dev))

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

    @staticmethod
    def from_lists(block_q: int, block_k: int, key_start: torch.Tensor, blocks: torch.Tensor, valid: torch.Tensor,
                   n_q: int) -> BlockPlan:
        """The plan listing blocks[b, h, i, m] where valid (ascending per (b, h, i) among the valid
        entries, unique): blocks (B, Hp, NQ', M) int, valid (B, Hp, NQ', M) bool, NQ' >= n_q query
        blocks of which the first n_q are kept (n_q = the plan's NQ, from the smallest key_start).
        One host sync (the NNZ)."""
        B, Hp = blocks.shape[:2]
        valid = valid[:, :, :n_q]
        cnt = valid.sum(-1)  # (B, Hp, n_q)
        indptr = torch.nn.functional.pad(cnt.cumsum(-1), (1, 0))  # (B, Hp, n_q + 1)
        nnz = int(indptr[..., -1].max()) if indptr.numel() else 0
        rank = valid.long().cumsum(-1) - 1  # an entry's slot within its list
        slot = torch.where(valid, indptr[..., :-1, None] + rank, nnz).flatten(2)  # nnz: a dump slot
        indices = torch.zeros(B, Hp, nnz + 1, dtype=torch.int32, device=blocks.device)
        indices.scatter_(2, slot, blocks[:, :, :n_q].flatten(2).to(torch.int32))
        return BlockPlan(block_q, block_k, key_start.long(), indptr.to(torch.int32).contiguous(),
                         indices[..., :max(nnz, 1)].contiguous())

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
        pairs = pairs.to(torch.float64)
        if self.skip_dropped is not None:  # pairs the last run skipped, per plan head (mean over its query heads)
            pairs = pairs - self.skip_dropped.view(pairs.shape[0], pairs.shape[1], -1).to(torch.float64).mean(-1)
        n = (L - self.key_start.long()).clamp(min=1).to(torch.float64)[:, None]
        return pairs / (n * (n + 1) / 2)

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
        lam, dropped = self.skip_threshold, self.skip_dropped
        if lam is not None:
            if lam.shape != (B,) or lam.dtype != torch.float32 or lam.device != ks.device:
                fail(f"skip_threshold must be a (B={B},) float32 tensor on key_start's device, got "
                     f"{tuple(lam.shape)} {lam.dtype}")
            if bool(((lam < 0) | ~lam.isfinite()).any()):
                fail("skip_threshold must be finite and >= 0")
            if dropped.shape != (B, H) or dropped.dtype != torch.int64 or dropped.device != ks.device:
                fail(f"skip_dropped must be a (B={B}, H={H}) int64 tensor on key_start's device, got "
                     f"{tuple(dropped.shape)} {dropped.dtype}")


@dataclass(frozen=True)
class SubsetPlan:
    """Token subsets (Token Sparse Attention's compress / attend / decompress): per (row, plan head),
    a set S of positions whose queries attend, causally, to the keys of S only; every other query of
    that head outputs zeros (its token passes the layer on its residual path alone).

    For (row b, plan head h): S = idx[b, h, :length[b, h]] (absolute positions, strictly ascending,
    each in [key_start[b], L)); entries past length are padding and hold L. Query t in S sees key s
    iff s in S and s <= t. h ranges over Hp = H (one set per query head, the set of its KV head's
    keys it reads too) or Hp = KV (one set per KV head, shared by its query heads). Padding
    positions (< key_start) are never in S: zero output, never attended. The cache is not affected:
    a subset plan keeps every token (the attention skips work, not memory).
    """

    idx: torch.Tensor  # (B, Hp, M) int64
    length: torch.Tensor  # (B, Hp) int32
    key_start: torch.Tensor  # (B,) int64

    def kept_fraction(self, seq_len: int) -> torch.Tensor:
        """Attended (query, key) pairs over the causal pairs of the real prompt. -> (B, Hp) float64."""
        m = self.length.to(torch.float64)
        n = (seq_len - self.key_start.long()).clamp(min=1).to(torch.float64)[:, None]
        return (m * (m + 1) / 2) / (n * (n + 1) / 2)

    def validate(self, H: int, KV: int, L: int) -> None:
        """Raise ValueError on malformed shapes, dtypes or values (syncs; tests and the reference)."""

        def fail(msg: str) -> None:
            raise ValueError(f"SubsetPlan: {msg}")

        idx, n, ks = self.idx, self.length, self.key_start
        if H % KV:
            fail(f"query heads {H} must be a multiple of KV heads {KV}")
        if ks.dim() != 1 or ks.dtype != torch.int64:
            fail(f"key_start must be a (B,) int64 tensor, got {tuple(ks.shape)} {ks.dtype}")
        B = ks.shape[0]
        if idx.dim() != 3 or idx.dtype != torch.int64 or idx.shape[0] != B or idx.shape[1] not in (H, KV):
            fail(f"idx must be a (B={B}, Hp in ({H}, {KV}), M) int64 tensor, got {tuple(idx.shape)} {idx.dtype}")
        if n.dtype != torch.int32 or tuple(n.shape) != tuple(idx.shape[:2]):
            fail(f"length must be a {tuple(idx.shape[:2])} int32 tensor, got {tuple(n.shape)} {n.dtype}")
        if n.numel() and (int(n.min()) < 0 or int(n.max()) > idx.shape[-1]):
            fail(f"length must lie in [0, M={idx.shape[-1]}]")
        used = torch.arange(idx.shape[-1], device=idx.device) < n[..., None]
        if bool((used & ((idx < ks[:, None, None]) | (idx >= L))).any()):
            fail("listed positions must be real tokens: key_start[b] <= position < L")
        if bool((~used & (idx != L)).any()):
            fail(f"padding entries (past length) must hold L = {L}")
        if bool((used[..., 1:] & (idx[..., 1:] <= idx[..., :-1])).any()):
            fail("listed positions must be strictly ascending")


@dataclass(frozen=True)
class KeyBias:
    """Key logit bias: additive biases on a few key positions, per (row, query head).

    For (row b, query head h) and each used slot p (pos[b, h, p] >= 0), every query of head h that
    sees key pos[b, h, p] adds bias[b, h, p] to that key's logit (q.k x scaling) before the softmax:
    the key's weight is multiplied by exp(bias) and the row renormalised. Keys a query does not see
    (causality, padding, a plan's selection, an evicted token) are unaffected. Positions are absolute
    (like TokenPlan's), unique among a (b, h)'s used slots. Every executor takes one (key_bias=);
    bias 0 is the unbiased attention. Used by the attention calibrators (ZeroTuning, ACT).
    """

    pos: torch.Tensor  # (B, H, P) int64 absolute key positions, -1 = unused slot
    bias: torch.Tensor  # (B, H, P) float32 natural-log units (log of the weight's scale)

    @staticmethod
    def at(positions: torch.Tensor, bias: torch.Tensor) -> KeyBias:
        """One position per (row, head): positions (B,) and bias (H,) or (B, H) -> P = 1."""
        B = positions.shape[0]
        b = bias.float().expand(B, -1) if bias.dim() == 1 else bias.float()
        pos = positions.long()[:, None, None].expand(B, b.shape[1], 1).contiguous()
        return KeyBias(pos, b[..., None].contiguous())

    def lookup(self, b: int, heads: slice, positions: torch.Tensor) -> torch.Tensor:
        """Biases of row b's query heads `heads` on keys at `positions` (N,) -> (h, N) float32 (0 off the list)."""
        p = self.pos[b, heads].to(positions.device)  # (h, P)
        hit = (p[:, :, None] == positions[None, None, :]) & (p[:, :, None] >= 0)  # (h, P, N)
        return (hit * self.bias[b, heads].to(positions.device, torch.float32)[:, :, None]).sum(1)

    def rows(self, length: int) -> torch.Tensor:
        """(B, H, length) float32: the bias of every key position < length (0 off the list)."""
        B, H, _ = self.pos.shape
        out = torch.zeros(B, H, length + 1, dtype=torch.float32, device=self.pos.device)
        slot = torch.where((self.pos >= 0) & (self.pos < length), self.pos, length)  # length: a dump slot
        return out.scatter_add_(2, slot, self.bias.float())[..., :length]

    def validate(self, B: int, H: int) -> None:
        """Raise ValueError on malformed shapes, dtypes or values (syncs; tests and the references)."""
        if self.pos.dim() != 3 or tuple(self.pos.shape[:2]) != (B, H) or self.pos.dtype != torch.int64:
            raise ValueError(f"KeyBias.pos must be a (B={B}, H={H}, P) int64 tensor, got "
                             f"{tuple(self.pos.shape)} {self.pos.dtype}")
        if self.bias.shape != self.pos.shape or not self.bias.is_floating_point():
            raise ValueError(f"KeyBias.bias must be a float tensor shaped like pos {tuple(self.pos.shape)}, "
                             f"got {tuple(self.bias.shape)} {self.bias.dtype}")
        if self.bias.device != self.pos.device:
            raise ValueError("KeyBias.pos and KeyBias.bias must be on one device")
        if not bool(self.bias.isfinite().all()):
            raise ValueError("KeyBias.bias must be finite (a scale of 0 would be -inf: drop the key instead)")
        if bool((self.pos < -1).any()):
            raise ValueError("KeyBias.pos entries must be positions >= 0 or -1 (unused)")
        srt = self.pos.sort(-1).values
        if bool(((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any()):
            raise ValueError("KeyBias.pos must not repeat a position within a (row, head)")

    def packed(self, device: torch.device, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(pos int32, bias float32 x scale), contiguous (B, H, P) on device: the kernels' arguments."""
        return (self.pos.to(device=device, dtype=torch.int32).contiguous(),
                (self.bias.to(device=device, dtype=torch.float32) * scale).contiguous())
