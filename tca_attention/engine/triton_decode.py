"""Triton ragged decode: split-K (flash-decoding) over a ragged packed global part + a dense tail.

Semantics: exactly `reference.ragged_decode_ref`. For (b, kv head h) the keys are the packed
segment g_offsets[b*KV+h : b*KV+h+2] of g_keys/g_values (positions g_pos) followed by the tail
t_keys[b, h] (positions t_pos[b], -1 = empty slot); a key is visible to a query iff
0 <= pos <= q_pos. Every (b, h) is cut into n_split splits (each takes an equal share of its own
global segment and of the tail); one program per (split, b*KV) handles the g query heads x Q
queries of that KV head together (rows share each K/V load). A second kernel, one program per
query row, merges the splits' (max, sum, acc) into out and lse.
"""
from __future__ import annotations

import os
from functools import lru_cache

import torch
import triton
import triton.language as tl


def _upcast(q: torch.Tensor) -> bool:
    """bf16 dots run in fp32 under the Triton interpreter (TRITON_INTERPRET=1), whose bf16 dot is wrong."""
    return q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"


def _precision(q: torch.Tensor) -> str:
    """fp32 inputs get exact fp32 dots ("ieee"), not tf32; bf16/fp16 dots are unaffected."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


@triton.jit
def _decode_step(acc, m_i, l_i, q, k, v, vis, qk_scale, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Online softmax over one key block. acc (R, D), m_i/l_i (R,), k/v (BN, D), vis (R, BN)."""
    if UPCAST:  # interpreter: its bf16 dot is wrong, so multiply the same bf16 values in fp32
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32))) * qk_scale
    else:
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # (R, BN) fp32, log2 domain
    s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if UPCAST:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32))
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return acc, m_new, l_i


@triton.jit
def _load_block(src, row0, idx, d, ld, USE_TMA: tl.constexpr):
    """Rows row0 + [0, BLOCK_N) of a (rows, D) matrix (TMA descriptor or base pointer).

    TMA: no mask (rows past the range belong to a neighbour or read as zeros; vis hides them).
    """
    if USE_TMA:
        return src.load([row0, 0])
    else:
        return tl.load(src + (row0 + idx).to(tl.int64)[:, None] * d.shape[0] + d[None, :], mask=ld[:, None], other=0.0)


@triton.jit
def _decode_split_kernel(
    Q, QPOS, GK, GV, GPOS, GOFF, TK, TV, TPOS, PACC, PML,
    s_qb, s_qh, s_qq,
    s_pos_b,
    KV, T, NQ, n_split, qk_scale,
    G: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, USE_TMA: tl.constexpr,
):
    """GK/GV (N, D) and TK/TV (B*KV*T, D) row-major, as pointers or TMA descriptors."""
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
    g0 = tl.load(GOFF + bh).to(tl.int32)
    g1 = tl.load(GOFF + bh + 1).to(tl.int32)
    share = tl.cdiv(g1 - g0, n_split)
    lo = g0 + sp * share
    hi = tl.minimum(lo + share, g1)
    for n in range(lo, hi, BLOCK_N):
        idx = n + cols
        ld = idx < hi
        pos = tl.load(GPOS + idx, mask=ld, other=-1)  # rows past the share: invisible
        vis = (pos[None, :] >= 0) & (pos[None, :] <= qpos[:, None])
        k = _load_block(GK, n, cols, d, ld, USE_TMA)
        v = _load_block(GV, n, cols, d, ld, USE_TMA)
        acc, m_i, l_i = _decode_step(acc, m_i, l_i, q, k, v, vis, qk_scale, UPCAST, PREC)

    # Tail: this split's share of [0, T).
    t_share = tl.cdiv(T, n_split)
    t_lo = sp * t_share
    t_hi = tl.minimum(t_lo + t_share, T)
    t_row = bh * T  # first row of this head's tail in the (B*KV*T, D) view
    for n in range(t_lo, t_hi, BLOCK_N):
        idx = n + cols
        ld = idx < t_hi
        pos = tl.load(TPOS + b * s_pos_b + idx, mask=ld, other=-1)
        vis = (pos[None, :] >= 0) & (pos[None, :] <= qpos[:, None])
        k = _load_block(TK, t_row + n, cols, d, ld, USE_TMA)
        v = _load_block(TV, t_row + n, cols, d, ld, USE_TMA)
        acc, m_i, l_i = _decode_step(acc, m_i, l_i, q, k, v, vis, qk_scale, UPCAST, PREC)

    base = bh * n_split + sp  # partials: acc (B*KV, n_split, ROWS, D), (m, l) (B*KV, n_split, 2, ROWS)
    tl.store(PACC + base * ROWS * HEAD_D + rows[:, None] * HEAD_D + d[None, :], acc, mask=row_ok[:, None])
    tl.store(PML + base * 2 * ROWS + rows, m_i, mask=row_ok)
    tl.store(PML + base * 2 * ROWS + ROWS + rows, l_i, mask=row_ok)


