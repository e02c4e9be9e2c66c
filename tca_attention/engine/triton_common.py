"""What the Triton kernels share: host helpers and the device pieces of the attention kernels.

Host: `upcast`, `precision`, `interpreted`, `next_pow2`, the shape checks and `kv_sources` (K/V
matrices as pointers or TMA descriptors). Device (`@triton.jit`, inlined into the calling
kernels): `band_lo` (plan.band_start), `load_rows` (a tile of rows of a (rows, D) matrix) and
`attend_block_kb` (one online-softmax step of flash attention = `raw_scores`, the optional key logit
bias (plan.KeyBias, `add_key_bias`, host `bias_args`), then `online_update`; the pieces are also
callable apart by a kernel that decides between them, e.g. block skipping with `block_scores`).
Only the kernel modules import this one (it imports triton; the reference path must not need it).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # host: the kernels work in the exp2 domain, qk_scale = scaling * LOG2E
LN2 = tl.constexpr(0.6931471805599453)  # device (a jit function reads only constexpr globals): lse = log2-lse * LN2


def interpreted() -> bool:
    """True under the Triton interpreter (TRITON_INTERPRET=1: the kernels run on the CPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def upcast(q: torch.Tensor) -> bool:
    """bf16 dots run in fp32 under the Triton interpreter (TRITON_INTERPRET=1), whose bf16 dot is wrong."""
    return q.dtype == torch.bfloat16 and interpreted()


def precision(q: torch.Tensor) -> str:
    """fp32 inputs get exact fp32 dots ("ieee"), not tf32; bf16/fp16 dots are unaffected."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def next_pow2(x: int) -> int:
    """Smallest power of two >= x, for x >= 1."""
    return 1 << max(0, (x - 1).bit_length())


def check_heads(heads: int, kv_heads: int) -> None:
    if heads % kv_heads:
        raise ValueError(f"query heads {heads} must be a multiple of KV heads {kv_heads}")


def check_head_dim(head_dim: int) -> None:
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"head dim must be a power of two >= 16, got {head_dim}")


def kv_sources(mats: list[torch.Tensor], block_rows: int, use_tma: bool) -> tuple[list, bool]:
    """(rows, D) matrices as kernel arguments for `load_rows`: TMA descriptors of (block_rows, D)
    tiles when use_tma and every base is 16-byte aligned (TMA needs it; a K/V view into a fused
    buffer may not be), else the tensors themselves. -> (sources, whether TMA is used)."""
    if not (use_tma and all(t.data_ptr() % 16 == 0 for t in mats)):
        return list(mats), False
    from triton.tools.tensor_descriptor import TensorDescriptor

    return [TensorDescriptor.from_tensor(t, [block_rows, t.shape[-1]]) for t in mats], True


@triton.jit
def load_rows(src, row0, cols, d, ld, USE_TMA: tl.constexpr, MASKED: tl.constexpr, WIDE: tl.constexpr):
    """Rows row0 + cols (cols = [0, BLOCK_N)) of a (rows, D) matrix: a TMA descriptor or a base pointer.

    TMA: no mask (rows past the matrix end read as zeros; rows of a neighbouring head or past a
    work item are hidden by the caller's visibility mask). Pointer loads with MASKED skip the rows
    where ld is False (they read as 0: a V row the cache never wrote may hold NaN, and p = 0 times
    NaN is still NaN); without MASKED every row is loaded (ld unused). WIDE: 64-bit row offsets,
    for a matrix of every head's rows (decode's packed buffers); the prefill moves its base
    pointers to the head first, so 32-bit offsets do.
    """
    if USE_TMA:
        return src.load([row0, 0])
    else:
        rows = row0 + cols
        if WIDE:
            rows = rows.to(tl.int64)
        ptrs = src + rows[:, None] * d.shape[0] + d[None, :]
        if MASKED:
            return tl.load(ptrs, mask=ld[:, None], other=0.0)
        else:
            return tl.load(ptrs)


@triton.jit
def band_lo(j, window, local_start):
    """First key of query j's dense band (plan.band_start): its window, extended to the local start."""
    lo = j - window + 1
    return tl.where(j >= local_start, tl.minimum(lo, local_start), lo)


@triton.jit
def raw_scores(q, k, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """q (R, D) . k (BLOCK_N, D)^T -> (R, BLOCK_N) fp32 dot products, unscaled.
    UPCAST: the interpreter's bf16 dot is wrong, so the same bf16 values are multiplied in fp32.
    PREC: the dots' input precision ("ieee" for fp32 inputs)."""
    if UPCAST:
        return tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)))
    else:
        return tl.dot(q, tl.trans(k), input_precision=PREC)


