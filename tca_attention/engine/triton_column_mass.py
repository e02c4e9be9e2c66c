"""Triton column mass: the attention probability each key receives (engine/column_mass.py's semantics).

Two passes, one (row, KV head) per program column, the g query heads of the KV head together
(rows = g_pad x BLOCK_P positions, as in the prefill kernel):
  1. `_row_lse_kernel`, per tile of weighted queries: each query's log-sum-exp over the keys it
     sees (log2 domain; +inf for a query that sees none, so its probabilities are 0);
  2. `_column_mass_kernel`, per key tile: walks the query tiles at or after the tile, adds
     weight[j] x exp2(s - lse_j) over the visible (query, key) pairs into the tile's column sums.
     No atomics: each key tile is owned by one program, so the result is deterministic.
Only the queries of nonzero weight are visited (compacted on the device, no host sync: SpAtten's
pruned tokens' queries cost nothing), and with a plan only the key blocks that keep a key or reach
a query's band (pass 1: `_block_needed`; pass 2: `key_tile_spans`).
Visibility: key_start[b] <= s <= j, and with a plan (HAS_PLAN) s kept or in query j's band (band_lo).
Work: two q.k passes over the causal triangle of the weighted queries (no P.V), about one dense
attention's dot products when every query counts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .column_mass import check_plan, kept_keys
from .plan import TokenPlan
from .triton_common import (
    LOG2E, band_lo, block_scores, check_head_dim, check_heads, load_rows, next_pow2, precision, upcast,
)


@dataclass(frozen=True)
class ColumnMassConfig:
    """Tiles: block_m query rows (g_pad heads x block_m / g_pad positions) x block_n keys."""

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 2


def default_config(head_dim: int) -> ColumnMassConfig:
    return ColumnMassConfig(64, 32, 4, 2) if head_dim > 128 else ColumnMassConfig()


@triton.jit
def _kept(KEEP, bh, k_idx, ld, L, HAS_PLAN: tl.constexpr):
    """(keys,) bool: the plan keeps the key (without a plan: unused)."""
    if HAS_PLAN:
        return tl.load(KEEP + bh.to(tl.int64) * L + k_idx, mask=ld, other=0) != 0
    else:
        return ld


@triton.jit
def _block_needed(TILE_KEPT, idx, in_band, HAS_PLAN: tl.constexpr):
    """Whether a key block can be visible: it keeps a key or reaches a row's band (no plan: always)."""
    if HAS_PLAN:
        return in_band | (tl.load(TILE_KEPT + idx) != 0)
    else:
        return True


@triton.jit
def _visible(k_idx, prow, ks, kept, lo_row, HAS_PLAN: tl.constexpr):
    """(rows, keys) bool: real causal keys, and with a plan kept or in the row's band."""
    vis = (k_idx[None, :] >= ks) & (k_idx[None, :] <= prow[:, None])
    if HAS_PLAN:
        vis = vis & (kept[None, :] | (k_idx[None, :] >= lo_row[:, None]))
    return vis


