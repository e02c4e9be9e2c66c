"""Triton ragged decode: split-K (flash-decoding) over a ragged packed global part + a dense tail.

Semantics: exactly `reference.ragged_decode_ref`; the layout is RaggedCacheView's: for (b, kv
head h) the keys are the packed segment g_offsets[b*KV+h : b*KV+h+2] of g_keys/g_values
(positions g_pos) followed by the tail t_keys[b, h] (positions t_pos[b], -1 = empty slot); a key
is visible to a query iff 0 <= pos <= q_pos. The work is cut into items of `chunk` keys, so every
program reads about the same bytes whatever the heads' budgets (a head with twice the kept tokens
gets twice the items; heads are found from g_offsets on the device, no host sync): items
[0, n_gw) cover the global segments, then n_tw items per head cover its tail. One program per item handles the g query
heads x Q queries of its KV head together (rows share each K/V load). A second kernel, one
program per query row, merges the items' (max, sum, acc) into out and lse.
With a DecodeSelection (constexpr SELECTED), the tail items walk the head's listed pages instead
of the whole tail: index j of the listed slots is slot pages[j // page_size] * page_size +
j % page_size, so a tile gathers rows of one or several pages (or part of a page), and pages
not listed are never read.
Key logit bias (key_bias=, plan.KeyBias; constexpr HAS_BIAS): the listed positions' biases are added
to the logits of every step (triton_common.attend_block_kb), global part and tail alike.
"""
from __future__ import annotations

import os
from functools import lru_cache

import torch
import triton
import triton.language as tl

from .plan import DecodeSelection, KeyBias, RaggedCacheView
from .triton_common import LN2, LOG2E, attend_block_kb, bias_args, check_heads, kv_sources, load_rows, precision, upcast

try:  # grid dependency control (programmatic dependent launch, sm_90+): triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_GDC = True
except ImportError:  # older triton: pdl=1 is refused at launch; these are never traced
    HAS_GDC = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


@triton.jit
def _head_of_chunk(GOFF, pid, BKV, chunk, BKV_P: tl.constexpr):
    """Map a global work item to its head: head bh owns cdiv(len_bh, chunk) consecutive items.

    -> bh (BKV when pid is past every head's items), lo, hi (rows of the packed buffer),
       first (this head's first item), n_items (this head's item count).
    """
    hv = tl.arange(0, BKV_P)
    o0 = tl.load(GOFF + hv, mask=hv < BKV, other=0).to(tl.int32)
    o1 = tl.load(GOFF + hv + 1, mask=hv < BKV, other=0).to(tl.int32)
    cnt = tl.cdiv(o1 - o0, chunk)  # items per head
    cum = tl.cumsum(cnt, 0)  # inclusive prefix
    bh = tl.sum((cum <= pid).to(tl.int32), 0)
    sel = hv == bh
    first = tl.sum(tl.where(sel, cum - cnt, 0), 0)
    n_items = tl.sum(tl.where(sel, cnt, 0), 0)
    g0 = tl.sum(tl.where(sel, o0, 0), 0)
    g1 = tl.sum(tl.where(sel, o1, 0), 0)
    lo = g0 + (pid - first) * chunk
    hi = tl.minimum(lo + chunk, g1)
    return bh, lo, hi, first, n_items


# Sizes that change as a cache grows (tail length, listed pages, work items) are not specialised
# (Triton would compile a variant per ==1 / %16 class of each, i.e. new compiles mid-generation)
_GROWING = ["BKV", "KV", "T", "P", "chunk", "n_gw", "n_tw"]


