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

Options last_q = r > 1 and gqa="union" (`select_and_pack_window_triton`, semantics exactly
`select.select_and_pack_window_ref`): A and B become
  A' `_window_stats_kernel` grid (B*KV, L-splits, row tiles): per-chunk softmax max and sum of exp
                        of the causal rows of the last r queries of the g query heads (query
                        L - r + i sees the valid keys <= L - r + i), from a dot (only the stats
                        leave the kernel);
  B' `_window_importance_kernel` grid (selection rows, cdiv(L, b)): per block of keys, each of its
                        rows' r * (g or 1) softmax rows recomputed (a dot of 16-64 rows against
                        the block, as A; equal keys get equal logits) and pooled: s = the mean
                        over the real queries (and, shared, the query heads); with r > 1 also
                        the same mean over each query's own band (what it attends besides the
                        kept keys, for the retained mass);
  C' `_window_select_kernel` as C over the selection rows of a KV head (one, or g with union: each
                        selects with its keep counts, the KV head keeps the union); the block's
                        retained mass adds the band mass of the tokens not kept.
Nothing of size r * L is stored; with r = 1 and "shared" it is the paper's rule path above.

Option span = k > 1 (both paths): kernels C / C' rank the tokens of a block by
selection.span_scores(s, k) (s plus its stride-1 max-pool of width k: one launch of
_span_kernel between B and C, writing a (rows, L) fp32 score) instead of s; the kept mass is
still summed from s. (Computing it inside C / C' instead made C' 4x slower on an H100: 239 ->
1030 us at 128K, twelfth session.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...engine.plan import rows_blocks
from ...engine.triton_common import check_head_dim, check_heads, interpreted, next_pow2
from .select import WINDOW_MIN_BLOCK, KeepChooser, SelectionSpec


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
    _store_block(S, MASS, H, bh, j, s, cols, in_l, nb, L, n_max, w_mass, w_conc)


@triton.jit
def _store_block(S, MASS, H, row, j, s, cols, in_l, nb, L, n_max, w_mass, w_conc):
    """Row `row`'s block j: s at cols, its mass, and h of Eq. 6 for j < nb (-inf for nb <= j < n_max)."""
    tl.store(S + row.to(tl.int64) * L + cols, s, mask=in_l)
    mass = tl.sum(s, 0)
    tl.store(MASS + row * tl.num_programs(1) + j, mass)
    if j < n_max:
        sq = tl.sum(s * s, 0)
        mc = tl.maximum(mass, 1e-30)
        den = tl.where(mass > 0, mc * mc, 1.0)  # as the reference where mass > 0; no 0/0 elsewhere
        conc = tl.where(mass > 0, 1.0 - sq / den, 0.0)
        hj = tl.where(j < nb, w_mass * mass + w_conc * conc, float("-inf"))
        tl.store(H + row * n_max + j, hj)


@triton.jit
def _block_rank(s_i, ar):
    """Stable descending rank of each token of a block: #{s_j > s_i} + #{j < i, s_j == s_i}
    (a b x b comparison tile; exactly the rank of a stable descending argsort)."""
    before = (s_i[None, :] > s_i[:, None]) | ((s_i[None, :] == s_i[:, None]) & (ar[None, :] < ar[:, None]))
    return tl.sum(before.to(tl.int32), 1)


@triton.jit
def _span_kernel(S, RANK, L, HALF: tl.constexpr, BLOCK: tl.constexpr):
    """Option span = 2 HALF + 1: RANK = S plus the largest S within HALF positions on either side
    inside [0, L), row by row (selection.span_scores: a stride-1 max-pool padded with -inf, then
    s + pool, the same fp32 add: equal bit for bit). One launch for all rows."""
    row = tl.program_id(0)
    idx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < L
    s_row = S + row.to(tl.int64) * L
    pool = tl.full([BLOCK], float("-inf"), tl.float32)
    for o in tl.static_range(2 * HALF + 1):
        p = idx + (o - HALF)
        pool = tl.maximum(pool, tl.load(s_row + p, mask=ok & (p >= 0) & (p < L), other=float("-inf")))
    tl.store(RANK + row.to(tl.int64) * L + idx, tl.load(s_row + idx, mask=ok, other=0.0) + pool, mask=ok)


@triton.jit
def _select_kernel(
    S, RANK, KEEP, KEY_START, NB, SEL, COUNT, MASS,
    L, KV, n_max, n_mass,
    BLOCK: tl.constexpr,
):
    """SEL (B*KV, n_max*b) int8, block-relative; COUNT (B*KV, n_max) int32; MASS[:, j] <- kept mass
    of global block j (j < n_r; the masses of the row's local blocks are left as they are).
    Tokens rank by RANK (S itself, or its span scores: _span_kernel), the mass is S's."""
    bh = tl.program_id(0)
    j = tl.program_id(1)
    b = bh // KV
    ks = tl.load(KEY_START + b)
    nb = tl.load(NB + b)
    ar = tl.arange(0, BLOCK)
    glob = (j * BLOCK + ar) < nb * BLOCK  # (BLOCK,) all True iff block j is one of the row's global blocks
    idx = ks + j * BLOCK + ar  # absolute positions of the row's block j
    s_i = tl.load(S + bh.to(tl.int64) * L + idx, mask=glob & (idx < L), other=0.0)  # (needs s_r + n_r b <= L)
    rank = _block_rank(tl.load(RANK + bh.to(tl.int64) * L + idx, mask=glob & (idx < L), other=0.0), ar)
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


# -- option last_q = r (and gqa="union"): the causal softmax rows of the last r queries ---------
@triton.jit
def _window_stats_kernel(
    Q, K, KEY_START, PMAX, PSUM,
    s_qb, s_qh, s_ql, s_kb, s_kh, s_kl,
    L, KV, n_splits, chunk, scaling,
    G: tl.constexpr, R: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """PMAX/PSUM (B*KV, G*R, n_splits) fp32: each chunk's softmax max and sum of exp of the causal
    row of query L - R + i of query head hq (row hq * R + i): keys in [key_start, L - R + i].
    Only these statistics leave the kernel, so its logits may come from a dot (any summation order)."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // KV
    h = bh % KV
    rows = tl.program_id(2) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < G * R
    qpos = L - R + rows % R
    d = tl.arange(0, HEAD_D)
    q_ptr = Q + b.to(tl.int64) * s_qb + (h * G + rows // R).to(tl.int64) * s_qh + (rows % R) * s_ql
    q = tl.load(q_ptr[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)  # (ROWS, D)
    if UPCAST:
        q = q.to(tl.float32)
    ks = tl.load(KEY_START + b)
    k_base = K + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    cols = tl.arange(0, BLOCK_N)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    start = split * chunk
    end = tl.minimum(start + chunk, L)
    for k0 in range(start, end, BLOCK_N):
        kid = k0 + cols
        in_l = kid < end
        k = tl.load(k_base + kid[:, None].to(tl.int64) * s_kl + d[None, :], mask=in_l[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        x = tl.dot(q, tl.trans(k), input_precision=PREC) * scaling  # (ROWS, BLOCK_N)
        ok = (in_l & (kid >= ks))[None, :] & (kid[None, :] <= qpos[:, None])
        x = tl.where(ok, x, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(x, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key seen yet: no NaN
        l_i = l_i * tl.exp(m_i - m_use) + tl.sum(tl.exp(x - m_use[:, None]), 1)
        m_i = m_new
    st = (bh * G * R + rows) * n_splits + split
    tl.store(PMAX + st, m_i, mask=row_ok)
    tl.store(PSUM + st, l_i, mask=row_ok)


@triton.jit
def _row_lse_kernel(PMAX, PSUM, M, LS, n_rows, n_splits, ROWS: tl.constexpr, SPLITS_P: tl.constexpr):
    """M, LS (n_rows,) fp32: each softmax row's max and sum of exp from its per-chunk statistics
    (PMAX/PSUM (n_rows, n_splits)); a row with no key gets (0, 1): it contributes nothing."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    sp = tl.arange(0, SPLITS_P)
    st = rows[:, None].to(tl.int64) * n_splits + sp[None, :]
    ok = (rows < n_rows)[:, None] & (sp < n_splits)[None, :]
    pm = tl.load(PMAX + st, mask=ok, other=float("-inf"))
    ps = tl.load(PSUM + st, mask=ok, other=0.0)
    m = tl.max(pm, 1)
    m = tl.where(m == float("-inf"), 0.0, m)
    l = tl.sum(ps * tl.exp(pm - m[:, None]), 1)
    tl.store(M + rows, m, mask=rows < n_rows)
    tl.store(LS + rows, tl.where(l > 0, l, 1.0), mask=rows < n_rows)


@triton.jit
def _window_rows(q_base, M, LS, t, s_qh, s_ql, d, n, R: tl.constexpr, UPCAST: tl.constexpr):
    """Rows t (< n) of a selection row: (q (RD, D), softmax max, sum of exp); row t is query
    L - R + t % R of the selection row's query head t // R (q_base, M, LS: at its first head)."""
    ok = t < n
    q = tl.load(q_base + (t // R)[:, None].to(tl.int64) * s_qh + (t % R)[:, None] * s_ql + d[None, :],
                mask=ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    return q, tl.load(M + t, mask=ok, other=0.0), tl.load(LS + t, mask=ok, other=1.0)


@triton.jit
def _window_importance_kernel(
    Q, K, KEY_START, NB, M, LS, S, MASS, H, SB,
    s_qb, s_qh, s_ql, s_kb, s_kh, s_kl,
    L, KV, n_max, scaling, window, w_mass, w_conc,
    G: tl.constexpr, HP: tl.constexpr, R: tl.constexpr, RD: tl.constexpr, BLOCK: tl.constexpr,
    HEAD_D: tl.constexpr, DK: tl.constexpr, BAND: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """Selection row sr = (b, KV head, part) pools the HP query heads hq0 .. hq0 + HP - 1 of its
    KV head (HP = G: one row per KV head; HP = 1: one per query head, gqa="union"). Its block j
    of keys (from key_start, as _importance_kernel) gets s = the mean over the real ones of the R
    queries and over the HP heads of their causal softmax rows, recomputed per key: logits by a
    dot of RD rows at a time against the block (exact products, fp32 sums in an order that does
    not depend on the key's place: equal keys, equal s). Stores as _importance_kernel (S, MASS, H
    per selection row), and with BAND, SB (rows, n_max*b) block-relative over the row's global blocks: the same
    mean restricted to each query's dense band [band_lo_i, itself] (engine.plan.band_start), what
    each query attends besides the kept keys (the window retained mass). DK < HEAD_D: the dot
    runs over D in chunks of DK (with one pipeline stage: shared memory, see DOT_TILE_BYTES); the
    chunk sums are in the same order for every key."""
    sr = tl.program_id(0)
    j = tl.program_id(1)
    bh = sr // (G // HP)
    hq0 = (sr % (G // HP)) * HP
    b = bh // KV
    h = bh % KV
    ks = tl.load(KEY_START + b).to(tl.int32)
    nb = tl.load(NB + b).to(tl.int32)
    ar = tl.arange(0, BLOCK)
    pad = j * BLOCK + ar  # program j also zeroes its share of the padding [0, key_start)
    tl.store(S + sr.to(tl.int64) * L + pad, tl.zeros([BLOCK], dtype=tl.float32), mask=pad < ks)
    cols = ks + j * BLOCK + ar  # the row's block j (int32: L < 2^31)
    in_l = cols < L
    d = tl.arange(0, HEAD_D)
    k_base = K + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    if DK == HEAD_D:  # the whole key tile once, reused by every row tile
        k = tl.load(k_base + cols[:, None].to(tl.int64) * s_kl + d[None, :], mask=in_l[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
    local_start = ks + nb * BLOCK
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    band = tl.zeros([BLOCK], dtype=tl.float32)
    q_base = Q + b.to(tl.int64) * s_qb + (h * G + hq0).to(tl.int64) * s_qh
    st_base = bh * G * R + hq0 * R  # the rows' statistics
    for t0 in range(0, HP * R, RD):  # RD of the HP * R rows at a time
        t = t0 + tl.arange(0, RD)
        qpos = L - R + t % R
        if DK == HEAD_D:
            q, m, l = _window_rows(q_base, M + st_base, LS + st_base, t, s_qh, s_ql, d, HP * R, R, UPCAST)
            x = tl.dot(q, tl.trans(k), input_precision=PREC)  # (RD, BLOCK)
        else:
            x = tl.zeros([RD, BLOCK], dtype=tl.float32)
            for c in tl.static_range(HEAD_D // DK):
                dc = c * DK + tl.arange(0, DK)
                q, m, l = _window_rows(q_base, M + st_base, LS + st_base, t, s_qh, s_ql, dc, HP * R, R, UPCAST)
                kc = tl.load(k_base + cols[:, None].to(tl.int64) * s_kl + dc[None, :], mask=in_l[:, None], other=0.0)
                if UPCAST:
                    kc = kc.to(tl.float32)
                x += tl.dot(q, tl.trans(kc), input_precision=PREC)
        x = x * scaling
        ok = (t < HP * R)[:, None] & in_l[None, :] & (cols[None, :] <= qpos[:, None])  # a query on padding: no key
        p = tl.where(ok, tl.exp(x - m[:, None]) / l[:, None], 0.0)
        acc += tl.sum(p, 0)
        if BAND:
            lo = qpos - window + 1
            band_lo = tl.where(qpos >= local_start, tl.minimum(lo, local_start), lo)
            band += tl.sum(tl.where(cols[None, :] >= band_lo[:, None], p, 0.0), 0)
    n_real = tl.maximum(tl.minimum(L - ks, R), 1)  # queries at or after key_start
    s = acc / n_real.to(tl.float32) / HP
    _store_block(S, MASS, H, sr, j, s, cols, in_l, nb, L, n_max, w_mass, w_conc)
    if BAND:
        if j < nb:
            tl.store(SB + sr.to(tl.int64) * n_max * BLOCK + j * BLOCK + ar, band / n_real.to(tl.float32) / HP)


@triton.jit
def _window_select_kernel(
    S, RANK, SB, KEEP, KEY_START, NB, SEL, COUNT, MASS_IN, MASS,
    L, KV, n_max, n_mass,
    GS: tl.constexpr, GSP: tl.constexpr, BLOCK: tl.constexpr, BAND: tl.constexpr,
):
    """_select_kernel over the GS selection rows of a KV head (GS = 1: shared; g: gqa="union",
    one per query head): each row selects its top keep[row, j] of block j, the KV head keeps the
    union -> SEL, COUNT per KV head. MASS (B*KV, n_mass)[j] for the row's global blocks: the mean
    over its rows of s on the kept keys (+ SB on the others with BAND); with GS > 1 also its local
    blocks, j >= nb: the mean of the rows' block masses MASS_IN (GS = 1: MASS_IN is MASS, left as is).
    Tokens rank by RANK (S itself, or its span scores: _span_kernel)."""
    bh = tl.program_id(0)
    j = tl.program_id(1)
    b = bh // KV
    ks = tl.load(KEY_START + b)
    nb = tl.load(NB + b)
    ar = tl.arange(0, BLOCK)
    if j < n_max:
        glob = (j * BLOCK + ar) < nb * BLOCK
        idx = ks + j * BLOCK + ar
        sel = ar < 0  # nothing yet
        for t in range(GS):
            row = bh * GS + t
            s_i = tl.load(RANK + row.to(tl.int64) * L + idx, mask=glob & (idx < L), other=0.0)
            keep = tl.load(KEEP + row * n_max + j)
            sel = sel | ((_block_rank(s_i, ar) < keep) & glob)
        tl.store(SEL + bh.to(tl.int64) * n_max * BLOCK + j * BLOCK + ar, sel.to(tl.int8))
        tl.store(COUNT + bh * n_max + j, tl.sum(sel.to(tl.int32), 0))
        if j < nb:
            kept = tl.zeros([BLOCK], dtype=tl.float32)
            for t in range(GS):
                row = bh * GS + t
                s_i = tl.load(S + row.to(tl.int64) * L + idx, mask=glob & (idx < L), other=0.0)
                part = tl.where(sel, s_i, 0.0)
                if BAND:  # what each query sees of the tokens not kept: its band
                    part += tl.where(sel, 0.0, tl.load(SB + row.to(tl.int64) * n_max * BLOCK + j * BLOCK + ar))
                kept += part
            tl.store(MASS + bh * n_mass + j, tl.sum(kept, 0) / GS)
    if GS > 1:
        if j >= nb:
            t = tl.arange(0, GSP)
            local = tl.load(MASS_IN + (bh * GS + t) * n_mass + j, mask=t < GS, other=0.0)
            tl.store(MASS + bh * n_mass + j, tl.sum(local, 0) / GS)


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
    if mass_norm == "max":
        h = _max_mass_term(h, mass, nb, alpha)
    return s, mass, h


def _max_mass_term(h: torch.Tensor, mass: torch.Tensor, nb: torch.Tensor, alpha: float) -> torch.Tensor:
    """h (rows, n) + (1 - alpha) * the mass of each of the row's own global blocks over their
    largest (mass_norm "max"); the rows of batch row b are consecutive, nb (B,) their block counts."""
    n = h.shape[-1]
    own = torch.arange(n, device=h.device)[None, :] < nb.repeat_interleave(h.shape[0] // nb.shape[0])[:, None]
    gm = torch.where(own, mass[:, :n], torch.zeros_like(h))
    return h + (1.0 - alpha) * (gm / gm.amax(-1, keepdim=True).clamp_min(1e-30))


def step_keep(h: torch.Tensor, keep_rank: torch.Tensor) -> torch.Tensor:
    """Block ranks -> keep count per block: keep_rank (KV, n) or (B, KV, n) scattered by the stable
    descending order of h (B*KV, n)."""
    KV, n = keep_rank.shape[-2:]
    hv = h.view(-1, KV, n)
    order = torch.argsort(hv, dim=-1, descending=True, stable=True)
    keep = torch.empty(hv.shape, dtype=torch.int32, device=h.device)
    return keep.scatter_(-1, order, keep_rank.to(device=h.device, dtype=torch.int32).expand(hv.shape))


def step_span(s: torch.Tensor, span: int) -> torch.Tensor:
    """The in-block ranking scores of s (rows, L): s itself (span 1), else selection.span_scores(s,
    span) in one kernel launch."""
    if span <= 1:
        return s
    rows, L = s.shape
    block = 128 if interpreted() else 1024
    rank = torch.empty_like(s)
    _span_kernel[(rows, triton.cdiv(L, block))](s, rank, L, HALF=span // 2, BLOCK=block, num_warps=4)
    return rank


def step_select(s, keep, key_start, mass, n_blocks: int, block_size: int, kv_heads: int,
                n_rows: torch.Tensor | None = None, span: int = 1):
    """Kernel C (+ cumsum). Overwrites mass[:, j] (j < n_r) with the kept mass of each global block.
    n_blocks: n_max; n_rows (B,): per-row block counts (default n_blocks); span (odd): tokens rank
    inside their block by selection.span_scores(s, span) (step_span; 1: by s).

    -> selection (B*KV, n_max*b) int8, counts and inclusive cumsum (B*KV, n_max) int32."""
    BKV, L = s.shape
    n, bs = n_blocks, block_size
    key_start, nb = _rows(n if n_rows is None else n_rows, key_start, BKV // kv_heads, s.device)
    sel = torch.empty(BKV, n * bs, dtype=torch.int8, device=s.device)
    count = torch.empty(BKV, n, dtype=torch.int32, device=s.device)
    _select_kernel[(BKV, n)](
        s, step_span(s, span), keep, key_start, nb, sel, count, mass, L, kv_heads, n, mass.shape[1], BLOCK=bs,
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


def _check(B: int, H: int, D: int, k: torch.Tensor, spec: SelectionSpec) -> None:
    """The shapes and options the fused selection supports (ValueError otherwise)."""
    _, KV, L, _ = k.shape
    n_max, block_size = spec.keep_rank.shape[-1], spec.block_size
    check_heads(H, KV)
    check_head_dim(D)
    if spec.max_kept is None:
        raise ValueError("the Triton selection needs spec.max_kept (the output width, without a host sync)")
    if block_size & (block_size - 1) or not 0 < n_max * block_size <= L:
        raise ValueError(f"bad geometry: n_max={n_max}, block_size={block_size}, L={L}")
    if isinstance(spec.n_blocks, int) and spec.n_blocks != n_max:
        raise ValueError(f"n_blocks={spec.n_blocks} but keep_rank has {n_max} ranks")
    if spec.keep_rank.dim() == 3 and spec.keep_rank.shape[0] != B:
        raise ValueError(f"per-row keep_rank has {spec.keep_rank.shape[0]} rows for a batch of {B}")
    if spec.mass_norm not in ("sum", "max"):
        raise ValueError(f"mass_norm must be 'sum' or 'max', got {spec.mass_norm!r}")


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


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
    _check(B, H, D, k, spec)
    q_last, k = _last_dim_contiguous(q_last), _last_dim_contiguous(k)
    key_start, n_rows = _rows(n_blocks, key_start, B, k.device)
    logits, pmax, psum = step_logits(q_last, k, key_start, scaling)
    s, mass, h = step_importance(logits, pmax, psum, n_max, block_size, alpha, mass_norm, key_start, n_rows)
    if choose is not None:  # keep counts from this request's importance (adaptive.py), on the device
        keep_rank = choose(s.view(B, KV, L), h.view(B, KV, n_max), spec)
    keep = step_keep(h, keep_rank)
    sel, count, csum = step_select(s, keep, key_start, mass, n_max, block_size, KV, n_rows, spec.span)
    kept_idx = step_pack(sel, count, csum, n_max, block_size, max_kept, key_start, pad=L)
    kept_len = csum[:, -1].reshape(B, KV)
    retained = mass.sum(-1).reshape(B, KV)  # kept global mass + local region mass
    return kept_idx.view(B, KV, max_kept), kept_len, retained, s.view(B, KV, L)


# -- options last_q = r and gqa="union" (semantics: select.select_and_pack_window_ref) ----------
def _dot_args(q: torch.Tensor, k: torch.Tensor) -> tuple[bool, str]:
    """(upcast, input_precision) of the stats kernel's dot: fp32 operands an exact fp32 dot
    ("ieee", not tf32); bf16/fp16 a native one (exact products, fp32 sums), upcast to fp32 under
    the interpreter (whose bf16 dot is wrong) or when q and k differ in dtype."""
    up = q.dtype != k.dtype or (interpreted() and q.dtype != torch.float32)
    return up, "ieee" if up or q.dtype == torch.float32 else "tf32"


def step_window_stats(q_win: torch.Tensor, k: torch.Tensor, key_start: torch.Tensor, scaling: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1: q_win (B, H, r, D) the last r queries. -> per-chunk max and sum of exp of their
    causal softmax rows, (B*KV, g*r, n_splits) fp32 each (row hq * r + i: query head hq, query L - r + i)."""
    B, H, r, D = q_win.shape
    _, KV, L, _ = k.shape
    n = (H // KV) * r
    up, prec = _dot_args(q_win, k)
    fp32 = prec == "ieee"  # an fp32 dot runs on FMAs: smaller tiles (no register spills on sm_90)
    rows = min(max(16, next_pow2(n)), max(16, (2048 if fp32 else 8192) // D))  # a (rows, D) query tile
    tiles = triton.cdiv(n, rows)
    block_n = 128 if interpreted() else (32 if fp32 and D >= 128 else 64)
    chunk, n_splits = _splits(L, block_n, B * KV * tiles)
    pmax = torch.empty(B * KV, n, n_splits, dtype=torch.float32, device=k.device)
    psum = torch.empty_like(pmax)
    _window_stats_kernel[(B * KV, n_splits, tiles)](
        q_win, k, key_start, pmax, psum,
        q_win.stride(0), q_win.stride(1), q_win.stride(2), k.stride(0), k.stride(1), k.stride(2),
        L, KV, n_splits, chunk, scaling,
        G=H // KV, R=r, ROWS=rows, BLOCK_N=block_n, HEAD_D=D, PREC=prec, UPCAST=up, num_warps=4,
    )
    return pmax, psum


def row_lse(pmax: torch.Tensor, psum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1's per-chunk statistics (..., n_splits) combined -> each row's max and sum of exp (...)."""
    n_splits = pmax.shape[-1]
    n = pmax.numel() // n_splits
    m = torch.empty(pmax.shape[:-1], dtype=torch.float32, device=pmax.device)
    ls = torch.empty_like(m)
    sp = max(2, next_pow2(n_splits))
    rows = max(2, min(64, 4096 // sp))
    _row_lse_kernel[(triton.cdiv(n, rows),)](pmax, psum, m, ls, n, n_splits, ROWS=rows, SPLITS_P=sp, num_warps=4)
    return m, ls


# bytes of one (BLOCK, DK) key tile of the window importance dot. Shared memory of the kernel
# compiled for sm_90 (fp32, D = 256, b = 128, 64 dot rows): triton 3.6 asks 266240 bytes with its
# default 3 pipeline stages (H100/H200 have 232448), whatever the D chunk (the key chunks are loop
# invariant, hoisted out of the row loop, and the row loads are pipelined); 163840 with one stage
# and D chunks of 128, 196608 with one stage unchunked; triton 3.9 asks 98304 (tests/test_triton_select.py
# compiles these shapes for sm_90 on the CPU). So a tile above DOT_TILE_BYTES runs chunked, unpipelined.
DOT_TILE_BYTES = 64 * 1024
DEFAULT_STAGES = 3  # triton's default num_stages on NVIDIA


def dot_chunk(block_size: int, head_dim: int, elt_bytes: int) -> int:
    """The D chunk of the window importance dot: head_dim when a (block_size, head_dim) tile of
    elt_bytes elements fits DOT_TILE_BYTES, else the largest power-of-two divisor that does (>= 16)."""
    dk = head_dim
    while dk > 16 and dk % 2 == 0 and block_size * dk * elt_bytes > DOT_TILE_BYTES:
        dk //= 2
    return dk


def window_importance_stages(block_size: int, head_dim: int, elt_bytes: int) -> int:
    """Pipeline stages of the window importance kernel: one where a (block_size, head_dim) key
    tile exceeds DOT_TILE_BYTES (fp32, b = 128, D = 256: shared memory above, measured), else triton's default."""
    return 1 if block_size * head_dim * elt_bytes > DOT_TILE_BYTES else DEFAULT_STAGES


def step_window_importance(q_win, k, pmax, psum, key_start: torch.Tensor, n_rows: torch.Tensor, n_blocks: int,
                           block_size: int, alpha: float, mass_norm: str, scaling: float, window: int,
                           per_head: bool = False):
    """Pass 2 (+ the "max" mass term) on pass 1's statistics; key_start, n_rows (B,) int64.
    -> s (rows, L), block masses (rows, cdiv(L, b)), h (rows, n_max), and for r > 1 the band
    importance (rows, n_max*b) (else None); rows = B*KV selection rows, B*KV*g with per_head."""
    B, H, r, D = q_win.shape
    _, KV, L, _ = k.shape
    g = H // KV
    hp = 1 if per_head else g
    rows, nb_all, dev = B * KV * (g // hp), triton.cdiv(L, block_size), k.device
    s = torch.empty(rows, L, dtype=torch.float32, device=dev)
    mass = torch.empty(rows, nb_all, dtype=torch.float32, device=dev)
    h = torch.empty(rows, n_blocks, dtype=torch.float32, device=dev)
    band = torch.empty(rows, n_blocks * block_size, dtype=torch.float32, device=dev) if r > 1 else None
    m, ls = row_lse(pmax, psum)
    # rows per dot: at least 16 (tl.dot), at most 64 (the (rd, D) query tile), an (rd, b) fp32
    # tile of at most 8K elements
    up, prec = _dot_args(q_win, k)
    rd = max(16, min(next_pow2(hp * r), 64, 8192 // block_size))
    elt = 4 if prec == "ieee" else q_win.element_size()
    dk = dot_chunk(block_size, D, elt)
    _window_importance_kernel[(rows, nb_all)](
        q_win, k, key_start, n_rows, m, ls, s, mass, h, s if band is None else band,
        q_win.stride(0), q_win.stride(1), q_win.stride(2), k.stride(0), k.stride(1), k.stride(2),
        L, KV, n_blocks, scaling, window, 0.0 if mass_norm == "max" else 1.0 - alpha, alpha,
        G=g, HP=hp, R=r, RD=rd, BLOCK=block_size, HEAD_D=D, DK=dk, BAND=band is not None, PREC=prec, UPCAST=up,
        num_warps=4 if rd * block_size <= 4096 else 8, num_stages=window_importance_stages(block_size, D, elt),
    )
    if mass_norm == "max":
        h = _max_mass_term(h, mass, n_rows, alpha)
    return s, mass, h, band


def step_window_select(s, band, keep, key_start: torch.Tensor, n_rows: torch.Tensor, mass, n_blocks: int,
                       block_size: int, kv_heads: int, rows_per_kv: int = 1, span: int = 1):
    """Kernel C over rows_per_kv selection rows per KV head (1, or g for gqa="union": the union);
    span (odd): tokens rank inside their block by selection.span_scores(s, span) (step_span).
    -> selection (B*KV, n_max*b) int8, counts and inclusive cumsum (B*KV, n_max) int32, and the
    block masses (B*KV, cdiv(L, b)) whose sum is the retained mass (rows_per_kv = 1: `mass`
    itself, its global blocks overwritten)."""
    rows, L = s.shape
    bkv, n, n_mass = rows // rows_per_kv, n_blocks, mass.shape[1]
    sel = torch.empty(bkv, n * block_size, dtype=torch.int8, device=s.device)
    count = torch.empty(bkv, n, dtype=torch.int32, device=s.device)
    out = mass if rows_per_kv == 1 else torch.empty(bkv, n_mass, dtype=torch.float32, device=s.device)
    _window_select_kernel[(bkv, n if rows_per_kv == 1 else n_mass)](
        s, step_span(s, span), s if band is None else band, keep, key_start, n_rows, sel, count, mass, out,
        L, kv_heads, n, n_mass,
        GS=rows_per_kv, GSP=next_pow2(rows_per_kv), BLOCK=block_size, BAND=band is not None,
        num_warps=4 if block_size <= 64 else 8,
    )
    return sel, count, torch.cumsum(count, dim=-1, dtype=torch.int32), out


def select_and_pack_window_triton(
    q_win: torch.Tensor, k: torch.Tensor, spec: SelectionSpec, scaling: float, window: int,
    union: bool = False, choose: KeepChooser | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Options last_q = r and gqa="union" of the fused selection: q_win (B, H, r, D) the last r
    queries (positions L - r .. L - 1), k (B, KV, L, D), spec as select_and_pack_triton; window:
    the local window w (each pooled query's band, for the retained mass). union: every query head
    selects with its own importance and its KV head's keep counts, the KV head keeps the union
    (spec.max_kept must then bound the union, e.g. min(g * max_kept, n_max * b)).

    -> as select_and_pack_triton; retained is the window's (selection.window_retained); s (B, KV,
       L) the importance pooled over the r queries and the group's query heads. r = 1 without
       union is select_and_pack_triton itself. Semantics: select.select_and_pack_window_ref.
    Two passes over the keys: the r queries' row statistics (max, sum of exp per chunk, then
    folded per row), then per block of keys their softmax rows recomputed and pooled (nothing of
    size r * L is stored). Launches: 5 Triton kernels, a fill, an argsort + scatter, a cumsum and
    a sum (+ a mean and a repeat of keep_rank with union, a few elementwise ops for "max"). No
    host synchronisation.
    """
    B, H, r, D = q_win.shape
    _, KV, L, _ = k.shape
    if r == 1 and not union:
        return select_and_pack_triton(q_win[:, :, 0], k, spec, scaling, choose)
    _check(B, H, D, k, spec)
    if not 1 <= r <= L:
        raise ValueError(f"last_q={r} must be in [1, L={L}]")
    if spec.block_size < WINDOW_MIN_BLOCK:
        raise ValueError(f"the fused last_q/union selection needs block_size >= {WINDOW_MIN_BLOCK} (a dot tile), "
                         f"got {spec.block_size}; backend='auto' runs the reference for smaller blocks")
    if union and choose is not None:
        raise ValueError("keep counts chosen per request (floor) and gqa='union' do not combine")
    g, n_max, b = H // KV, spec.n_max, spec.block_size
    q_win, k = _last_dim_contiguous(q_win), _last_dim_contiguous(k)
    key_start, n_rows = _rows(spec.n_blocks, spec.key_start, B, k.device)
    pmax, psum = step_window_stats(q_win, k, key_start, scaling)
    s, mass, h, band = step_window_importance(q_win, k, pmax, psum, key_start, n_rows, n_max, b, spec.alpha,
                                              spec.mass_norm, scaling, window, per_head=union)
    s_kv = s.view(B, KV, g, L).mean(2) if union else s.view(B, KV, L)
    keep_rank = spec.keep_rank
    if choose is not None:  # keep counts from this request's importance (adaptive.py), on the device
        keep_rank = choose(s_kv, h.view(B, KV, n_max), spec)
    if union:  # each query head its KV head's keep counts
        keep_rank = keep_rank.repeat_interleave(g, dim=-2)
    keep = step_keep(h, keep_rank)
    sel, count, csum, mass = step_window_select(s, band, keep, key_start, n_rows, mass, n_max, b, KV,
                                                g if union else 1, spec.span)
    kept_idx = step_pack(sel, count, csum, n_max, b, spec.max_kept, key_start, pad=L)
    return kept_idx.view(B, KV, spec.max_kept), csum[:, -1].reshape(B, KV), mass.sum(-1).reshape(B, KV), s_kv