@triton.jit
def _row_lse_kernel(
    Q, K, KEEP, TILE_KEPT, KEY_START, LOCAL_START, WINDOW, QPOS, NQ, LSE,
    s_qb, s_qh, s_ql, L, KV, n_tiles, n_ktiles, qk_scale,
    G: tl.constexpr, GP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, HAS_PLAN: tl.constexpr,
):
    """Pass 1 over the weighted queries QPOS[b, :NQ[b]] (B, L) int32, padding L. K (B*KV*L, D);
    KEEP (B*KV, L) int8; TILE_KEPT (B*KV, n_ktiles) int8: whether a key block keeps a key (a block that
    keeps none, wholly before every row's band, is skipped); WINDOW (B*KV,); LSE (B, H, L) fp32 out (log2),
    at the queries' compact index."""
    BM: tl.constexpr = GP * BLOCK_P
    tile = n_tiles - 1 - tl.program_id(0)  # heaviest tiles first
    bh = tl.program_id(1)
    b = bh // KV
    h = bh % KV
    rows = tl.arange(0, BM)
    hrow = rows // BLOCK_P
    c = tile * BLOCK_P + rows % BLOCK_P  # compact query index
    prow = tl.load(QPOS + b.to(tl.int64) * L + c, mask=c < tl.load(NQ + b), other=L)
    row_ok = (hrow < G) & (prow < L)
    qh = h * G + hrow
    d = tl.arange(0, HEAD_D)
    cols = tl.arange(0, BLOCK_N)
    q = tl.load(Q + b.to(tl.int64) * s_qb + qh[:, None] * s_qh + prow[:, None] * s_ql + d[None, :],
                mask=row_ok[:, None], other=0.0)
    ks = tl.load(KEY_START + b).to(tl.int32)
    lo_row = band_lo(prow, tl.load(WINDOW + bh).to(tl.int32), tl.load(LOCAL_START + b).to(tl.int32))
    k_src = K + bh.to(tl.int64) * L * HEAD_D
    lo_min = tl.min(tl.where(row_ok, lo_row, L))  # the tile's first band key
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    for kk in range(ks // BLOCK_N * BLOCK_N, tl.max(tl.where(row_ok, prow, -1)) + 1, BLOCK_N):
        if _block_needed(TILE_KEPT, bh * n_ktiles + kk // BLOCK_N, kk + BLOCK_N > lo_min, HAS_PLAN):
            k_idx = kk + cols
            ld = k_idx < L
            k = load_rows(k_src, kk, cols, d, ld, False, True, False)
            kept = _kept(KEEP, bh, k_idx, ld, L, HAS_PLAN)
            s = block_scores(q, k, qk_scale, UPCAST, PREC)
            s = tl.where(_visible(k_idx, prow, ks, kept, lo_row, HAS_PLAN), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet: no NaN
            l_i = l_i * tl.exp2(m_i - m_use) + tl.sum(tl.exp2(s - m_use[:, None]), 1)
            m_i = m_new
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("inf"))
    tl.store(LSE + (b * KV * G + qh).to(tl.int64) * L + c, lse, mask=row_ok)


@triton.jit
def _column_mass_kernel(
    Q, K, KEEP, KEY_START, LOCAL_START, WINDOW, QPOS, QSPAN, LSE, WEIGHT, OUT,
    s_qb, s_qh, s_ql, L, KV, n_ktiles, qk_scale,
    G: tl.constexpr, GP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, HAS_PLAN: tl.constexpr,
):
    """Pass 2. QSPAN (B*KV, n_ktiles, 2): the compact indices [first, end) of the weighted queries that
    may see a key of the tile (key_tile_spans); WEIGHT (B, L) fp32 per query; OUT (B*KV, L) fp32:
    the tile's column sums."""
    BM: tl.constexpr = GP * BLOCK_P
    k0 = tl.program_id(0) * BLOCK_N  # early key tiles (the heaviest) first
    bh = tl.program_id(1)
    b = bh // KV
    h = bh % KV
    cols = tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_D)
    k_idx = k0 + cols
    ld = k_idx < L
    k = load_rows(K + bh.to(tl.int64) * L * HEAD_D, k0, cols, d, ld, False, True, False)
    kept = _kept(KEEP, bh, k_idx, ld, L, HAS_PLAN)
    ks = tl.load(KEY_START + b).to(tl.int32)
    window = tl.load(WINDOW + bh).to(tl.int32)
    local_start = tl.load(LOCAL_START + b).to(tl.int32)
    rows = tl.arange(0, BM)
    hrow = rows // BLOCK_P
    qh = h * G + hrow
    q_base = Q + b.to(tl.int64) * s_qb + qh[:, None] * s_qh + d[None, :]
    lse_base = LSE + (b * KV * G + qh).to(tl.int64) * L
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    span = QSPAN + (bh * n_ktiles + tl.program_id(0)) * 2
    end = tl.load(span + 1)
    for c0 in range(tl.load(span), end, BLOCK_P):
        c = c0 + rows % BLOCK_P
        prow = tl.load(QPOS + b.to(tl.int64) * L + c, mask=c < end, other=L)
        row_ok = (hrow < G) & (prow < L)
        q = tl.load(q_base + prow[:, None] * s_ql, mask=row_ok[:, None], other=0.0)
        lse = tl.load(lse_base + c, mask=row_ok, other=float("inf"))
        w = tl.load(WEIGHT + b.to(tl.int64) * L + prow, mask=row_ok, other=0.0)
        s = block_scores(q, k, qk_scale, UPCAST, PREC)
        vis = _visible(k_idx, prow, ks, kept, band_lo(prow, window, local_start), HAS_PLAN) & row_ok[:, None]
        p = tl.where(vis, tl.exp2(s - lse[:, None]), 0.0)
        acc += tl.sum(p * w[:, None], 0)
    tl.store(OUT + bh.to(tl.int64) * L + k_idx, acc, mask=ld)


def weighted_queries(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The queries of nonzero weight, compacted without a host sync: positions (B, L) int32 ascending
    (padding L) and their count (B,) int32."""
    B, L = weight.shape
    ar = torch.arange(L, device=weight.device)
    pos = torch.where(weight != 0, ar, L + ar).sort(-1).values
    return pos.clamp(max=L).to(torch.int32).contiguous(), (weight != 0).sum(-1).to(torch.int32).contiguous()


def tile_kept(keep: torch.Tensor, block_n: int) -> torch.Tensor:
    """(B, KV, L) kept keys -> (B, KV, n_ktiles) bool: whether each tile of block_n keys keeps one."""
    B, KV, L = keep.shape
    pad = torch.nn.functional.pad(keep, (0, triton.cdiv(L, block_n) * block_n - L))
    return pad.view(B, KV, -1, block_n).any(-1)


def key_tile_spans(qpos: torch.Tensor, nq: torch.Tensor, KV: int, block_n: int, plan: TokenPlan | None,
                   keep: torch.Tensor | None) -> torch.Tensor:
    """(B*KV, n_ktiles, 2) int32: per key tile the compact indices [first, end) of the weighted queries
    that may see one of its keys: from the first at or after the tile; to the last with a plan whose
    tile keeps no key and lies before the row's local start, only those within the window of its last
    key (query j sees such a key s only if s >= j - window + 1), else to the end. No host sync."""
    B, L = qpos.shape
    k0 = torch.arange(0, L, block_n, device=qpos.device, dtype=torch.int32)  # (n_ktiles,)
    first = torch.searchsorted(qpos, k0.expand(B, -1).contiguous())[:, None].expand(B, KV, -1)
    end = nq.long()[:, None, None].expand_as(first)
    if plan is not None:
        k_last = (k0 + block_n - 1).clamp(max=L - 1).long()
        w = plan.window_of(B, KV, qpos.device)  # (B, KV)
        band_end = torch.searchsorted(qpos, (k_last + w[..., None]).reshape(B, -1).to(torch.int32).contiguous())
        only_band = ~tile_kept(keep, block_n) & (k_last < plan.local_starts().to(qpos.device)[:, None, None])
        end = torch.where(only_band, torch.minimum(band_end.view(B, KV, -1), end), end)  # padding holds L: clamp
    return torch.stack([first, torch.maximum(first, end)], -1).reshape(B * KV, -1, 2).to(torch.int32).contiguous()


def column_mass_triton(q: torch.Tensor, k: torch.Tensor, scaling: float, key_start: torch.Tensor,
                       weight: torch.Tensor, plan: TokenPlan | None = None,
                       config: ColumnMassConfig | None = None) -> torch.Tensor:
    """q (B, H, L, D), k (B, KV, L, D), key_start (B,), weight (B, L) -> (B, KV, L) fp32 (column_mass_ref)."""
    B, H, L, D = q.shape
    KV = k.shape[1]
    check_heads(H, KV)
    check_head_dim(D)
    g = H // KV
    cfg = config or default_config(D)
    gp = next_pow2(g)
    block_p = max(cfg.block_m, gp) // gp
    dev = q.device
    plan = check_plan(plan)
    q, k = q.contiguous(), k.contiguous()
    ks = key_start.to(device=dev, dtype=torch.int64).contiguous()
    w = weight.to(device=dev, dtype=torch.float32).contiguous()
    kept = kept_keys(plan, L).to(dev) if plan is not None else None
    if plan is None:
        keep = tiles = torch.zeros(1, dtype=torch.int8, device=dev)
        local, window = ks, torch.ones(B * KV, dtype=torch.int64, device=dev)  # unused without a plan
    else:
        keep = kept.to(torch.int8).contiguous()
        tiles = tile_kept(kept, cfg.block_n).to(torch.int8).contiguous()
        local = plan.local_starts().to(device=dev, dtype=torch.int64).contiguous()
        window = plan.window_of(B, KV, dev).reshape(-1).contiguous()
    qpos, nq = weighted_queries(w)
    spans = key_tile_spans(qpos, nq, KV, cfg.block_n, plan, kept)
    lse = torch.empty(B, H, L, dtype=torch.float32, device=dev)
    out = torch.empty(B, KV, L, dtype=torch.float32, device=dev)
    n_tiles, n_ktiles = triton.cdiv(L, block_p), triton.cdiv(L, cfg.block_n)
    meta = dict(G=g, GP=gp, BLOCK_P=block_p, BLOCK_N=cfg.block_n, HEAD_D=D, UPCAST=upcast(q), PREC=precision(q),
                HAS_PLAN=plan is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    strides = (q.stride(0), q.stride(1), q.stride(2))
    _row_lse_kernel[(n_tiles, B * KV)](q, k, keep, tiles, ks, local, window, qpos, nq, lse, *strides, L, KV, n_tiles,
                                       n_ktiles, scaling * LOG2E, **meta)
    _column_mass_kernel[(n_ktiles, B * KV)](q, k, keep, ks, local, window, qpos, spans, lse, w, out, *strides,
                                            L, KV, n_ktiles, scaling * LOG2E, **meta)
    return out