@triton.jit(do_not_specialize=_GROWING)
def _decode_split_kernel(
    Q, QPOS, GK, GV, GPOS, GOFF, TK, TV, TPOS, PAGES, NSEL, PACC, PML, BPOS, BVAL,
    s_qb, s_qh, s_qq,
    s_pos_b, s_qpos_b, s_qpos_q,
    BKV, KV, T, P, NQ, qk_scale, chunk, n_gw, n_tw,
    G: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr,
    BKV_P: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, USE_TMA: tl.constexpr,
    SELECTED: tl.constexpr, PAGE: tl.constexpr, HAS_BIAS: tl.constexpr, NB: tl.constexpr, PDL: tl.constexpr,
):
    """One work item per program: `chunk` keys of one head's global segment (items [0, n_gw),
    balanced across heads whatever their lengths) or of its tail (item n_gw + bh * n_tw + c).
    GK/GV (N, D) and TK/TV (B*KV*T, D) row-major, as pointers or TMA descriptors (TK/TV: pointers
    when SELECTED). SELECTED: the tail items cover the listed slots of head bh, PAGES (B*KV, P)
    int32 page ids (PAGE slots each), NSEL (B*KV,) int32 its valid entries; unused otherwise.
    HAS_BIAS: BPOS/BVAL (B, KV*G, NB) the key logit bias.
    PDL (launched as a programmatic dependent launch): wait for the kernels before (they wrote q, the
    cache and its offsets) before any load, then let the merge launch at once (it waits for this grid).
    """
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    pid = tl.program_id(0)
    is_g = pid < n_gw
    g_bh, g_lo, g_hi, _f, _n = _head_of_chunk(GOFF, pid, BKV, chunk, BKV_P)
    t_item = tl.maximum(pid - n_gw, 0)
    t_bh = t_item // tl.maximum(n_tw, 1)
    t_c = t_item % tl.maximum(n_tw, 1)
    bh = tl.where(is_g, g_bh, t_bh)
    lo = tl.where(is_g & (g_bh < BKV), g_lo, 0)  # global rows [lo, hi)
    hi = tl.where(is_g & (g_bh < BKV), g_hi, 0)
    bh = tl.minimum(bh, BKV - 1)  # idle items (past every head) read a valid q, write a partial nobody merges
    if SELECTED:
        t_end = tl.load(NSEL + bh) * PAGE  # listed slots of the head: j in [0, t_end)
    else:
        t_end = T
    t_lo = tl.where(is_g, 0, t_c * chunk)  # tail slots (listed slots when SELECTED) [t_lo, t_hi)
    t_hi = tl.where(is_g, 0, tl.minimum(t_lo + chunk, t_end))
    b = bh // KV
    h = bh % KV

    rows = tl.arange(0, ROWS)
    hrow = rows // NQ  # head inside the group
    qi = rows % NQ  # query index
    row_ok = hrow < G
    d = tl.arange(0, HEAD_D)
    q_ptrs = Q + b * s_qb + (h * G + hrow)[:, None] * s_qh + qi[:, None] * s_qq + d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)  # (ROWS, D)
    qpos = tl.load(QPOS + b * s_qpos_b + qi * s_qpos_q, mask=row_ok, other=-1)  # (ROWS,) (a broadcast view: stride 0)
    rbase = ((b * KV * G + h * G + hrow) * NB).to(tl.int64)  # this row's key-bias slots

    acc = tl.zeros([ROWS, HEAD_D], dtype=tl.float32)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    cols = tl.arange(0, BLOCK_N)

    for n in range(lo, hi, BLOCK_N):  # global part
        idx = n + cols
        ld = idx < hi
        pos = tl.load(GPOS + idx, mask=ld, other=-1)  # rows past the item: invisible
        vis = (pos[None, :] >= 0) & (pos[None, :] <= qpos[:, None])
        k = load_rows(GK, n, cols, d, ld & (pos >= 0), USE_TMA, True, True)  # empty slots (room) are not read
        v = load_rows(GV, n, cols, d, ld & (pos >= 0), USE_TMA, True, True)  # and read as 0
        acc, m_i, l_i = attend_block_kb(acc, m_i, l_i, q, k, v, vis, qk_scale, pos, BPOS, BVAL, rbase, row_ok,
                                            True, UPCAST, PREC, HAS_BIAS, NB)

    t_row = bh * T  # first row of this head's tail in the (B*KV*T, D) view
    if SELECTED:
        for n in range(t_lo, t_hi, BLOCK_N):  # tail: the listed pages' slots, gathered
            j = n + cols
            pg = tl.load(PAGES + bh * P + j // PAGE, mask=j < t_hi, other=-1)
            slot = pg * PAGE + j % PAGE
            ld = (pg >= 0) & (slot < T)  # a partial last page ends at T
            pos = tl.load(TPOS + b * s_pos_b + slot, mask=ld, other=-1)
            vis = (pos[None, :] >= 0) & (pos[None, :] <= qpos[:, None])
            k = load_rows(TK, t_row, slot, d, ld & (pos >= 0), False, True, True)
            v = load_rows(TV, t_row, slot, d, ld & (pos >= 0), False, True, True)
            acc, m_i, l_i = attend_block_kb(acc, m_i, l_i, q, k, v, vis, qk_scale, pos, BPOS, BVAL, rbase, row_ok,
                                            True, UPCAST, PREC, HAS_BIAS, NB)
    else:
        for n in range(t_lo, t_hi, BLOCK_N):  # tail
            idx = n + cols
            ld = idx < t_hi
            pos = tl.load(TPOS + b * s_pos_b + idx, mask=ld, other=-1)
            vis = (pos[None, :] >= 0) & (pos[None, :] <= qpos[:, None])
            k = load_rows(TK, t_row + n, cols, d, ld & (pos >= 0), USE_TMA, True, True)  # empty slots are not read
            v = load_rows(TV, t_row + n, cols, d, ld & (pos >= 0), USE_TMA, True, True)  # and read as 0
            acc, m_i, l_i = attend_block_kb(acc, m_i, l_i, q, k, v, vis, qk_scale, pos, BPOS, BVAL, rbase, row_ok,
                                            True, UPCAST, PREC, HAS_BIAS, NB)

    # partials: acc (n_items, ROWS, D), (m, l) (n_items, 2, ROWS)
    tl.store(PACC + pid * ROWS * HEAD_D + rows[:, None] * HEAD_D + d[None, :], acc, mask=row_ok[:, None])
    tl.store(PML + pid * 2 * ROWS + rows, m_i, mask=row_ok)
    tl.store(PML + pid * 2 * ROWS + ROWS + rows, l_i, mask=row_ok)


@triton.jit(do_not_specialize=["BKV", "KV", "chunk", "n_gw", "n_tw"])
def _decode_combine_kernel(
    PACC, PML, GOFF, OUT, LSE,
    s_ob, s_oq, s_oh,
    s_lb, s_lh,
    BKV, KV, NQ, chunk, n_gw, n_tw,
    G: tl.constexpr, ROWS: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_B: tl.constexpr,
    BKV_P: tl.constexpr, PDL: tl.constexpr,
):
    """One program per (b * KV, row, head-dim slice of BLOCK_D): merge the head's global items and tail
    items (every slice folds the same (m, l); the lse is stored by the first). PDL: launched early,
    while the split grid runs; the head's item range (GOFF, final before the split grid started, which
    does not write it) is computed first, then it waits for the split grid's partials."""
    bh = tl.program_id(0)
    r = tl.program_id(1)
    ds = tl.program_id(2)
    b = bh // KV
    h = bh % KV
    d = ds * BLOCK_D + tl.arange(0, BLOCK_D)
    # This head's global items: [first, first + n_items) (same mapping as the split kernel).
    hv = tl.arange(0, BKV_P)
    o0 = tl.load(GOFF + hv, mask=hv < BKV, other=0).to(tl.int32)
    o1 = tl.load(GOFF + hv + 1, mask=hv < BKV, other=0).to(tl.int32)
    cnt = tl.cdiv(o1 - o0, chunk)
    cum = tl.cumsum(cnt, 0)
    first = tl.sum(tl.where(hv == bh, cum - cnt, 0), 0)
    n_items = tl.sum(tl.where(hv == bh, cnt, 0), 0)
    t0 = n_gw + bh * n_tw  # this head's tail items: [t0, t0 + n_tw)
    if PDL:
        gdc_wait()  # the split grid's partials
    m = tl.full([], float("-inf"), dtype=tl.float32)
    l = tl.full([], 0.0, dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j0 in range(0, n_items + n_tw, SPLIT_B):  # usually one pass: global and tail items together
        j = j0 + tl.arange(0, SPLIT_B)
        ok = j < n_items + n_tw
        sp = tl.where(j < n_items, first + j, t0 + j - n_items)  # (SPLIT_B,) item ids
        m_s = tl.load(PML + sp * 2 * ROWS + r, mask=ok, other=float("-inf"))
        l_s = tl.load(PML + sp * 2 * ROWS + ROWS + r, mask=ok, other=0.0)
        a_s = tl.load(PACC + (sp * ROWS + r)[:, None] * HEAD_D + d[None, :], mask=ok[:, None], other=0.0)
        m_new = tl.maximum(m, tl.max(m_s, 0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        c = tl.exp2(m_s - m_use)  # (SPLIT_B,), 0 for empty items
        c_old = tl.exp2(m - m_use)
        l = l * c_old + tl.sum(l_s * c, 0)
        acc = acc * c_old + tl.sum(a_s * c[:, None], 0)
        m = m_new
    ok = l > 0
    out = tl.where(ok, acc / tl.where(ok, l, 1.0), 0.0)
    lse = tl.where(ok, (m + tl.log2(tl.where(ok, l, 1.0))) * LN2, float("-inf"))
    hrow = r // NQ
    qi = r % NQ
    qh = h * G + hrow
    tl.store(OUT + b * s_ob + qi * s_oq + qh * s_oh + d, out.to(OUT.dtype.element_ty))
    if ds == 0:
        tl.store(LSE + b * s_lb + qh * s_lh + qi, lse)


CONFIG_ENV = "TCA_DECODE_CONFIG"
_CONFIG_KEYS = {"block_n": 16, "num_warps": 1, "num_stages": 1, "items_per_sm": 1, "merge_block": 16,
                "merge_split": 1, "pdl": 0}  # key: minimum
_CONFIG_MAX = {"pdl": 1}  # key: maximum (the rest are unbounded)


@lru_cache(maxsize=8)
def parse_config(text: str) -> dict[str, int]:
    """'key=value,...' with keys block_n, num_warps, num_stages, items_per_sm, merge_block, merge_split
    (integers; all but items_per_sm and num_stages powers of two) and pdl (0/1)
    -> ragged_decode_triton keywords."""
    out: dict[str, int] = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        key, sep, val = part.partition("=")
        key = key.strip()
        if not sep or key not in _CONFIG_KEYS or not val.strip().isdigit():
            raise ValueError(f"{CONFIG_ENV}={text!r}: expected 'key=value,...' with integer values and keys "
                             f"{sorted(_CONFIG_KEYS)}, e.g. 'items_per_sm=2,block_n=64,num_stages=3'")
        n = int(val)
        pow2 = key in ("block_n", "num_warps", "merge_block", "merge_split")
        hi = _CONFIG_MAX.get(key)
        if n < _CONFIG_KEYS[key] or (hi is not None and n > hi) or (pow2 and n & (n - 1)):
            raise ValueError(f"{CONFIG_ENV}={text!r}: {key}={n} must be >= {_CONFIG_KEYS[key]}"
                             + (f" and <= {hi}" if hi is not None else "") + (" and a power of two" if pow2 else ""))
        out[key] = n
    return out


def env_config() -> dict[str, int]:
    """The launch settings TCA_DECODE_CONFIG sets for the engine's decode calls (dispatch.ragged_decode):
    a sweep's winner (`tca bench kernels`' decode_config) tried in a whole model without editing
    the defaults; {} when unset."""
    text = os.environ.get(CONFIG_ENV)
    return parse_config(text) if text else {}


@lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _pick_chunk(total_keys: int, block_n: int, device: torch.device, items_per_sm: int = 4) -> int:
    """Keys per work item: about `items_per_sm` items per SM, at least 4 blocks, a multiple of block_n."""
    if items_per_sm < 1:
        raise ValueError(f"items_per_sm must be >= 1, got {items_per_sm}")
    sms = _num_sms(device.index or 0) if device.type == "cuda" else 4
    c = max(triton.cdiv(max(total_keys, 1), items_per_sm * sms), 4 * block_n)
    return triton.cdiv(c, block_n) * block_n


def ragged_decode_triton(
    q: torch.Tensor,
    cache: RaggedCacheView,
    scaling: float,
    chunk: int | None = None,
    block_n: int = 32,
    num_warps: int = 4,
    num_stages: int = 4,
    use_tma: bool = False,
    merge_block: int = 128,
    merge_split: int = 1,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    selection: DecodeSelection | None = None,
    key_bias: KeyBias | None = None,
    items_per_sm: int = 4,
    pdl: int | bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, Q, D) over the cache (RaggedCacheView: q_pos (B, Q); global (N, D) + g_pos (N,) +
    g_offsets (B*KV+1,); tail (B, KV, T, D) + t_pos (B, T)). -> out (B, Q, H, D) in q's dtype,
    lse (B, H, Q) fp32. selection: attend to only the listed tail pages (DecodeSelection; not
    validated here, that would sync); its tail is read with pointer loads (no TMA).

    chunk: keys per work item (default: about `items_per_sm` items per SM, from the shapes only); block_n, num_warps,
    num_stages: tile and launch settings of the split kernel; use_tma: K/V tiles through TMA
    descriptors (Hopper+, compiled only); merge_block: items the merge folds per pass; merge_split:
    programs per merged row, each folding D / merge_split of the head dim (a power of two dividing
    D: more, smaller programs for a merge whose time is latency, not bytes);
    out/lse: optional contiguous buffers to fill; key_bias: the key logit bias (plan.KeyBias);
    pdl: launch both kernels as programmatic dependent launches (Hopper+, triton >= 3.4): each grid
    starts while the one before drains (the split kernel waits for it before any load, the merge
    after computing its item ranges), hiding launch latency; works inside CUDA graphs.
    """
    c = cache
    q_pos, g_keys, g_values, g_pos, g_offsets = c.q_pos, c.g_keys, c.g_values, c.g_pos, c.g_offsets
    t_keys, t_values, t_pos = c.t_keys, c.t_values, c.t_pos
    B, H, NQ, D = q.shape
    KV, T = t_keys.shape[1], t_keys.shape[2]
    check_heads(H, KV)
    if not isinstance(merge_split, int) or merge_split < 1 or merge_split & (merge_split - 1) or D % merge_split \
            or D // merge_split < 16:
        raise ValueError(f"merge_split must be a power of two cutting head dim {D} into slices of >= 16, "
                         f"got {merge_split!r}")
    pdl = bool(pdl)
    if pdl and (not HAS_GDC or q.device.type != "cuda" or torch.cuda.get_device_capability(q.device)[0] < 9):
        raise ValueError("pdl (programmatic dependent launch) needs a CUDA device of compute capability 9.0+ "
                         f"and triton >= 3.4 (triton {triton.__version__}, device {q.device})")
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
    if tuple(q_pos.shape) != (B, NQ):
        raise ValueError(f"q_pos must be (B, Q) = {(B, NQ)}, got {tuple(q_pos.shape)}")
    q_pos = q_pos.to(device=dev, dtype=torch.int64)  # read through its strides: a static step's is an expand
    g_pos = g_pos.to(device=dev, dtype=torch.int64).contiguous()
    t_pos = t_pos.to(device=dev, dtype=torch.int64).reshape(B, -1).contiguous()  # (B, T)
    g_offsets = g_offsets.to(device=dev, dtype=torch.int64).contiguous()
    BKV = B * KV
    tails = [t_keys.view(-1, D), t_values.view(-1, D)]
    if selection is None:
        page, t_span = 1, T  # t_span: the tail slots (listed slots) a head's items cover
        pages = nsel = t_pos  # unused
        (gk, gv, tk, tv), use_tma = kv_sources([g_keys, g_values, *tails], block_n, use_tma)
    else:
        page = selection.page_size
        pages = selection.pages.to(device=dev, dtype=torch.int32).reshape(BKV, -1)
        t_span = pages.shape[1] * page
        nsel = (pages >= 0).sum(-1, dtype=torch.int32)  # (B*KV,) the valid entries come first
        pages = pages.contiguous() if t_span else torch.full((BKV, 1), -1, dtype=torch.int32, device=dev)
        (gk, gv), use_tma = kv_sources([g_keys, g_values], block_n, use_tma)
        tk, tv = tails  # gathered rows: pointer loads
    if chunk is None:
        chunk = _pick_chunk(g_keys.shape[0] + BKV * t_span, block_n, dev, items_per_sm)
    n_gw = triton.cdiv(g_keys.shape[0], chunk) + BKV  # >= sum over heads of cdiv(len, chunk)
    n_tw = triton.cdiv(t_span, chunk)
    n_items = n_gw + BKV * n_tw
    pacc = torch.empty(n_items, rows, D, dtype=torch.float32, device=dev)
    pml = torch.empty(n_items, 2, rows, dtype=torch.float32, device=dev)
    if out is None:
        out = torch.empty(B, NQ, H, D, dtype=q.dtype, device=dev)
    if lse is None:
        lse = torch.empty(B, H, NQ, dtype=torch.float32, device=dev)
    if out.shape != (B, NQ, H, D) or not out.is_contiguous() or lse.shape != (B, H, NQ) or not lse.is_contiguous():
        raise ValueError("out must be contiguous (B, Q, H, D) and lse contiguous (B, H, Q)")
    bkv_p = triton.next_power_of_2(BKV)
    launch = {"launch_pdl": True} if pdl else {}
    bpos, bval, nb, has_bias = bias_args(key_bias, B, H, dev, g_offsets)
    _decode_split_kernel[(n_items,)](
        q, q_pos, gk, gv, g_pos, g_offsets, tk, tv, t_pos, pages, nsel, pacc, pml, bpos, bval,
        q.stride(0), q.stride(1), q.stride(2),
        t_pos.stride(0), q_pos.stride(0), q_pos.stride(1),
        BKV, KV, T, pages.shape[-1], NQ, scaling * LOG2E, chunk, n_gw, n_tw,
        G=g, ROWS=rows, BLOCK_N=block_n, HEAD_D=D, BKV_P=bkv_p, UPCAST=upcast(q), PREC=precision(q),
        USE_TMA=use_tma, SELECTED=selection is not None, PAGE=page, HAS_BIAS=has_bias, NB=nb, PDL=pdl,
        num_warps=num_warps, num_stages=num_stages, **launch,
    )
    _decode_combine_kernel[(BKV, g * NQ, merge_split)](
        pacc, pml, g_offsets, out, lse,
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        BKV, KV, NQ, chunk, n_gw, n_tw,
        G=g, ROWS=rows, HEAD_D=D, BLOCK_D=D // merge_split, SPLIT_B=merge_block, BKV_P=bkv_p, PDL=pdl, num_warps=4,
        **launch,
    )
    return out, lse