@triton.jit
def _decode_combine_kernel(
    PACC, PML, OUT, LSE,
    s_ob, s_oq, s_oh,
    s_lb, s_lh,
    KV, NQ, n_split,
    G: tl.constexpr, ROWS: tl.constexpr, HEAD_D: tl.constexpr, SPLIT_P: tl.constexpr,
):
    """One program per (b * KV, row): merge the n_split partials of one query row at once."""
    bh = tl.program_id(0)
    r = tl.program_id(1)
    b = bh // KV
    h = bh % KV
    sp = tl.arange(0, SPLIT_P)
    ok_s = sp < n_split
    d = tl.arange(0, HEAD_D)
    base = bh * n_split + sp  # (SPLIT_P,)
    m_s = tl.load(PML + base * 2 * ROWS + r, mask=ok_s, other=float("-inf"))
    l_s = tl.load(PML + base * 2 * ROWS + ROWS + r, mask=ok_s, other=0.0)
    a_s = tl.load(PACC + (base * ROWS + r)[:, None] * HEAD_D + d[None, :], mask=ok_s[:, None], other=0.0)
    m = tl.max(m_s, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    c = tl.exp2(m_s - m_use)  # (SPLIT_P,), 0 for empty splits
    l = tl.sum(l_s * c, 0)
    acc = tl.sum(a_s * c[:, None], 0)  # (D,)
    ok = l > 0
    out = tl.where(ok, acc / tl.where(ok, l, 1.0), 0.0)
    lse = tl.where(ok, (m + tl.log2(tl.where(ok, l, 1.0))) * 0.6931471805599453, float("-inf"))
    hrow = r // NQ
    qi = r % NQ
    qh = h * G + hrow
    tl.store(OUT + b * s_ob + qi * s_oq + qh * s_oh + d, out.to(OUT.dtype.element_ty))
    tl.store(LSE + b * s_lb + qh * s_lh + qi, lse)


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
    block_n: int = 32,
    num_warps: int = 4,
    num_stages: int = 4,
    use_tma: bool = False,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, Q, D), q_pos (B, Q); global (N, D) + g_pos (N,) + g_offsets (B*KV+1,);
    tail (B, KV, T, D) + t_pos (B, T). -> out (B, Q, H, D) in q's dtype, lse (B, H, Q) fp32.

    n_split: splits per (b, kv head) (default from the shapes and the SM count); block_n, num_warps,
    num_stages: tile and launch settings of the split kernel; use_tma: K/V tiles through TMA
    descriptors (Hopper+, compiled only); out/lse: optional contiguous buffers to fill.
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
    t_pos = t_pos.to(device=dev, dtype=torch.int64).reshape(B, -1).contiguous()  # (B, T)
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
    kv_srcs = [g_keys, g_values, t_keys.view(-1, D), t_values.view(-1, D)]  # (rows, D) each
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        kv_srcs = [TensorDescriptor.from_tensor(t, [block_n, D]) for t in kv_srcs]
    gk, gv, tk, tv = kv_srcs
    _decode_split_kernel[(n_split, B * KV)](
        q, q_pos, gk, gv, g_pos, g_offsets, tk, tv, t_pos, pacc, pml,
        q.stride(0), q.stride(1), q.stride(2),
        t_pos.stride(0),
        KV, T, NQ, n_split, scaling * 1.4426950408889634,
        G=g, ROWS=rows, BLOCK_N=block_n, HEAD_D=D, UPCAST=_upcast(q), PREC=_precision(q), USE_TMA=use_tma,
        num_warps=num_warps, num_stages=num_stages,
    )
    _decode_combine_kernel[(B * KV, g * NQ)](
        pacc, pml, out, lse,
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        KV, NQ, n_split,
        G=g, ROWS=rows, HEAD_D=D, SPLIT_P=triton.next_power_of_2(n_split), num_warps=4,
    )
    return out, lse