@triton.jit
def block_scores(q, k, qk_scale, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """q (R, D) . k (BLOCK_N, D)^T x qk_scale -> (R, BLOCK_N) fp32 logits in the log2 domain."""
    return raw_scores(q, k, UPCAST, PREC) * qk_scale


@triton.jit
def online_update(acc, m_i, l_i, s, v, MASKED: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                  s_scale=1.0):
    """One online-softmax step of flash attention given the block's logits s (R, BLOCK_N) (-inf on keys
    a row does not see; MASKED: some row may see none and keep m_i = -inf), in the log2 domain once
    multiplied by s_scale (> 0): raw dot products with s_scale = qk_scale let the scale ride in the
    exponent's FMA (s * scale - m) instead of a separate pass. P.V accumulates into acc in the dot."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * s_scale)
    if MASKED:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked rows: no NaN
    else:
        m_use = m_new
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s * s_scale - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if UPCAST:
        acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
    return acc, m_new, l_i


@triton.jit
def add_key_bias(s, BPOS, BVAL, rbase, row_ok, k_pos, NB: tl.constexpr):
    """The key logit bias (plan.KeyBias) added to logits s (R, BLOCK_N): row r's NB slots are
    BPOS/BVAL[rbase[r] : rbase[r] + NB] (positions int32, -1 unused; biases fp32 already x LOG2E);
    k_pos (BLOCK_N,) the keys' absolute positions. A key listed for a row gets its bias."""
    for p in tl.static_range(NB):
        bp = tl.load(BPOS + rbase + p, mask=row_ok, other=-1)
        bv = tl.load(BVAL + rbase + p, mask=row_ok, other=0.0)
        s += tl.where((bp[:, None] == k_pos[None, :]) & (bp[:, None] >= 0), bv[:, None], 0.0)
    return s


@triton.jit
def attend_block_kb(acc, m_i, l_i, q, k, v, vis, qk_scale, k_pos, BPOS, BVAL, rbase, row_ok,
                    MASKED: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                    HAS_BIAS: tl.constexpr, NB: tl.constexpr):
    """One online-softmax step of flash attention over a (BLOCK_N, D) key/value block: acc (R, D) fp32,
    m_i/l_i (R,) fp32 running max and sum (log2 domain: qk_scale includes LOG2E), q (R, D), k/v
    (BLOCK_N, D) -> updated (acc, m_i, l_i). MASKED: vis (R, BLOCK_N) says which keys each row sees
    (a row that has seen no key keeps m_i = -inf, l_i = 0, acc = 0, never NaN); without it every key
    is visible and no masking work is done. HAS_BIAS: the key logit bias (add_key_bias's arguments;
    unused otherwise)."""
    if HAS_BIAS:  # the bias is in the scaled (log2) domain: scale first
        s = add_key_bias(block_scores(q, k, qk_scale, UPCAST, PREC), BPOS, BVAL, rbase, row_ok, k_pos, NB)
        s_scale = 1.0
    else:  # the scale rides in online_update's exponent
        s = raw_scores(q, k, UPCAST, PREC)
        s_scale = qk_scale
    if MASKED:
        s = tl.where(vis, s, float("-inf"))
    return online_update(acc, m_i, l_i, s, v, MASKED, UPCAST, PREC, s_scale)


def bias_args(key_bias, B: int, H: int, device: torch.device, dummy: torch.Tensor) -> tuple:
    """(BPOS, BVAL, NB, HAS_BIAS) kernel arguments of an optional plan.KeyBias (dummies without one)."""
    if key_bias is None:
        return dummy, dummy, 1, False
    if tuple(key_bias.pos.shape[:2]) != (B, H):
        raise ValueError(f"key_bias must be (B={B}, H={H}, P), got {tuple(key_bias.pos.shape)}")
    pos, val = key_bias.packed(device, LOG2E)
    if pos.shape[-1] == 0:
        return dummy, dummy, 1, False
    return pos, val, pos.shape[-1], True
