"""Triton block-sparse prefill: flash attention over each query block's listed key blocks and extra columns.

Semantics: exactly `block_reference.block_sparse_prefill_ref` (BlockPlan). Plan of the run: one
program per (query sub-tile, b * Hp). Its rows are the query heads that share the plan head's
list (g of them for a per-KV-head plan, else 1; padded to a power of two) x BLOCK_P positions of
one query block, so each K/V tile is loaded once for the whole group.
  1. Listed key blocks, ascending: those wholly at or before the sub-tile's first query form a
     prefix of the list and run without masks; the next ones, up to the last block that starts at
     or before the sub-tile's last query, are masked causally; later ones are never touched. Two
     binary searches over the list find the bounds.
  2. Extra columns, BLOCK_N at a time, K/V rows gathered; a column inside a listed key block is
     dropped (binary search of its block in the list), so it counts once.
Online softmax in fp32 (exp2 domain) through triton_common.attend_block_kb; rows that see no key
give zeros. Padding queries belong to no query block: the output starts as zeros.
In-loop skipping (SKIP, the plan's skip_threshold; BLASST): a step is one whole key block
(BLOCK_N = BLOCK_K). After its logits, each row whose block maximum is below its running maximum +
log2(lambda) drops the block (its logits become -inf: no change to acc, m_i, l_i); when every real
row of the tile drops it, the V load and P.V are skipped. Each row's dropped pairs are summed in
registers and added to the plan's counter once per program.
Key logit bias (key_bias=, plan.KeyBias; constexpr HAS_BIAS): added to the listed keys' logits at every
step (before the skipping decision), through triton_common.attend_block_kb / add_key_bias.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .plan import BlockPlan, KeyBias
from .triton_common import (
    LOG2E, add_key_bias, attend_block_kb, bias_args, block_scores, check_head_dim, check_heads, load_rows, next_pow2,
    online_update, precision, upcast,
)


@dataclass(frozen=True)
class BlockConfig:
    """Tile shape: up to block_m query rows (heads x positions of one query block) x block_n keys
    per online-softmax step (block_n is capped at the plan's block_k)."""

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2


# Per head dim defaults, the shapes of triton_prefill's pointer-load configs (not tuned for this kernel).
DEFAULT_CONFIGS: dict[int, BlockConfig] = {
    64: BlockConfig(128, 64, 4, 3),
    128: BlockConfig(128, 64, 8, 3),
    256: BlockConfig(64, 32, 4, 2),
}


def default_config(head_dim: int) -> BlockConfig:
    return DEFAULT_CONFIGS.get(head_dim, BlockConfig(64, 32, 4, 2))


@triton.jit
def _lower_bound(IDX, lo, hi, target, n_steps):
    """First e in [lo, hi) with IDX[e] >= target (hi if none), IDX ascending on [lo, hi); elementwise
    over tensors lo/hi/target of one shape. n_steps >= the bit length of the longest hi - lo."""
    for _ in range(n_steps):
        active = lo < hi
        mid = (lo + hi) // 2
        right = active & (tl.load(IDX + mid, mask=active, other=0) < target)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & ~right, mid, hi)
    return lo


@triton.jit
def _skip_step(acc, m_i, l_i, n_drop, q, v_src, kk, cols, d, k, ld, vis, n_vis, row_ok, lam2, qk_scale,
               BPOS, BVAL, rbase,
               MASKED: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, HAS_BIAS: tl.constexpr,
               NB: tl.constexpr):
    """One key block with in-loop skipping: rows whose block max (over visible keys) is below their
    running max + lam2 drop it (rows seeing none of it drop it too); P.V only if some real row keeps it.
    n_vis: visible keys per row (unmasked steps: BLOCK_N). -> (acc, m_i, l_i, n_drop)."""
    s = block_scores(q, k, qk_scale, UPCAST, PREC)
    if HAS_BIAS:
        s = add_key_bias(s, BPOS, BVAL, rbase, row_ok, kk + cols, NB)
    if MASKED:
        s = tl.where(vis, s, float("-inf"))
    smax = tl.max(s, 1)
    drop = (smax < m_i + lam2) | (smax == float("-inf"))
    n_drop += tl.where(drop & row_ok, n_vis, 0).to(tl.int64)
    if tl.max((row_ok & ~drop).to(tl.int32), 0) > 0:
        v = load_rows(v_src, kk, cols, d, ld, False, MASKED, False)
        s = tl.where(drop[:, None], float("-inf"), s)
        acc, m_i, l_i = online_update(acc, m_i, l_i, s, v, MASKED, UPCAST, PREC)
    return acc, m_i, l_i, n_drop


