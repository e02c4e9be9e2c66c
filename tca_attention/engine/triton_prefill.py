"""Triton TCA prefill: flash attention over each query's kept global keys plus its dense band.

Semantics: exactly `reference.sparse_prefill_ref`. Query j of a KV head attends to
  (a) the kept global keys k with key_start <= k < band_start(j), and
  (b) the dense band key_start <= k in [band_start(j), j] (causal window, per (row, KV head) when
      the plan has head_window, extended to the row's local start for queries in the row's local
      region; local starts are per row, (B,)).
Plan of the run:
  1. gather the kept keys/values of each (b, kv head) into a compact buffer (B, KV, M, D), so no
     work is spent on dropped tokens;
  2. per (query tile, b * KV) one program processes the g query heads of the KV head together
     (rows = g_pad x BLOCK_P positions, sharing each K/V load); since kept_idx is ascending and
     band_start is non-decreasing, part (a) of every row of a tile is a prefix of the compact list:
     [kstart, nfar(row)). Blocks that every row sees run without masks; only the edges are masked.
Online softmax in fp32 (exp2 domain); rows that see no key (left-padding queries) give zeros.
Key logit bias (key_bias=, plan.KeyBias; constexpr HAS_BIAS): each step adds the listed keys' biases
to the logits (triton_common.attend_block_kb); the compact kept keys' positions come from KIDX.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .plan import KeyBias, TokenPlan, band_start
from .triton_common import (
    LOG2E, attend_block_kb, band_lo, bias_args, check_head_dim, check_heads, kv_sources, load_rows, next_pow2, precision, upcast,
)


@dataclass(frozen=True)
class PrefillConfig:
    """Tile shape: block_m query rows (g_pad heads x block_m / g_pad positions) x block_n keys."""

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3
    use_tma: bool = False  # K/V tiles through TMA tensor descriptors (Hopper+, compiled only)


# Per head dim defaults; tca_attention/benchmarks/bench_kernels.py sweeps and reports alternatives. On an H100
# (head dim 128, bf16, 32K tokens, 39% kept) the TMA variant with 128-key blocks was fastest:
# 8.09 ms vs 8.74 ms for the pointer loads (docs/kernels.md).
DEFAULT_CONFIGS: dict[int, PrefillConfig] = {
    64: PrefillConfig(128, 64, 4, 3),
    128: PrefillConfig(128, 64, 8, 3),
    256: PrefillConfig(64, 32, 4, 2),
}
HOPPER_CONFIGS: dict[int, PrefillConfig] = {128: PrefillConfig(128, 128, 8, 3, use_tma=True)}


CONFIG_ENV = "TCA_PREFILL_CONFIG"


def parse_config(text: str) -> PrefillConfig:
    """'block_m,block_n,num_warps,num_stages[,tma]' (the form `tca bench kernels` reports) -> PrefillConfig."""
    parts = [x.strip().lower() for x in text.split(",")]
    if len(parts) not in (4, 5) or parts[4:] not in ([], ["tma"]) or not all(x.isdigit() for x in parts[:4]):
        raise ValueError(f"{CONFIG_ENV}={text!r}: expected 'block_m,block_n,num_warps,num_stages[,tma]', "
                         "e.g. '128,128,8,3,tma'")
    bm, bn, warps, stages = (int(x) for x in parts[:4])
    tma = len(parts) == 5
    for name, val in (("block_m", bm), ("block_n", bn), ("num_warps", warps)):
        if val < 1 or val & (val - 1):
            raise ValueError(f"{CONFIG_ENV}={text!r}: {name} must be a power of two, got {val}")
    if stages < 1:
        raise ValueError(f"{CONFIG_ENV}={text!r}: num_stages must be >= 1, got {stages}")
    return PrefillConfig(bm, bn, warps, stages, tma)


def config_text(cfg: PrefillConfig) -> str:
    """The inverse of parse_config."""
    return f"{cfg.block_m},{cfg.block_n},{cfg.num_warps},{cfg.num_stages}" + (",tma" if cfg.use_tma else "")


def default_config(head_dim: int, device: torch.device | None = None) -> PrefillConfig:
    """Tile config for a head dim; Hopper+ GPUs get the TMA variant where it was measured faster.
    The environment variable TCA_PREFILL_CONFIG (parse_config's form) overrides it for every head
    dim: a tile sweep's winner tried in a whole model without editing the table."""
    if text := os.environ.get(CONFIG_ENV):
        return parse_config(text)
    if device is not None and device.type == "cuda" and head_dim in HOPPER_CONFIGS:
        if torch.cuda.get_device_capability(device) >= (9, 0):
            return HOPPER_CONFIGS[head_dim]
    if head_dim in DEFAULT_CONFIGS:
        return DEFAULT_CONFIGS[head_dim]
    return PrefillConfig(64, 32, 4, 2)


@triton.jit
def _attend_band_edge(acc, m_i, l_i, q, k_src, v_src, k_row, kk, cols, d, lo_row, prow, ks, L, qk_scale,
                      BPOS, BVAL, rbase, row_ok,
                      USE_TMA: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                      HAS_BIAS: tl.constexpr, NB: tl.constexpr):
    """A band block [kk, kk + BLOCK_N) that some rows see only in part: masked by each row's band
    [lo_row, prow], the row's first real key ks and the sequence end L."""
    k_idx = kk + cols
    ld = k_idx < L
    vis = (k_idx[None, :] >= lo_row[:, None]) & (k_idx[None, :] <= prow[:, None]) & (k_idx[None, :] >= ks)
    k = load_rows(k_src, k_row + kk, cols, d, ld, USE_TMA, True, False)
    v = load_rows(v_src, k_row + kk, cols, d, ld, USE_TMA, True, False)
    return attend_block_kb(acc, m_i, l_i, q, k, v, vis, qk_scale, k_idx, BPOS, BVAL, rbase, row_ok,
                           True, UPCAST, PREC, HAS_BIAS, NB)


@triton.jit
def _prefill_kernel(
    Q, K, V, KC, VC, KIDX, KSTART, NFAR, KEY_START, LOCAL_START, WINDOW, OUT, BPOS, BVAL,
    s_qb, s_qh, s_ql,
    s_ob, s_ol, s_oh,
    L, M, KV, n_tiles, qk_scale,
    G: tl.constexpr, GP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_D: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr, PREC: tl.constexpr,
    HAS_BIAS: tl.constexpr, NB: tl.constexpr,
):
    """K/V (B*KV*L, D) and KC/VC (B*KV*M, D) row-major (pointers or TMA descriptors); KIDX (B*KV, M);
    KEY_START, LOCAL_START (B,) each row's first real key and local start; WINDOW (B*KV,) each
    (row, KV head)'s causal window; BPOS/BVAL (B, H, NB) the key logit bias when HAS_BIAS."""
    BM: tl.constexpr = GP * BLOCK_P
    tile = n_tiles - 1 - tl.program_id(0)  # heaviest tiles first
    bh = tl.program_id(1)
    b = bh // KV
    h = bh % KV
    m0 = tile * BLOCK_P

    rows = tl.arange(0, BM)
    hrow = rows // BLOCK_P  # head inside the group
    prow = m0 + rows % BLOCK_P  # query position
    row_ok = (hrow < G) & (prow < L)
    d = tl.arange(0, HEAD_D)
    qh = h * G + hrow
    q_ptrs = Q + b.to(tl.int64) * s_qb + qh[:, None] * s_qh + prow[:, None] * s_ql + d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)  # (BM, D)
    local_start = tl.load(LOCAL_START + b).to(tl.int32)
    window = tl.load(WINDOW + bh).to(tl.int32)
    lo_row = band_lo(prow, window, local_start)  # (BM,)
    rbase = ((b * KV * G + qh) * NB).to(tl.int64)  # this row's key-bias slots

    acc = tl.zeros([BM, HEAD_D], dtype=tl.float32)
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    cols = tl.arange(0, BLOCK_N)

    # Pointer mode: move the base to this head (64-bit), rows are then head-local.
    # TMA mode: coordinates are rows of the whole (B*KV*rows, D) matrix.
    if USE_TMA:
        kc_src = KC
        vc_src = VC
        k_src = K
        v_src = V
        c_row = bh * M
        k_row = bh * L
    else:
        kc_src = KC + bh.to(tl.int64) * M * HEAD_D
        vc_src = VC + bh.to(tl.int64) * M * HEAD_D
        k_src = K + bh.to(tl.int64) * L * HEAD_D
        v_src = V + bh.to(tl.int64) * L * HEAD_D
        c_row = 0
        k_row = 0

    # (a) kept global keys: compact entries [kstart, nfar_min) are seen by every row.
    kstart = tl.load(KSTART + bh)
    nfar_min = tl.load(NFAR + bh * 2 * n_tiles + 2 * tile)
    nfar_max = tl.load(NFAR + bh * 2 * n_tiles + 2 * tile + 1)
    full_end = kstart + tl.maximum(nfar_min - kstart, 0) // BLOCK_N * BLOCK_N
    for c in range(kstart, full_end, BLOCK_N):
        k = load_rows(kc_src, c_row + c, cols, d, None, USE_TMA, False, False)
        v = load_rows(vc_src, c_row + c, cols, d, None, USE_TMA, False, False)
        if HAS_BIAS:
            kid = tl.load(KIDX + bh.to(tl.int64) * M + c + cols)
        else:
            kid = c + cols
        acc, m_i, l_i = attend_block_kb(acc, m_i, l_i, q, k, v, None, qk_scale, kid, BPOS, BVAL, rbase, row_ok,
                                        False, UPCAST, PREC, HAS_BIAS, NB)
    for c in range(full_end, nfar_max, BLOCK_N):
        c_idx = c + cols
        in_rng = c_idx < nfar_max
        kid = tl.load(KIDX + bh.to(tl.int64) * M + c_idx, mask=in_rng, other=2147483647)
        vis = in_rng[None, :] & (kid[None, :] < lo_row[:, None])
        k = load_rows(kc_src, c_row + c, cols, d, in_rng, USE_TMA, True, False)
        v = load_rows(vc_src, c_row + c, cols, d, in_rng, USE_TMA, True, False)
        acc, m_i, l_i = attend_block_kb(acc, m_i, l_i, q, k, v, vis, qk_scale, kid, BPOS, BVAL, rbase, row_ok,
                                        True, UPCAST, PREC, HAS_BIAS, NB)

    # (b) dense band: keys [s0, j_max]; [max(lo_max, s0), j_min] is seen by every row.
    ks = tl.load(KEY_START + b).to(tl.int32)
    j_min = m0
    j_max = tl.minimum(m0 + BLOCK_P - 1, L - 1)
    lo_min = band_lo(j_min, window, local_start)
    lo_max = band_lo(j_max, window, local_start)
    s0 = tl.maximum(tl.maximum(lo_min, ks), 0)
    a = tl.maximum(lo_max, s0)
    left_end = tl.minimum(s0 + (a - s0 + BLOCK_N - 1) // BLOCK_N * BLOCK_N, j_max + 1)
    int_end = left_end + tl.maximum(j_min + 1 - left_end, 0) // BLOCK_N * BLOCK_N
    for kk in range(s0, left_end, BLOCK_N):
        acc, m_i, l_i = _attend_band_edge(acc, m_i, l_i, q, k_src, v_src, k_row, kk, cols, d, lo_row, prow, ks, L,
                                          qk_scale, BPOS, BVAL, rbase, row_ok, USE_TMA, UPCAST, PREC, HAS_BIAS, NB)
    for kk in range(left_end, int_end, BLOCK_N):
        k = load_rows(k_src, k_row + kk, cols, d, None, USE_TMA, False, False)
        v = load_rows(v_src, k_row + kk, cols, d, None, USE_TMA, False, False)
        acc, m_i, l_i = attend_block_kb(acc, m_i, l_i, q, k, v, None, qk_scale, kk + cols, BPOS, BVAL, rbase, row_ok,
                                        False, UPCAST, PREC, HAS_BIAS, NB)
    for kk in range(int_end, j_max + 1, BLOCK_N):
        acc, m_i, l_i = _attend_band_edge(acc, m_i, l_i, q, k_src, v_src, k_row, kk, cols, d, lo_row, prow, ks, L,
                                          qk_scale, BPOS, BVAL, rbase, row_ok, USE_TMA, UPCAST, PREC, HAS_BIAS, NB)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out = tl.where((l_i > 0)[:, None], out, 0.0)
    o_ptrs = OUT + b.to(tl.int64) * s_ob + prow[:, None] * s_ol + qh[:, None] * s_oh + d[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _compact_kernel(K, V, KEPT_IDX, KEPT_LEN, KC, VC, KIDX, L, M_in, M,
                    HEAD_D: tl.constexpr, ROWS: tl.constexpr):
    """Rows [r0, r0 + ROWS) of (b, KV head) bh's compact list: KIDX (B*KV, M) int32 the kept
    position (L past kept_len), KC/VC (B*KV*M, D) the key/value row at it (row L - 1 for padding);
    K/V (B*KV*L, D), KEPT_IDX (B*KV, M_in) with M_in <= M (M_in = 0: nothing kept anywhere)."""
    bh = tl.program_id(0)
    r = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    in_m = r < M
    real = r < tl.load(KEPT_LEN + bh)
    idx = tl.load(KEPT_IDX + bh.to(tl.int64) * M_in + r, mask=real & (r < M_in), other=0)
    idx = tl.where(real, idx, L)
    tl.store(KIDX + bh.to(tl.int64) * M + r, idx.to(tl.int32), mask=in_m)
    d = tl.arange(0, HEAD_D)
    src = (bh.to(tl.int64) * L + tl.minimum(idx, L - 1))[:, None] * HEAD_D + d[None, :]
    dst = (bh.to(tl.int64) * M + r)[:, None] * HEAD_D + d[None, :]
    tl.store(KC + dst, tl.load(K + src, mask=in_m[:, None]), mask=in_m[:, None])
    tl.store(VC + dst, tl.load(V + src, mask=in_m[:, None]), mask=in_m[:, None])


@triton.jit
def _count_below(base, M, x, steps):
    """Entries of the ascending list base[0:M] below x (vector x): torch.searchsorted's left side."""
    lo = tl.zeros_like(x)
    hi = tl.zeros_like(x) + M
    for _ in range(steps):
        active = lo < hi
        mid = (lo + hi) // 2
        a = tl.load(base + mid, mask=active, other=0)
        right = active & (a < x)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & (a >= x), mid, hi)
    return lo


@triton.jit
def _bounds_kernel(KIDX, KEPT_LEN, KEY_START, LOCAL_START, WINDOW, KSTART, NFAR,
                   L, M, KV, n_tiles, block_p, steps, TILES: tl.constexpr):
    """NFAR (B*KV, 2 * n_tiles) and KSTART (B*KV,) int32 of prepare_prefill from KIDX (_compact_kernel's)."""
    bh = tl.program_id(0)
    b = bh // KV
    t = tl.program_id(1) * TILES + tl.arange(0, TILES)
    t_ok = t < n_tiles
    n = tl.load(KEPT_LEN + bh)
    ls = tl.load(LOCAL_START + b).to(tl.int32)
    w = tl.load(WINDOW + bh).to(tl.int32)
    base = KIDX + bh.to(tl.int64) * M
    m0 = t * block_p
    lo0 = band_lo(m0, w, ls)
    lo1 = band_lo(tl.minimum(m0 + block_p - 1, L - 1), w, ls)
    ks = tl.zeros_like(t) + tl.load(KEY_START + b).to(tl.int32)
    kstart = _count_below(base, M, ks, steps)  # entries before the row's first real key
    c0 = tl.minimum(tl.maximum(_count_below(base, M, lo0, steps), kstart), n)
    c1 = tl.minimum(tl.maximum(_count_below(base, M, lo1, steps), kstart), n)
    out = NFAR + (bh.to(tl.int64) * n_tiles + t) * 2
    tl.store(out, c0, mask=t_ok)
    tl.store(out + 1, c1, mask=t_ok)
    tl.store(KSTART + bh + t * 0, tl.minimum(kstart, n), mask=t == 0)


def prepare_prefill(
    k: torch.Tensor, v: torch.Tensor, plan: TokenPlan, block_p: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compact kept K/V and per-tile prefix bounds in two kernels (`prepare_prefill_ref` in
    PyTorch, ~39 launches, is the reference: equal outputs). k, v contiguous (B, KV, L, D).

    -> kc/vc (B, KV, M, D), kidx (B, KV, M) int32 (padding = L), kstart (B*KV,) int32,
       nfar (B*KV, 2 * n_tiles) int32, per tile: [count of kept < band_start(tile's first row),
       count of kept < band_start(tile's last row)], clamped to [kstart, kept_len]. M = the plan's
       width, 1 when it is 0 (one entry no row sees).
    """
    B, KV, L, D = k.shape
    if not (k.is_contiguous() and v.is_contiguous()) or D & (D - 1):
        return prepare_prefill_ref(k, v, plan, block_p)
    dev = k.device
    m_in = plan.kept_idx.shape[-1]
    M = max(m_in, 1)
    kept_idx = plan.kept_idx.to(dev).contiguous() if m_in else torch.zeros(B, KV, 1, dtype=torch.long, device=dev)
    kept_len = plan.kept_len.to(device=dev, dtype=torch.int32).contiguous()
    kc = torch.empty(B, KV, M, D, dtype=k.dtype, device=dev)
    vc = torch.empty_like(kc)
    kidx = torch.empty(B, KV, M, dtype=torch.int32, device=dev)
    rows = 32 if D <= 128 else 16
    _compact_kernel[(B * KV, triton.cdiv(M, rows))](k, v, kept_idx, kept_len, kc, vc, kidx, L, m_in, M,
                                                    HEAD_D=D, ROWS=rows, num_warps=4)
    n_tiles = triton.cdiv(L, block_p)
    kstart = torch.empty(B * KV, dtype=torch.int32, device=dev)
    nfar = torch.empty(B * KV, 2 * n_tiles, dtype=torch.int32, device=dev)
    tiles = min(1024, max(16, next_pow2(n_tiles)))
    _bounds_kernel[(B * KV, triton.cdiv(n_tiles, tiles))](
        kidx, kept_len, plan.key_start.to(dev).contiguous(), plan.local_starts().to(dev).contiguous(),
        plan.window_of(B, KV, dev).contiguous(), kstart, nfar, L, M, KV, n_tiles, block_p, M.bit_length(),
        TILES=tiles, num_warps=4,
    )
    return kc, vc, kidx, kstart, nfar


def prepare_prefill_ref(
    k: torch.Tensor, v: torch.Tensor, plan: TokenPlan, block_p: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """prepare_prefill in plain PyTorch (the reference; also the path for a non-contiguous k/v)."""
    B, KV, L, D = k.shape
    dev = k.device
    M = plan.kept_idx.shape[-1]
    ar_m = torch.arange(M, device=dev)
    kept_len = plan.kept_len.to(dev).long()
    # Entries past kept_len are padding: force them past every band start so searches skip them.
    kidx = torch.where(ar_m < kept_len[..., None], plan.kept_idx.to(dev), torch.full_like(plan.kept_idx, L).to(dev))
    if M == 0:  # nothing kept anywhere: one dummy entry that no row sees
        kidx = torch.full((B, KV, 1), L, dtype=torch.long, device=dev)
    # whole rows by a flat row index (index_select copies D-contiguous rows; a gather with the index
    # expanded over D reads an index per element: 7x slower on the CPU at 32K)
    rows = (kidx.clamp(max=L - 1) + torch.arange(B * KV, device=dev).view(B, KV, 1) * L).reshape(-1)
    kc = k.reshape(B * KV * L, D).index_select(0, rows).view(B, KV, -1, D)
    vc = v.reshape(B * KV * L, D).index_select(0, rows).view(B, KV, -1, D)

    n_tiles = triton.cdiv(L, block_p)
    m0 = torch.arange(n_tiles, device=dev) * block_p
    j_max = torch.clamp(m0 + block_p - 1, max=L - 1)
    ls = plan.local_starts().to(dev).long()[:, None, None]  # (B, 1, 1) per-row local starts
    w = plan.window_of(B, KV, dev)[..., None]  # (B, KV, 1) per-head windows
    lo = torch.stack([band_start(m0, w, ls), band_start(j_max, w, ls)], -1)  # (B, KV, n_tiles, 2)
    flat = kidx.reshape(B * KV, -1).contiguous()  # (B*KV, M)
    lo = lo.reshape(B * KV, -1).contiguous()  # (B*KV, n_tiles*2)
    nfar = torch.searchsorted(flat, lo)  # count of kept < lo
    ks = plan.key_start.to(dev).long().repeat_interleave(KV)[:, None].contiguous()  # (B*KV, 1)
    kstart = torch.searchsorted(flat, ks)  # (B*KV, 1)
    nfar = torch.minimum(torch.maximum(nfar, kstart), kept_len.reshape(-1, 1))
    kstart = torch.minimum(kstart, kept_len.reshape(-1, 1))
    return (
        kc,
        vc,
        kidx.to(torch.int32).contiguous(),
        kstart.reshape(-1).to(torch.int32).contiguous(),
        nfar.to(torch.int32).contiguous(),
    )


def sparse_prefill_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: TokenPlan,
    scaling: float,
    config: PrefillConfig | None = None,
    out: torch.Tensor | None = None,
    key_bias: KeyBias | None = None,
) -> torch.Tensor:
    """q (B, H, L, D), k/v (B, KV, L, D) -> out (B, L, H, D) in q's dtype.

    config: tile shape (default per head dim); out: optional contiguous (B, L, H, D) buffer to fill;
    key_bias: the key logit bias (plan.KeyBias; not validated here, that would sync).
    """
    B, H, L, D = q.shape
    KV = k.shape[1]
    check_heads(H, KV)
    check_head_dim(D)
    g = H // KV
    cfg = config or default_config(D, q.device)
    gp = next_pow2(g)
    block_m = max(cfg.block_m, gp)  # (g_pad heads) x (block_p positions)
    block_p = block_m // gp
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    kc, vc, kidx, kstart, nfar = prepare_prefill(k, v, plan, block_p)
    local_starts = plan.local_starts().to(device=q.device, dtype=torch.int64).contiguous()
    windows = plan.window_of(B, KV, q.device).reshape(-1).contiguous()  # (B*KV,)
    if out is None:
        out = torch.empty(B, L, H, D, dtype=q.dtype, device=q.device)
    elif out.shape != (B, L, H, D) or not out.is_contiguous() or out.dtype != q.dtype:
        raise ValueError("out must be a contiguous (B, L, H, D) tensor of q's dtype")
    n_tiles = triton.cdiv(L, block_p)
    M = kc.shape[2]
    srcs, use_tma = kv_sources([t.view(-1, D) for t in (k, v, kc, vc)], cfg.block_n, cfg.use_tma)  # (rows, D) each
    grid = (n_tiles, B * KV)
    bpos, bval, nb, has_bias = bias_args(key_bias, B, H, q.device, kidx)
    _prefill_kernel[grid](
        q, *srcs, kidx, kstart, nfar, plan.key_start.to(q.device), local_starts, windows, out, bpos, bval,
        q.stride(0), q.stride(1), q.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        L, M, KV, n_tiles, scaling * LOG2E,
        G=g, GP=gp, BLOCK_P=block_p, BLOCK_N=cfg.block_n, HEAD_D=D, UPCAST=upcast(q), USE_TMA=use_tma, PREC=precision(q),
        HAS_BIAS=has_bias, NB=nb, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
