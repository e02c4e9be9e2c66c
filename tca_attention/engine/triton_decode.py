"""Triton ragged decode: split-K (flash-decoding) over a ragged packed global part + a dense tail.

Semantics: exactly `reference.ragged_decode_ref`. For (b, kv head h) the keys are the packed
segment g_offsets[b*KV+h : b*KV+h+2] of g_keys/g_values (positions g_pos) followed by the tail
t_keys[b, h] (positions t_pos[b], -1 = empty slot); a key is visible to a query iff
0 <= pos <= q_pos. Every (b, h) is cut into n_split splits (each takes an equal share of its own
global segment and of the tail); one program per (split, b*KV) handles the g query heads x Q
queries of that KV head together (rows share each K/V load). A second kernel merges the splits'
(max, sum, acc) into out and lse.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_step(acc, m_i, l_i, q, k_ptrs, v_ptrs, ld, vis, qk_scale):
    """Online softmax over one masked key block. acc (R, D), m_i/l_i (R,), vis (R, BN)."""
    k = tl.load(k_ptrs, mask=ld[:, None], other=0.0)
    v = tl.load(v_ptrs, mask=ld[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k)) * qk_scale  # (R, BN) fp32, log2 domain
    s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _decode_split_kernel(
    Q, QPOS, GK, GV, GPOS, GOFF, TK, TV, TPOS, PACC, PML,
    s_qb, s_qh, s_qq,
    s_gn,
    s_tb, s_th, s_tl,
    s_pos_b,
    KV, T, NQ, n_split, qk_scale,
    G: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr,
):
    sp = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // KV
    h = bh % KV
    rows = tl.arange(0, ROWS)
    hrow = rows // NQ  # head inside the group
    qi = rows % NQ  # query index
    row_ok = hrow < G
    d = tl.arange(0, HEAD_D)
    q_ptrs = Q + b * s_qb + (h * G + hrow)[:, None] * s_qh + qi[:, None] * s_qq + d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)  # (ROWS, D)
    qpos = tl.load(QPOS + b * NQ + qi, mask=row_ok, other=-1)  # (ROWS,)

    acc = tl.zeros([ROWS, HEAD_D], dtype=tl.float32)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    cols = tl.arange(0, BLOCK_N)

    # Global part: this split's share of the segment [g0, g1).
    g0 = tl.load(GOFF + bh)
    g1 = tl.load(GOFF + bh + 1)
    share = tl.cdiv(g1 - g0, n_split)
    lo = g0 + sp * share
    hi = tl.minimum(lo + share, g1)
    for n in range(lo, hi, BLOCK_N):
        idx = n + cols
        ld = idx < hi
        pos = tl.load(GPOS + idx, mask=ld, other=-1)
        vis = (pos[None, :] >= 0) & (pos[None, :] <= qpos[:, None])
        kp = GK + idx[:, None].to(tl.int64) * s_gn + d[None, :]
        vp = GV + idx[:, None].to(tl.int64) * s_gn + d[None, :]
        acc, m_i, l_i = _decode_step(acc, m_i, l_i, q, kp, vp, ld, vis, qk_scale)

    # Tail: this split's share of [0, T).
    t_share = tl.cdiv(T, n_split)
    t_lo = sp * t_share
    t_hi = tl.minimum(t_lo + t_share, T)
    for n in range(t_lo, t_hi, BLOCK_N):
        idx = n + cols
        ld = idx < t_hi
        pos = tl.load(TPOS + b * s_pos_b + idx, mask=ld, other=-1)
        vis = (pos[None, :] >= 0) & (pos[None, :] <= qpos[:, None])
        kp = TK + b * s_tb + h * s_th + idx[:, None] * s_tl + d[None, :]
        vp = TV + b * s_tb + h * s_th + idx[:, None] * s_tl + d[None, :]
        acc, m_i, l_i = _decode_step(acc, m_i, l_i, q, kp, vp, ld, vis, qk_scale)

    base = bh * n_split + sp  # partials: acc (B*KV, n_split, ROWS, D), (m, l) (B*KV, n_split, 2, ROWS)
    tl.store(PACC + base * ROWS * HEAD_D + rows[:, None] * HEAD_D + d[None, :], acc)
    tl.store(PML + base * 2 * ROWS + rows, m_i)
    tl.store(PML + base * 2 * ROWS + ROWS + rows, l_i)


@triton.jit
def _decode_combine_kernel(
    PACC, PML, OUT, LSE,
    s_ob, s_oq, s_oh,
    s_lb, s_lh,
    KV, NQ, n_split,
    G: tl.constexpr, ROWS: tl.constexpr, HEAD_D: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // KV
    h = bh % KV
    rows = tl.arange(0, ROWS)
    d = tl.arange(0, HEAD_D)
    m = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, HEAD_D], dtype=tl.float32)
    for sp in range(0, n_split):
        base = bh * n_split + sp
        m_s = tl.load(PML + base * 2 * ROWS + rows)
        l_s = tl.load(PML + base * 2 * ROWS + ROWS + rows)
        a_s = tl.load(PACC + base * ROWS * HEAD_D + rows[:, None] * HEAD_D + d[None, :])
        m_new = tl.maximum(m, m_s)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        c_old = tl.exp2(m - m_use)
        c_new = tl.exp2(m_s - m_use)
        l = l * c_old + l_s * c_new
        acc = acc * c_old[:, None] + a_s * c_new[:, None]
        m = m_new
    ok = l > 0
    out = tl.where(ok[:, None], acc / tl.where(ok, l, 1.0)[:, None], 0.0)
    lse = tl.where(ok, (m + tl.log2(tl.where(ok, l, 1.0))) * 0.6931471805599453, float("-inf"))
    hrow = rows // NQ
    qi = rows % NQ
    row_ok = hrow < G
    qh = h * G + hrow
    tl.store(OUT + b * s_ob + qi[:, None] * s_oq + qh[:, None] * s_oh + d[None, :],
             out.to(OUT.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + b * s_lb + qh * s_lh + qi, lse, mask=row_ok)


@lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _pick_split(keys_per_head: int, n_heads: int, device: torch.device) -> int:
    """Splits per (b, kv head): about 4 programs per SM, each with >= 256 keys, from shapes only."""
    sms = _num_sms(device.index or 0) if device.type == "cuda" else 4
    want = triton.cdiv(4 * sms, max(n_heads, 1))
    return int(max(1, min(want, triton.cdiv(max(keys_per_head, 1), 256))))


def ragged_decode_triton(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    g_keys: torch.Tensor,
    g_values: torch.Tensor,
    g_pos: torch.Tensor,
    g_offsets: torch.Tensor,
    t_keys: torch.Tensor,
    t_values: torch.Tensor,
    t_pos: torch.Tensor,
    scaling: float,
    n_split: int | None = None,
    block_n: int = 64,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, Q, D), q_pos (B, Q); global (N, D) + g_pos (N,) + g_offsets (B*KV+1,);
    tail (B, KV, T, D) + t_pos (B, T). -> out (B, Q, H, D) in q's dtype, lse (B, H, Q) fp32.

    n_split: splits per (b, kv head) (default from the shapes and the SM count); out/lse: optional
    contiguous buffers to fill.
    """
    B, H, NQ, D = q.shape
    KV, T = t_keys.shape[1], t_keys.shape[2]
    if H % KV:
        raise ValueError(f"query heads {H} must be a multiple of KV heads {KV}")
    g = H // KV
    rows = max(16, triton.next_power_of_2(g * NQ))
    if g * NQ > 128:
        raise ValueError(f"g * Q = {g * NQ} rows per KV head is more than this decode kernel handles (128)")
    dev = q.device
    q = q.contiguous()
    t_keys, t_values = t_keys.contiguous(), t_values.contiguous()
    g_keys, g_values = g_keys.contiguous(), g_values.contiguous()
    if g_keys.shape[0] == 0:  # keep valid pointers
        g_keys = torch.zeros(1, D, dtype=q.dtype, device=dev)
        g_values = torch.zeros(1, D, dtype=q.dtype, device=dev)
        g_pos = torch.full((1,), -1, dtype=torch.long, device=dev)
    if T == 0:
        t_keys = torch.zeros(B, KV, 1, D, dtype=q.dtype, device=dev)
        t_values = torch.zeros(B, KV, 1, D, dtype=q.dtype, device=dev)
    q_pos = q_pos.to(device=dev, dtype=torch.int64).contiguous()
    g_pos = g_pos.to(device=dev, dtype=torch.int64).contiguous()
    t_pos = t_pos.to(device=dev, dtype=torch.int64).contiguous()
    g_offsets = g_offsets.to(device=dev, dtype=torch.int64).contiguous()
    if n_split is None:
        n_split = _pick_split(g_keys.shape[0] // max(B * KV, 1) + T, B * KV, dev)
    pacc = torch.empty(B * KV, n_split, rows, D, dtype=torch.float32, device=dev)
    pml = torch.empty(B * KV, n_split, 2, rows, dtype=torch.float32, device=dev)
    if out is None:
        out = torch.empty(B, NQ, H, D, dtype=q.dtype, device=dev)
    if lse is None:
        lse = torch.empty(B, H, NQ, dtype=torch.float32, device=dev)
    if out.shape != (B, NQ, H, D) or not out.is_contiguous() or lse.shape != (B, H, NQ) or not lse.is_contiguous():
        raise ValueError("out must be contiguous (B, Q, H, D) and lse contiguous (B, H, Q)")
    _decode_split_kernel[(n_split, B * KV)](
        q, q_pos, g_keys, g_values, g_pos, g_offsets, t_keys, t_values, t_pos, pacc, pml,
        q.stride(0), q.stride(1), q.stride(2),
        g_keys.stride(0),
        t_keys.stride(0), t_keys.stride(1), t_keys.stride(2),
        t_pos.stride(0) if t_pos.dim() == 2 else 0,
        KV, T, NQ, n_split, scaling * 1.4426950408889634,
        G=g, ROWS=rows, BLOCK_N=block_n, HEAD_D=D, num_warps=4, num_stages=3,
    )
    _decode_combine_kernel[(B * KV,)](
        pacc, pml, out, lse,
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        KV, NQ, n_split,
        G=g, ROWS=rows, HEAD_D=D, num_warps=4,
    )
    return out, lse