@triton.jit
def _block_prefill_kernel(
    Q, K, V, OUT, KEY_START, INDPTR, INDICES, EXTRA, SKIP_LOG2, DROPPED, BPOS, BVAL,
    s_qb, s_qh, s_ql,
    s_ob, s_ol, s_oh,
    L, KV, Hp, NQ, NNZ, C, n_tiles, n_steps, qk_scale,
    HG: tl.constexpr, GP: tl.constexpr, PER_KV: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, HAS_EXTRA: tl.constexpr,
    SKIP: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, HAS_BIAS: tl.constexpr, NB: tl.constexpr,
):
    """K/V (B, KV, L, D) contiguous; INDPTR (B, Hp, NQ + 1), INDICES (B, Hp, NNZ) int32; EXTRA
    (B, Hp, NQ, C) int64 (when HAS_EXTRA); KEY_START (B,) int64. HG query heads per plan head
    (padded to GP), PER_KV plan heads per KV head. SKIP: SKIP_LOG2 (B,) fp32 log2(lambda) per row,
    DROPPED (B, Hp * HG) int64 counters of dropped pairs; needs BLOCK_N == BLOCK_K. HAS_BIAS: BPOS/BVAL
    (B, Hp * HG, NB) the key logit bias."""
    BM: tl.constexpr = GP * BLOCK_P
    NCH: tl.constexpr = BLOCK_K // BLOCK_N  # steps per key block
    tile = n_tiles - 1 - tl.program_id(0)  # later query blocks (more keys) first
    i = tile // (BLOCK_Q // BLOCK_P)  # query block
    bh = tl.program_id(1)
    b = bh // Hp
    hp = bh % Hp
    ks = tl.load(KEY_START + b).to(tl.int32)
    p0 = ks + i * BLOCK_Q + tile % (BLOCK_Q // BLOCK_P) * BLOCK_P  # the sub-tile's first query
    p_last = tl.minimum(p0 + BLOCK_P - 1, L - 1)

    rows = tl.arange(0, BM)
    hrow = rows // BLOCK_P  # head inside the group
    prow = p0 + rows % BLOCK_P  # query position
    row_ok = (hrow < HG) & (prow < L)
    d = tl.arange(0, HEAD_D)
    qh = hp * HG + hrow
    q_ptrs = Q + b.to(tl.int64) * s_qb + qh[:, None] * s_qh + prow[:, None] * s_ql + d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)  # (BM, D)
    rbase = ((b * Hp * HG + qh) * NB).to(tl.int64)  # this row's key-bias slots
    kv_off = (b * KV + hp // PER_KV).to(tl.int64) * L * HEAD_D  # this KV head's (L, D) matrix
    k_src = K + kv_off
    v_src = V + kv_off

    acc = tl.zeros([BM, HEAD_D], dtype=tl.float32)
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    cols = tl.arange(0, BLOCK_N)

    # The query block's list [first, last); empty for a sub-tile past the row's end.
    plan_row = (b * Hp + hp).to(tl.int64)
    ptr = INDPTR + plan_row * (NQ + 1) + i
    first = tl.load(ptr)
    last = tl.where(p0 < L, tl.load(ptr + 1), first)
    idx = INDICES + plan_row * NNZ
    # Key block j ends at or before p0 iff j < (p0 - ks + 1) // BLOCK_K;
    # it starts after p_last iff j > (p_last - ks) // BLOCK_K.
    mid = _lower_bound(idx, first, last, (p0 - ks + 1) // BLOCK_K, n_steps)
    end = _lower_bound(idx, mid, last, (p_last - ks) // BLOCK_K + 1, n_steps)

    if SKIP:
        lam2 = tl.load(SKIP_LOG2 + b)
        n_drop = tl.zeros([BM], dtype=tl.int64)
        for t in range(first, mid):  # one key block a step; every row sees every key
            kk = ks + tl.load(idx + t) * BLOCK_K
            k = load_rows(k_src, kk, cols, d, None, False, False, False)
            acc, m_i, l_i, n_drop = _skip_step(acc, m_i, l_i, n_drop, q, v_src, kk, cols, d, k, None, None, BLOCK_N,
                                               row_ok, lam2, qk_scale, BPOS, BVAL, rbase, False, UPCAST, PREC,
                                               HAS_BIAS, NB)
        for t in range(mid, end):  # the diagonal: causal mask, the row's end
            kk = ks + tl.load(idx + t) * BLOCK_K
            k_pos = kk + cols
            ld = k_pos < L
            vis = k_pos[None, :] <= prow[:, None]
            k = load_rows(k_src, kk, cols, d, ld, False, True, False)
            acc, m_i, l_i, n_drop = _skip_step(acc, m_i, l_i, n_drop, q, v_src, kk, cols, d, k, ld, vis,
                                               tl.sum(vis.to(tl.int32), 1), row_ok, lam2, qk_scale, BPOS, BVAL, rbase,
                                               True, UPCAST, PREC, HAS_BIAS, NB)
        tl.atomic_add(DROPPED + b.to(tl.int64) * Hp * HG + qh, n_drop, mask=row_ok)
    else:
        for t in range(first * NCH, mid * NCH):  # every row sees every key: no mask
            kk = ks + tl.load(idx + t // NCH) * BLOCK_K + t % NCH * BLOCK_N
            k = load_rows(k_src, kk, cols, d, None, False, False, False)
            v = load_rows(v_src, kk, cols, d, None, False, False, False)
            acc, m_i, l_i = attend_block_kb(acc, m_i, l_i, q, k, v, None, qk_scale, kk + cols, BPOS, BVAL, rbase,
                                            row_ok, False, UPCAST, PREC, HAS_BIAS, NB)
        for t in range(mid * NCH, end * NCH):  # the diagonal: causal mask, the row's end
            kk = ks + tl.load(idx + t // NCH) * BLOCK_K + t % NCH * BLOCK_N
            k_pos = kk + cols
            ld = k_pos < L
            vis = k_pos[None, :] <= prow[:, None]
            k = load_rows(k_src, kk, cols, d, ld, False, True, False)
            v = load_rows(v_src, kk, cols, d, ld, False, True, False)
            acc, m_i, l_i = attend_block_kb(acc, m_i, l_i, q, k, v, vis, qk_scale, k_pos, BPOS, BVAL, rbase,
                                            row_ok, True, UPCAST, PREC, HAS_BIAS, NB)

    if HAS_EXTRA:
        ex = EXTRA + (plan_row * NQ + i) * C
        n_ex = tl.where(p0 < L, C, 0)
        lo0 = tl.zeros([BLOCK_N], dtype=tl.int32) + first
        hi0 = tl.zeros([BLOCK_N], dtype=tl.int32) + end  # blocks past `end` hold no visible key anyway
        for c0 in range(0, n_ex, BLOCK_N):
            ci = c0 + cols
            col = tl.load(ex + ci, mask=ci < C, other=-1).to(tl.int32)  # absolute positions
            ok = (col >= ks) & (col < L)
            cblk = tl.where(ok, (col - ks) // BLOCK_K, -1)
            pos = _lower_bound(idx, lo0, hi0, cblk, n_steps)
            listed = (pos < hi0) & (tl.load(idx + pos, mask=pos < hi0, other=-1) == cblk)
            ok = ok & ~listed  # a key of a listed block counts once
            vis = ok[None, :] & (col[None, :] <= prow[:, None])
            k = load_rows(k_src, 0, col, d, ok, False, True, False)  # gathered rows
            v = load_rows(v_src, 0, col, d, ok, False, True, False)
            acc, m_i, l_i = attend_block_kb(acc, m_i, l_i, q, k, v, vis, qk_scale, col, BPOS, BVAL, rbase,
                                            row_ok, True, UPCAST, PREC, HAS_BIAS, NB)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out = tl.where((l_i > 0)[:, None], out, 0.0)
    o_ptrs = OUT + b.to(tl.int64) * s_ob + prow[:, None] * s_ol + qh[:, None] * s_oh + d[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None])


def block_sparse_prefill_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan,
    scaling: float,
    config: BlockConfig | None = None,
    key_bias: KeyBias | None = None,
) -> torch.Tensor:
    """q (B, H, L, D), k/v (B, KV, L, D) -> out (B, L, H, D) in q's dtype.

    Checks shapes only (no sync); plan.validate checks values. config: tile shape (default per head dim);
    key_bias: the key logit bias (plan.KeyBias).
    """
    B, H, L, D = q.shape
    KV = k.shape[1]
    check_heads(H, KV)
    check_head_dim(D)
    Hp = plan.indptr.shape[1]
    if plan.indptr.shape[0] != B or Hp not in (H, KV) or plan.indices.shape[:2] != (B, Hp):
        raise ValueError(f"plan lists (B, Hp) = {tuple(plan.indptr.shape[:2])}, expected B = {B}, Hp in ({H}, {KV})")
    if plan.indptr.dtype != torch.int32 or plan.indices.dtype != torch.int32:
        raise ValueError("plan.indptr and plan.indices must be int32")
    extra = plan.extra_cols
    NQ = plan.n_qblocks
    if extra is not None and (extra.dtype != torch.int64 or extra.shape[:3] != (B, Hp, NQ)):
        raise ValueError(f"plan.extra_cols must be (B, Hp, NQ={NQ}, C) int64, got {tuple(extra.shape)} {extra.dtype}")
    hg = H // Hp  # query heads sharing a list
    gp = next_pow2(hg)
    cfg = config or default_config(D)
    skip = plan.skip_threshold is not None
    block_m, block_n = cfg.block_m, min(plan.block_k, cfg.block_n)
    if skip:  # one whole key block a step; fewer rows keep the (rows x keys) tile as large as the config's
        block_m = max(16, block_m * block_n // plan.block_k)
        block_n = plan.block_k
    block_p = min(plan.block_q, max(16, block_m // gp))  # positions per program (divides block_q)
    n_tiles = NQ * (plan.block_q // block_p)
    out = torch.zeros(B, L, H, D, dtype=q.dtype, device=q.device)  # padding queries stay zero
    if skip:
        lam, dropped = plan.skip_threshold, plan.skip_dropped
        if lam.shape != (B,) or dropped is None or dropped.shape != (B, H) or dropped.dtype != torch.int64:
            raise ValueError("plan.skip_threshold must be (B,) and plan.skip_dropped (B, H) int64")
        dropped.zero_()
        skip_log2 = torch.log2(lam.float()).to(q.device).contiguous()  # lambda 0 -> -inf: never drops
    if n_tiles == 0 or L == 0:
        return out
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    indices = plan.indices.contiguous()
    if indices.shape[-1] == 0:  # nothing listed: a dummy entry no list reaches
        indices = torch.zeros(B, Hp, 1, dtype=torch.int32, device=q.device)
    extra_arg = extra.contiguous() if extra is not None else indices  # unused without extra columns
    C = extra.shape[-1] if extra is not None else 0
    n_steps = triton.cdiv(L, plan.block_k).bit_length()  # a list holds at most cdiv(L, block_k) blocks
    bpos, bval, nb, has_bias = bias_args(key_bias, B, H, q.device, indices)
    _block_prefill_kernel[(n_tiles, B * Hp)](
        q, k, v, out, plan.key_start.to(q.device), plan.indptr.contiguous(), indices, extra_arg,
        skip_log2 if skip else q, dropped if skip else indices, bpos, bval,
        q.stride(0), q.stride(1), q.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        L, KV, Hp, NQ, indices.shape[-1], C, n_tiles, n_steps, scaling * LOG2E,
        HG=hg, GP=gp, PER_KV=Hp // KV, BLOCK_Q=plan.block_q, BLOCK_K=plan.block_k, BLOCK_P=block_p,
        BLOCK_N=block_n, HEAD_D=D, HAS_EXTRA=extra is not None and C > 0, SKIP=skip, UPCAST=upcast(q), PREC=precision(q),
        HAS_BIAS=has_bias, NB=nb, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
