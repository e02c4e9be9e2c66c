"""Triton TCA Phase-2 selection: last-query importance, block ranking, top-k and packing, fused.

Semantics: exactly `select.select_and_pack_ref` (TCA.plan with no sink tokens). Blocks of row r
start at its first real key s_r = key_start[r]: block j covers [s_r + j b, s_r + (j + 1) b), the
row has n_r global blocks (n_rows[r] <= n_max, a device tensor) and keep_rank gives its keep count
per rank, so a left-padded row selects what it selects alone. Per layer:
  A  `_logits_kernel`   grid (B*KV, L-splits): the last query's logits of the g query heads of a
                        KV head over a chunk of keys (fp32 products reduced over D per key,
                        invalid keys -inf) are written out, with each chunk's running softmax
                        max and sum of exp;
  B  `_importance_kernel` grid (B*KV, cdiv(L, b)): combines the chunk stats, turns the row's
                        block j of logits into s = mean over the group of the softmax (fp32),
                        writes s (and zeros over the padding), the block mass and h of Eq. 6 for
                        the row's global blocks, -inf for blocks j in [n_r, n_max) so they rank
                        last ("max": only alpha * conc, the mass term is added by torch after);
  torch               stable descending argsort of h, scatter of the keep-per-rank -> keep;
  C  `_select_kernel`   grid (B*KV, n_max): the stable rank of every token inside its block by a
                        b x b comparison tile (#{s_j > s_i} + #{j < i, s_j == s_i}, exactly the
                        rank of a stable descending argsort), selected = rank < keep for j < n_r;
                        writes the selection, the per-block count and kept mass;
  torch               inclusive cumsum of the counts -> per-block offsets and kept_len;
  D  `_pack_kernel`     grid (B*KV, n_max): writes the ascending absolute indices of the selected
                        tokens at offset + prefix in kept_idx (pre-filled with L).
No host synchronisation: the output width M (max_kept) is given by the caller, who knows it from
the layer's budgets (exact without padding, an upper bound with it), and n_max is keep_rank's width.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...engine.plan import rows_blocks
from ...engine.triton_common import check_head_dim, check_heads, interpreted, next_pow2
from .select import KeepChooser, SelectionSpec


@triton.jit
def _logits_kernel(
    Q, K, KEY_START, LOGITS, PMAX, PSUM,
    s_qb, s_qh, s_kb, s_kh, s_kl,
    L, KV, n_splits, chunk, scaling,
    G: tl.constexpr, GROWS: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr,
):
    """LOGITS (B*KV, G, L) fp32; PMAX/PSUM (B*KV, G, n_splits) fp32 per-chunk softmax stats."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // KV
    h = bh % KV
    rows = tl.arange(0, GROWS)
    row_ok = rows < G
    d = tl.arange(0, HEAD_D)
    q = tl.load(Q + b.to(tl.int64) * s_qb + (h * G + rows)[:, None] * s_qh + d[None, :],
                mask=row_ok[:, None], other=0.0).to(tl.float32)  # (GROWS, D)
    ks = tl.load(KEY_START + b)
    k_base = K + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    out_base = LOGITS + bh.to(tl.int64) * G * L
    cols = tl.arange(0, BLOCK_N)
    m_i = tl.full([GROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROWS], dtype=tl.float32)
    start = split * chunk
    end = tl.minimum(start + chunk, L)
    for k0 in range(start, end, BLOCK_N):
        kid = k0 + cols
        in_l = kid < end
        k = tl.load(k_base + kid[:, None].to(tl.int64) * s_kl + d[None, :], mask=in_l[:, None], other=0.0)
        # one reduction over D per (head, key), the same for every key: equal keys give equal logits
        # (a dot tile may round by column position), so exact ties in s stay ties
        x = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], 2) * scaling  # (GROWS, BLOCK_N)
        x = tl.where((in_l & (kid >= ks))[None, :], x, float("-inf"))
        tl.store(out_base + rows[:, None] * L + kid[None, :], x, mask=row_ok[:, None] & in_l[None, :])
        m_new = tl.maximum(m_i, tl.max(x, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # all keys invalid so far: no NaN
        l_i = l_i * tl.exp(m_i - m_use) + tl.sum(tl.exp(x - m_use[:, None]), 1)
        m_i = m_new
    st = bh * G * n_splits + rows * n_splits + split
    tl.store(PMAX + st, m_i, mask=row_ok)
    tl.store(PSUM + st, l_i, mask=row_ok)


@triton.jit
def _importance_kernel(
    LOGITS, PMAX, PSUM, KEY_START, NB, S, MASS, H,
    L, KV, n_max, n_splits, w_mass, w_conc,
    G: tl.constexpr, GP: tl.constexpr, SPLITS_P: tl.constexpr, BLOCK: tl.constexpr,
):
    """S (B*KV, L) fp32 (0 on padding); MASS (B*KV, cdiv(L, b)) masses of the row's blocks (from
    key_start); H (B*KV, n_max) Eq. 6 for j < n_r (w_mass may be 0), -inf for n_r <= j < n_max."""
    bh = tl.program_id(0)
    j = tl.program_id(1)
    b = bh // KV
    ks = tl.load(KEY_START + b)
    nb = tl.load(NB + b)
    rows = tl.arange(0, GP)
    row_ok = rows < G
    sp = tl.arange(0, SPLITS_P)
    st = bh * G * n_splits + rows[:, None] * n_splits + sp[None, :]
    st_ok = row_ok[:, None] & (sp < n_splits)[None, :]
    pm = tl.load(PMAX + st, mask=st_ok, other=float("-inf"))
    ps = tl.load(PSUM + st, mask=st_ok, other=0.0)
    m = tl.max(pm, 1)
    m = tl.where(m == float("-inf"), 0.0, m)
    l = tl.sum(ps * tl.exp(pm - m[:, None]), 1)
    l = tl.where(l > 0, l, 1.0)
    ar = tl.arange(0, BLOCK)
    pad = j * BLOCK + ar  # program j also zeroes its share of the padding [0, key_start)
    tl.store(S + bh.to(tl.int64) * L + pad, tl.zeros([BLOCK], dtype=tl.float32), mask=pad < ks)
    cols = ks + j * BLOCK + ar  # the row's block j
    in_l = cols < L
    x = tl.load(LOGITS + bh.to(tl.int64) * G * L + rows[:, None] * L + cols[None, :],
                mask=row_ok[:, None] & in_l[None, :], other=float("-inf"))
    p = tl.exp(x - m[:, None]) / l[:, None]
    s = tl.sum(p, 0) / G  # (BLOCK,)
    tl.store(S + bh.to(tl.int64) * L + cols, s, mask=in_l)
    mass = tl.sum(s, 0)
    tl.store(MASS + bh * tl.num_programs(1) + j, mass)
    if j < n_max:
        sq = tl.sum(s * s, 0)
        mc = tl.maximum(mass, 1e-30)
        den = tl.where(mass > 0, mc * mc, 1.0)  # as the reference where mass > 0; no 0/0 elsewhere
        conc = tl.where(mass > 0, 1.0 - sq / den, 0.0)
        hj = tl.where(j < nb, w_mass * mass + w_conc * conc, float("-inf"))
        tl.store(H + bh * n_max + j, hj)


@triton.jit
def _select_kernel(
    S, KEEP, KEY_START, NB, SEL, COUNT, MASS,
    L, KV, n_max, n_mass,
    BLOCK: tl.constexpr,
):
    """SEL (B*KV, n_max*b) int8, block-relative; COUNT (B*KV, n_max) int32; MASS[:, j] <- kept mass
    of global block j (j < n_r; the masses of the row's local blocks are left as they are)."""
    bh = tl.program_id(0)
    j = tl.program_id(1)
    b = bh // KV
    ks = tl.load(KEY_START + b)
    nb = tl.load(NB + b)
    ar = tl.arange(0, BLOCK)
    glob = (j * BLOCK + ar) < nb * BLOCK  # (BLOCK,) all True iff block j is one of the row's global blocks
    idx = ks + j * BLOCK + ar  # absolute positions of the row's block j
    s_i = tl.load(S + bh.to(tl.int64) * L + idx, mask=glob & (idx < L), other=0.0)  # (needs s_r + n_r b <= L)
    # stable descending rank of token i (rows): tokens j (columns) strictly larger, or equal and earlier
    before = (s_i[None, :] > s_i[:, None]) | ((s_i[None, :] == s_i[:, None]) & (ar[None, :] < ar[:, None]))
    rank = tl.sum(before.to(tl.int32), 1)
    keep = tl.load(KEEP + bh * n_max + j)
    sel = (rank < keep) & glob
    tl.store(SEL + bh.to(tl.int64) * n_max * BLOCK + j * BLOCK + ar, sel.to(tl.int8))
    tl.store(COUNT + bh * n_max + j, tl.sum(sel.to(tl.int32), 0))
    if j < nb:  # a local block keeps its mass
        tl.store(MASS + bh * n_mass + j, tl.sum(tl.where(sel, s_i, 0.0), 0))


@triton.jit
def _pack_kernel(SEL, CSUM, COUNT, KEY_START, KEPT_IDX, KV, n_max, M, BLOCK: tl.constexpr):
    """KEPT_IDX (B*KV, M) int64: absolute indices of block j's selection at [csum[j] - count[j], csum[j])."""
    bh = tl.program_id(0)
    j = tl.program_id(1)
    ar = tl.arange(0, BLOCK)
    rel = j * BLOCK + ar
    sel = tl.load(SEL + bh.to(tl.int64) * n_max * BLOCK + rel).to(tl.int32)
    off = tl.load(CSUM + bh * n_max + j) - tl.load(COUNT + bh * n_max + j)
    pos = off + tl.cumsum(sel, 0) - sel
    ks = tl.load(KEY_START + bh // KV)
    tl.store(KEPT_IDX + bh.to(tl.int64) * M + pos, (ks + rel).to(tl.int64), mask=(sel > 0) & (pos < M))


def _splits(L: int, block_n: int, programs: int) -> tuple[int, int]:
    """(chunk, n_splits): chunks of whole key tiles, about 1024 programs in all, at most 64 chunks
    (at most 4 under the interpreter, where every program costs host time)."""
    most = 4 if interpreted() else 64
    target = max(1, min(most, 1024 // max(programs, 1)))
    tiles = triton.cdiv(L, block_n)
    chunk = triton.cdiv(tiles, target) * block_n
    return chunk, triton.cdiv(L, chunk)


def step_logits(q_last: torch.Tensor, k: torch.Tensor, key_start: torch.Tensor, scaling: float):
    """Kernel A. -> logits (B*KV, g, L), per-chunk max and sum of exp (B*KV, g, n_splits), fp32."""
    B, H, D = q_last.shape
    _, KV, L, _ = k.shape
    g = H // KV
    gp = max(2, next_pow2(g))
    block_n = min(128, max(8, 8192 // (gp * D)))  # the (heads, keys, D) product tile: ~8K elements
    if interpreted():
        block_n = 128  # no registers to spare there; fewer loop steps
    chunk, n_splits = _splits(L, block_n, B * KV)
    dev = k.device
    logits = torch.empty(B * KV, g, L, dtype=torch.float32, device=dev)
    pmax = torch.empty(B * KV, g, n_splits, dtype=torch.float32, device=dev)
    psum = torch.empty_like(pmax)
    _logits_kernel[(B * KV, n_splits)](
        q_last, k, key_start, logits, pmax, psum,
        q_last.stride(0), q_last.stride(1), k.stride(0), k.stride(1), k.stride(2),
        L, KV, n_splits, chunk, scaling,
        G=g, GROWS=gp, BLOCK_N=block_n, HEAD_D=D, num_warps=4,
    )
    return logits, pmax, psum


def _rows(n_blocks, key_start: torch.Tensor, B: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """(key_start, n per row) as contiguous int64 device tensors; None key_start = no padding."""
    if key_start is None:
        key_start = torch.zeros(B, dtype=torch.int64, device=dev)
    return key_start.to(device=dev, dtype=torch.int64).contiguous(), rows_blocks(n_blocks, B, dev).contiguous()


def step_importance(logits, pmax, psum, n_blocks: int, block_size: int, alpha: float, mass_norm: str,
                    key_start: torch.Tensor | None = None, n_rows: torch.Tensor | None = None):
    """Kernel B (+ the "max" mass term). n_blocks: n_max (H's width); key_start (B,) and n_rows (B,)
    the rows' block starts and counts (default: 0 and n_blocks, no padding).
    -> s (B*KV, L), block masses (B*KV, cdiv(L, b)), h (B*KV, n_max)."""
    BKV, g, L = logits.shape
    n, bs, dev = n_blocks, block_size, logits.device
    B = key_start.shape[0] if key_start is not None else (n_rows.shape[0] if n_rows is not None else BKV)
    KV = BKV // B
    key_start, nb = _rows(n if n_rows is None else n_rows, key_start, B, dev)
    nb_all = triton.cdiv(L, bs)
    s = torch.empty(BKV, L, dtype=torch.float32, device=dev)
    mass = torch.empty(BKV, nb_all, dtype=torch.float32, device=dev)
    h = torch.empty(BKV, n, dtype=torch.float32, device=dev)
    w_mass = 0.0 if mass_norm == "max" else 1.0 - alpha
    n_splits = pmax.shape[-1]
    _importance_kernel[(BKV, nb_all)](
        logits, pmax, psum, key_start, nb, s, mass, h, L, KV, n, n_splits, w_mass, alpha,
        G=g, GP=max(2, next_pow2(g)), SPLITS_P=max(2, next_pow2(n_splits)), BLOCK=bs, num_warps=4,
    )
    if mass_norm == "max":  # mass over the largest mass of the row's own global blocks
        own = torch.arange(n, device=dev)[None, :] < nb.repeat_interleave(KV)[:, None]  # (B*KV, n)
        gm = torch.where(own, mass[:, :n], torch.zeros_like(h))
        h = h + (1.0 - alpha) * (gm / gm.amax(-1, keepdim=True).clamp_min(1e-30))
    return s, mass, h


def step_keep(h: torch.Tensor, keep_rank: torch.Tensor) -> torch.Tensor:
    """Block ranks -> keep count per block: keep_rank (KV, n) or (B, KV, n) scattered by the stable
    descending order of h (B*KV, n)."""
    KV, n = keep_rank.shape[-2:]
    hv = h.view(-1, KV, n)
    order = torch.argsort(hv, dim=-1, descending=True, stable=True)
    keep = torch.empty(hv.shape, dtype=torch.int32, device=h.device)
    return keep.scatter_(-1, order, keep_rank.to(device=h.device, dtype=torch.int32).expand(hv.shape))


def step_select(s, keep, key_start, mass, n_blocks: int, block_size: int, kv_heads: int,
                n_rows: torch.Tensor | None = None):
    """Kernel C (+ cumsum). Overwrites mass[:, j] (j < n_r) with the kept mass of each global block.
    n_blocks: n_max; n_rows (B,): per-row block counts (default n_blocks).

    -> selection (B*KV, n_max*b) int8, counts and inclusive cumsum (B*KV, n_max) int32."""
    BKV, L = s.shape
    n, bs = n_blocks, block_size
    key_start, nb = _rows(n if n_rows is None else n_rows, key_start, BKV // kv_heads, s.device)
    sel = torch.empty(BKV, n * bs, dtype=torch.int8, device=s.device)
    count = torch.empty(BKV, n, dtype=torch.int32, device=s.device)
    _select_kernel[(BKV, n)](
        s, keep, key_start, nb, sel, count, mass, L, kv_heads, n, mass.shape[1], BLOCK=bs,
        num_warps=4 if bs <= 64 else 8,
    )
    return sel, count, torch.cumsum(count, dim=-1, dtype=torch.int32)


def step_pack(sel, count, csum, n_blocks: int, block_size: int, max_kept: int,
              key_start: torch.Tensor | None = None, pad: int | None = None) -> torch.Tensor:
    """Kernel D. -> kept_idx (B*KV, max_kept) int64 absolute positions, padded with `pad`
    (default n_blocks * block_size); key_start (B,) the rows' block starts (default 0)."""
    BKV = sel.shape[0]
    B = key_start.shape[0] if key_start is not None else BKV
    key_start, _ = _rows(0, key_start, B, sel.device)
    pad = n_blocks * block_size if pad is None else pad
    kept_idx = torch.full((BKV, max_kept), pad, dtype=torch.int64, device=sel.device)
    if max_kept > 0:
        _pack_kernel[(BKV, n_blocks)](sel, csum, count, key_start, kept_idx, BKV // B, n_blocks, max_kept,
                                      BLOCK=block_size, num_warps=4)
    return kept_idx


def select_and_pack_triton(
    q_last: torch.Tensor, k: torch.Tensor, spec: SelectionSpec, scaling: float, choose: KeepChooser | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q_last (B, H, D), k (B, KV, L, D); spec: the rows' blocks (from key_start (B,), the first
    real key of each row), keep counts per rank and max_kept (required: the output width, known
    on the host, so nothing syncs); spec.n_blocks: an int (every row) or a (B,) device tensor of
    per-row counts <= n_max.

    -> kept_idx (B, KV, max_kept) int64 absolute positions ascending, padded with L; kept_len
       (B, KV) int32; retained (B, KV) fp32 last-query mass on what is kept (global kept + the
       row's local region); s (B, KV, L) fp32 GQA-averaged last-query attention.
    max_kept must be >= every head's kept count (selected tokens past it are dropped).
    choose: keep counts picked from this request's s and h (select.KeepChooser) instead of
    spec.keep_rank (torch ops on the device between kernels B and C).
    Launches: 4 kernels, a fill, an argsort + scatter, a cumsum and a sum (+ a few elementwise
    ones for "max"). No host synchronisation.
    """
    key_start, keep_rank, n_blocks, block_size = spec.key_start, spec.keep_rank, spec.n_blocks, spec.block_size
    alpha, mass_norm, max_kept = spec.alpha, spec.mass_norm, spec.max_kept
    B, H, D = q_last.shape
    _, KV, L, _ = k.shape
    n_max = keep_rank.shape[-1]
    check_heads(H, KV)
    check_head_dim(D)
    if max_kept is None:
        raise ValueError("the Triton selection needs spec.max_kept (the output width, without a host sync)")
    if block_size & (block_size - 1) or not 0 < n_max * block_size <= L:
        raise ValueError(f"bad geometry: n_max={n_max}, block_size={block_size}, L={L}")
    if isinstance(n_blocks, int) and n_blocks != n_max:
        raise ValueError(f"n_blocks={n_blocks} but keep_rank has {n_max} ranks")
    if keep_rank.dim() == 3 and keep_rank.shape[0] != B:
        raise ValueError(f"per-row keep_rank has {keep_rank.shape[0]} rows for a batch of {B}")
    if mass_norm not in ("sum", "max"):
        raise ValueError(f"mass_norm must be 'sum' or 'max', got {mass_norm!r}")
    if q_last.stride(-1) != 1:
        q_last = q_last.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    key_start, n_rows = _rows(n_blocks, key_start, B, k.device)
    logits, pmax, psum = step_logits(q_last, k, key_start, scaling)
    s, mass, h = step_importance(logits, pmax, psum, n_max, block_size, alpha, mass_norm, key_start, n_rows)
    if choose is not None:  # keep counts from this request's importance (adaptive.py), on the device
        keep_rank = choose(s.view(B, KV, L), h.view(B, KV, n_max), spec)
    keep = step_keep(h, keep_rank)
    sel, count, csum = step_select(s, keep, key_start, mass, n_max, block_size, KV, n_rows)
    kept_idx = step_pack(sel, count, csum, n_max, block_size, max_kept, key_start, pad=L)
    kept_len = csum[:, -1].reshape(B, KV)
    retained = mass.sum(-1).reshape(B, KV)  # kept global mass + local region mass
    return kept_idx.view(B, KV, max_kept), kept_len, retained, s.view(B, KV, L)
