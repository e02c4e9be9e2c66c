"""Triton kernels against the PyTorch reference executors.

Without CUDA the kernels run under the Triton interpreter (set up by kernel_helpers, imported
before the kernel modules), so these tests run in CI on the CPU. Tests marked `gpu` use
realistic sizes and need CUDA. Tolerance: kernel_helpers (flash-attention's method; for the
prefill the low-precision baseline uses an explicit L x L mask).
"""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from kernel_helpers import CUDA, DEV, GPU_FUZZ_SHARDS, check_close, check_decode, make_qkv, masked_attention_lowp, run_decode  # noqa: I001 - first: the interpreter

from tca_attention.engine import reference as R
from tca_attention.engine.plan import RaggedCacheView, TokenPlan, pack_mask
from tca_attention.engine.triton_prefill import PrefillConfig, default_config, sparse_prefill_triton
from tca_attention.methods.base import row_geometry
# Small tiles under the interpreter exercise more masked/unmasked segments and stay fast.
SMALL = PrefillConfig(block_m=32, block_n=32, num_warps=4, num_stages=1) if not CUDA else None


# ---------------------------------------------------------------------------------------------
# helpers
def random_plan(
    gen: torch.Generator, B: int, KV: int, L: int, window: int, block: int, frac: float,
    key_start: list[int], pad_with_local_start: bool = False, per_row: bool = False,
) -> TokenPlan:
    """A plan with a random ragged kept set per (b, kv head), each head its own density.

    per_row: the geometry of a left-padded batch (methods.base.row_geometry): each row's blocks
    start at its key_start, so rows have their own local starts (row_local_start)."""
    n_blocks = (L - window) // block if L > window + block else 0
    local_start = n_blocks * block
    ks = torch.tensor(key_start, dtype=torch.long)
    row_ls = row_geometry(L, ks, block, window)[1] if per_row else None
    ls = row_ls if per_row else torch.full_like(ks, local_start)
    dens = (torch.rand(B, KV, 1, generator=gen) * 2 * frac).clamp(max=1.0)  # ragged budgets
    glob = torch.arange(L)[None, :] < ls[:, None]
    if per_row:
        glob &= torch.arange(L)[None, :] >= ks[:, None]
    width = L if per_row else local_start
    mask = (torch.rand(B, KV, width, generator=gen) < dens) & glob[:, None, :width]
    idx, lens = pack_mask(mask)  # padding = width
    if pad_with_local_start:  # the other padding convention
        idx = torch.where(idx >= width, torch.full_like(idx, local_start), idx)
    elif not per_row:  # one past the prompt
        idx = torch.where(idx >= local_start, torch.full_like(idx, L), idx)
    return TokenPlan(
        kept_idx=idx.to(DEV), kept_len=lens.to(DEV), local_start=local_start, window=window,
        block_size=block, key_start=ks.to(DEV), decode_keep=torch.ones(KV, dtype=torch.long, device=DEV),
        row_local_start=row_ls.to(DEV) if per_row else None,
    )


def plan_mask(plan: TokenPlan, L: int) -> torch.Tensor:
    """Explicit visibility (B, KV, L, L) of a plan, written independently of the executors."""
    B, KV, _ = plan.kept_idx.shape
    j = torch.arange(L, device=DEV)
    kept = torch.zeros(B, KV, L + 1, dtype=torch.bool, device=DEV)
    ar = torch.arange(plan.kept_idx.shape[-1], device=DEV)
    valid = ar < plan.kept_len[..., None].long()
    idx = torch.where(valid, plan.kept_idx.clamp(max=L), torch.full_like(plan.kept_idx, L))
    kept.scatter_(-1, idx, True)
    kept = kept[..., :L]
    ls = plan.row_local_start if plan.row_local_start is not None else torch.full_like(plan.key_start, plan.local_start)
    w = plan.window_of(B, KV, DEV)[..., None]  # (B, KV, 1) per-head windows
    ls = ls[:, None, None]
    lo = torch.where(j >= ls, torch.minimum(j - w + 1, ls), j - w + 1)  # (B, KV, L)
    causal = j[None, :] <= j[:, None]
    band = causal[None, None] & (j[None, None, None, :] >= lo[..., None])  # (B, KV, L, L)
    far = kept[:, :, None, :] & (j[None, None, None, :] < lo[..., None])
    pad = j[None, :] >= plan.key_start[:, None]  # (B, L)
    return (band | far) & pad[:, None, None, :]


def run_prefill(q, k, v, plan, scaling, config=None) -> torch.Tensor:
    B, H, L, D = q.shape
    out = torch.full((B, L, H, D), float("nan"), dtype=q.dtype, device=DEV)  # poison
    return sparse_prefill_triton(q, k, v, plan, scaling, config=config, out=out)


# ---------------------------------------------------------------------------------------------
# prefill, interpreter on CPU (real kernels on CUDA)
PREFILL_CASES = [
    # B, H, KV, L, D, window, block, key_start, frac, dtype, per-row geometry (padded batch)
    (2, 8, 2, 97, 64, 24, 16, [0, 7], 0.4, torch.float32, False),
    (1, 6, 2, 200, 128, 24, 32, [5], 0.3, torch.bfloat16, False),
    (2, 2, 2, 333, 64, 40, 16, [0, 50], 0.5, torch.float16, False),
    (1, 4, 1, 200, 32, 24, 16, [0], 0.25, torch.bfloat16, False),
    (2, 8, 2, 333, 64, 24, 32, [0, 41], 0.39, torch.bfloat16, False),
    # per-row local starts: rows of different block phases, one row dense (local start = key_start)
    (3, 8, 2, 201, 64, 24, 16, [0, 37, 170], 0.4, torch.float32, True),
    (3, 6, 2, 333, 64, 40, 16, [0, 9, 100], 0.39, torch.bfloat16, True),
    (2, 4, 1, 150, 32, 24, 32, [3, 70], 0.5, torch.float16, True),
]


@pytest.mark.parametrize("case", PREFILL_CASES,
                         ids=lambda c: f"B{c[0]}H{c[1]}KV{c[2]}L{c[3]}D{c[4]}{str(c[9])[6:]}{'-rows' if c[10] else ''}")
def test_prefill_matches_reference(case):
    B, H, KV, L, D, w, bs, ks, frac, dtype, per_row = case
    gen = torch.Generator().manual_seed(L * 31 + D)
    q, k, v = make_qkv(gen, B, H, KV, L, D, dtype)
    plan = random_plan(gen, B, KV, L, w, bs, frac, ks, pad_with_local_start=(L % 2 == 0), per_row=per_row)
    assert plan.local_start > 0 and int(plan.kept_len.min()) < plan.local_start  # really sparse
    if per_row:  # really per row: local starts differ, and differ from the unpadded row's
        assert len(set(plan.row_local_start.tolist())) == B
    scaling = D**-0.5
    out = run_prefill(q, k, v, plan, scaling, SMALL)
    ref = R.sparse_prefill_ref(q.float(), k.float(), v.float(), plan, scaling)
    lowp = masked_attention_lowp(q, k, v, plan_mask(plan, L), scaling) if dtype != torch.float32 else None
    check_close(out, ref, lowp)
    # Left-padding queries see nothing: exact zeros.
    for b, s in enumerate(ks):
        assert (out[b, :s] == 0).all()


def test_prefill_tma_descriptor_path():
    """The TMA-descriptor load path (loads past a head's rows are masked) gives the same result."""
    gen = torch.Generator().manual_seed(21)
    B, H, KV, L, D = 2, 8, 2, 130, 32
    q, k, v = make_qkv(gen, B, H, KV, L, D, torch.float16)
    plan = random_plan(gen, B, KV, L, 24, 16, 0.4, [0, 9])
    cfg = PrefillConfig(32, 16, 4, 1, use_tma=True) if not CUDA else PrefillConfig(128, 64, 8, 3, use_tma=True)
    out = run_prefill(q, k, v, plan, D**-0.5, cfg)
    ref = R.sparse_prefill_ref(q.float(), k.float(), v.float(), plan, D**-0.5)
    check_close(out, ref, masked_attention_lowp(q, k, v, plan_mask(plan, L), D**-0.5))


HEAD_WINDOW_CASES = [
    # B, H, KV, L, D, window, block, key_start, dtype, per-row geometry
    (2, 8, 2, 161, 64, 16, 16, [0, 23], torch.float32, False),
    (3, 6, 3, 200, 32, 24, 16, [0, 9, 120], torch.bfloat16, True),
]


@pytest.mark.parametrize("case", HEAD_WINDOW_CASES, ids=lambda c: f"B{c[0]}KV{c[2]}L{c[3]}{'-rows' if c[9] else ''}")
def test_prefill_per_head_windows(case):
    """head_window (MoA's per-head spans): each (row, KV head) its own band; the kernel, the
    reference and an explicit mask agree, and the bands really differ between heads."""
    B, H, KV, L, D, w, bs, ks, dtype, per_row = case
    gen = torch.Generator().manual_seed(L + KV)
    q, k, v = make_qkv(gen, B, H, KV, L, D, dtype)
    plan = random_plan(gen, B, KV, L, w, bs, 0.2, ks, per_row=per_row)
    hw = torch.randint(w, L, (B, KV), generator=gen)
    hw[0, 0], hw[0, -1] = w, L  # the cache's window and a band spanning the whole prompt
    plan = dataclasses.replace(plan, head_window=hw.to(DEV))
    scaling = D**-0.5
    ref = R.sparse_prefill_ref(q.float(), k.float(), v.float(), plan, scaling)
    explicit = masked_attention_lowp(q.float(), k.float(), v.float(), plan_mask(plan, L), scaling)
    torch.testing.assert_close(explicit, ref, atol=1e-5, rtol=1e-5)
    uniform = R.sparse_prefill_ref(q.float(), k.float(), v.float(), dataclasses.replace(plan, head_window=None), scaling)
    assert not torch.allclose(uniform, ref, atol=1e-3)  # the windows matter
    lowp = masked_attention_lowp(q, k, v, plan_mask(plan, L), scaling) if dtype != torch.float32 else None
    check_close(run_prefill(q, k, v, plan, scaling, SMALL), ref, lowp)


@pytest.mark.parametrize("per_row", [False, True])
def test_plan_mask_agrees_with_reference(per_row):
    """The explicit mask used for the low-precision baseline states the same semantics."""
    gen = torch.Generator().manual_seed(3)
    B, H, KV, L, D = 2, 4, 2, 90, 16
    q, k, v = make_qkv(gen, B, H, KV, L, D, torch.float32)
    plan = random_plan(gen, B, KV, L, 20, 16, 0.4, [0, 9], per_row=per_row)
    ref = R.sparse_prefill_ref(q, k, v, plan, 0.3)
    alt = masked_attention_lowp(q, k, v, plan_mask(plan, L), 0.3)
    torch.testing.assert_close(alt, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_full_budget_equals_dense(dtype):
    gen = torch.Generator().manual_seed(11)
    B, H, KV, L, D, w, bs = 2, 4, 2, 150, 32, 16, 16
    q, k, v = make_qkv(gen, B, H, KV, L, D, dtype)
    plan = random_plan(gen, B, KV, L, w, bs, 1.0, [0, 13])
    ls = plan.local_start
    idx = torch.arange(ls, device=DEV).expand(B, KV, ls).contiguous()
    plan = TokenPlan(idx, torch.full((B, KV), ls, dtype=torch.int32, device=DEV), ls, w, bs, plan.key_start, plan.decode_keep)
    out = run_prefill(q, k, v, plan, D**-0.5, SMALL)
    dense = R.dense_causal_ref(q.float(), k.float(), v.float(), D**-0.5, plan.key_start)
    lowp = masked_attention_lowp(q, k, v, plan_mask(plan, L), D**-0.5) if dtype != torch.float32 else None
    check_close(out, dense, lowp)


def test_prefill_short_prompt_is_dense_and_empty_kept_set():
    """L <= w + b: no global region (local_start 0), so attention is dense causal."""
    gen = torch.Generator().manual_seed(5)
    B, H, KV, L, D = 1, 4, 2, 40, 16
    q, k, v = make_qkv(gen, B, H, KV, L, D, torch.float32)
    plan = random_plan(gen, B, KV, L, 32, 16, 0.5, [0])
    assert plan.local_start == 0 and plan.kept_idx.shape[-1] == 0
    out = run_prefill(q, k, v, plan, 0.25, SMALL)
    torch.testing.assert_close(out, R.dense_causal_ref(q, k, v, 0.25), atol=1e-5, rtol=1e-5)


COMPACTION_CASES = [
    # B, KV, L, D, window, block, key_start, frac, per-row geometry, padding = local start, block_p, head windows
    (2, 2, 97, 64, 24, 16, [0, 7], 0.4, False, False, 16, False),
    (1, 3, 333, 128, 40, 16, [5], 0.05, False, True, 32, False),  # sparse; padding at local_start
    (3, 2, 201, 32, 24, 16, [0, 37, 170], 0.4, True, False, 8, False),  # per-row starts, one row dense
    (2, 3, 200, 256, 24, 16, [0, 9], 1.0, True, False, 64, True),  # everything kept, head windows
    (1, 2, 40, 16, 32, 16, [0], 0.5, False, False, 16, False),  # short: nothing global, width 0
    (2, 1, 150, 64, 24, 32, [3, 70], 0.0, True, False, 128, False),  # nothing kept, wide tiles
]


@pytest.mark.parametrize("case", COMPACTION_CASES, ids=lambda c: f"B{c[0]}KV{c[1]}L{c[2]}D{c[3]}p{c[10]}")
def test_compaction_kernels_equal_the_reference(case):
    """prepare_prefill's two kernels (compaction + per-tile bounds) give exactly what the PyTorch
    reference gives: the compact K/V rows, their positions (padding L), kstart and the bounds."""
    from tca_attention.engine.triton_prefill import prepare_prefill, prepare_prefill_ref

    B, KV, L, D, w, bs, ks, frac, per_row, pad_ls, block_p, head_windows = case
    gen = torch.Generator().manual_seed(L * D + KV)
    _, k, v = make_qkv(gen, B, KV, KV, L, D, torch.bfloat16)
    plan = random_plan(gen, B, KV, L, w, bs, frac, ks, pad_with_local_start=pad_ls, per_row=per_row)
    if head_windows:
        plan = dataclasses.replace(plan, head_window=torch.randint(w, L + 1, (B, KV), generator=gen).to(DEV))
    got = prepare_prefill(k.contiguous(), v.contiguous(), plan, block_p)
    want = prepare_prefill_ref(k, v, plan, block_p)
    for name, g, r in zip(("kc", "vc", "kidx", "kstart", "nfar"), got, want):
        assert g.dtype == r.dtype and g.shape == r.shape, name
        assert torch.equal(g, r), name
    assert int(got[4].max()) <= max(int(plan.kept_len.max()), 0)
    if frac > 0 and plan.kept_idx.shape[-1]:
        assert int(got[4].max()) > 0 and int(got[2].min()) < L  # something kept and seen: a real check



def test_compaction_launches_two_kernels_and_no_torch_work(monkeypatch):
    """Issue 15's "prefill without per-layer overhead": prepare_prefill launches its two kernels
    once each and, besides allocating, runs no torch op but the plan's two fills (local starts,
    windows) where the plan has none stored (the reference ran ~39 launches)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import tca_attention.engine.triton_prefill as TP

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    class Launches:
        def __init__(self) -> None:
            self.grids: list[tuple] = []

        def __getitem__(self, grid):
            return lambda *a, **k: self.grids.append(grid)

    gen = torch.Generator().manual_seed(11)
    _, k, v = make_qkv(gen, 2, 2, 2, 200, 64, torch.bfloat16)
    k, v = k.contiguous(), v.contiguous()
    for per_row in (False, True):
        plan = random_plan(gen, 2, 2, 200, 24, 16, 0.3, [0, 9], per_row=per_row)
        compact, bounds = Launches(), Launches()
        monkeypatch.setattr(TP, "_compact_kernel", compact)
        monkeypatch.setattr(TP, "_bounds_kernel", bounds)
        ops = Ops()
        with ops:
            TP.prepare_prefill(k, v, plan, 16)
        assert len(compact.grids) == 1 and len(bounds.grids) == 1
        work = [n for n in ops.names if not n.startswith(("aten.empty", "aten.view", "aten.alias"))]
        assert len(work) <= 2 and all(n.startswith("aten.full") for n in work), work

# ---------------------------------------------------------------------------------------------
# decode

# ---------------------------------------------------------------------------------------------
# decode
def random_cache(gen, B, H, KV, NQ, D, T, max_g, dtype):
    """Ragged global segments (some empty), a tail with invalid slots, and a query that sees nothing."""
    lens = torch.randint(0, max_g, (B * KV,), generator=gen)
    lens[0] = 0
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    N = int(offsets[-1])
    start = 10 * max_g
    g_pos = [torch.sort(torch.randperm(start, generator=gen)[: int(n)]).values for n in lens]
    g_pos = torch.cat(g_pos) if N else torch.zeros(0, dtype=torch.long)
    t_pos = torch.arange(start, start + T).repeat(B, 1)
    t_pos[0, -3:] = -1  # empty slots
    q_pos = torch.full((B, NQ), start + T - 4)
    q_pos[:, 0] -= NQ + 5
    q_pos[-1, -1] = -2  # sees nothing: zeros, lse -inf
    f = lambda *s: torch.randn(*s, generator=gen).to(DEV, dtype)  # noqa: E731
    q = f(B, H, NQ, D)
    cache = RaggedCacheView(q_pos.to(DEV), f(N, D), f(N, D), g_pos.to(DEV), offsets.to(DEV), f(B, KV, T, D),
                            f(B, KV, T, D), t_pos.to(DEV))
    return q, cache


DECODE_CASES = [
    # B, H, KV, Q, D, T, max_g, dtype, chunk (keys per work item)
    (2, 8, 2, 1, 64, 20, 100, torch.float32, 16),
    (3, 6, 2, 3, 128, 37, 70, torch.bfloat16, 32),
    (2, 4, 4, 2, 64, 5, 150, torch.float16, None),
    (2, 32, 8, 1, 128, 24, 40, torch.bfloat16, 48),
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"B{c[0]}H{c[1]}KV{c[2]}Q{c[3]}D{c[4]}{str(c[7])[6:]}")
def test_decode_matches_reference(case):
    B, H, KV, NQ, D, T, max_g, dtype, chunk = case
    gen = torch.Generator().manual_seed(B * 100 + D + NQ)
    q, cache = random_cache(gen, B, H, KV, NQ, D, T, max_g, dtype)
    scaling = D**-0.5
    out, lse = run_decode(q, cache, scaling, chunk=chunk, block_n=16 if not CUDA else 64)
    check_decode(q, cache, scaling, out, lse)
    assert (out[-1, -1] == 0).all()  # the query that sees nothing


def test_decode_many_items_per_head():
    """More work items per head than one merge pass folds (several passes of the merge loop)."""
    gen = torch.Generator().manual_seed(5)
    q, cache = random_cache(gen, 2, 4, 2, 1, 16, 40, 300, torch.float32)
    assert int((cache.g_offsets[1:] - cache.g_offsets[:-1]).max()) > 16 * 16
    out, lse = run_decode(q, cache, 0.3, chunk=16, block_n=16, merge_block=16)
    check_decode(q, cache, 0.3, out, lse)


@pytest.mark.parametrize("items_per_sm", [1, 3])
def test_decode_items_per_sm(items_per_sm):
    """The default chunk at another number of work items per SM (fewer, longer items) agrees, and
    the setting is checked."""
    from tca_attention.engine.triton_decode import _pick_chunk

    gen = torch.Generator().manual_seed(41)
    q, cache = random_cache(gen, 2, 8, 2, 1, 32, 30, 400, torch.float32)
    out, lse = run_decode(q, cache, 0.2, block_n=16, items_per_sm=items_per_sm)
    check_decode(q, cache, 0.2, out, lse)
    cpu = torch.device("cpu")  # 4 "SMs" off CUDA: 1 item per SM makes chunks 3x those of 3 per SM
    assert _pick_chunk(6000, 16, cpu, 1) == 1504 and _pick_chunk(6000, 16, cpu, 3) == 512
    with pytest.raises(ValueError, match="items_per_sm"):
        _pick_chunk(6000, 16, cpu, 0)


def test_decode_merge_split_equals_the_reference():
    """The merge cut over head-dim slices (more, smaller merge programs) gives the same output and
    lse; a split that does not cut D into power-of-two slices of >= 16 is an error."""
    gen = torch.Generator().manual_seed(53)
    q, cache = random_cache(gen, 2, 8, 2, 1, 32, 30, 300, torch.float32)
    out, lse = run_decode(q, cache, 0.2, block_n=16, chunk=32, merge_block=16, merge_split=2)
    check_decode(q, cache, 0.2, out, lse)
    for bad in (3, 4, 0, 1.5):
        with pytest.raises(ValueError, match="merge_split"):
            run_decode(q, cache, 0.2, block_n=16, merge_split=bad)


def test_decode_pdl_equals_the_reference_on_hopper_and_is_refused_elsewhere():
    """pdl=1 (both decode kernels as programmatic dependent launches): on an sm_90+ GPU the output
    equals the reference, also replayed in a CUDA graph after other kernels wrote q and the cache;
    elsewhere it is an error, not a silent ordinary launch (its sm_90 lowering is checked by
    test_kernels_lower_for_hopper on any machine)."""
    from tca_attention.engine import triton_decode

    gen = torch.Generator().manual_seed(54)
    q, cache = random_cache(gen, 2, 8, 2, 1, 32, 20, 300, torch.float32)
    hopper = DEV.type == "cuda" and torch.cuda.get_device_capability(DEV)[0] >= 9 and triton_decode.HAS_GDC
    if not hopper:
        with pytest.raises(ValueError, match="pdl"):
            run_decode(q, cache, 0.2, block_n=16, pdl=True)
        out, lse = run_decode(q, cache, 0.2, block_n=16, pdl=False)
        check_decode(q, cache, 0.2, out, lse)
        return
    out, lse = run_decode(q, cache, 0.2, block_n=16, chunk=32, pdl=True)
    check_decode(q, cache, 0.2, out, lse)
    # in a graph: a kernel writes q just before the split grid, which must wait for it
    q_src = q.clone()
    q_buf = torch.zeros_like(q)
    out2 = torch.empty_like(out)
    lse2 = torch.empty_like(lse)
    fn = lambda: triton_decode.ragged_decode_triton(  # noqa: E731
        q_buf.copy_(q_src * 1.0), cache, 0.2, block_n=16, chunk=32, out=out2, lse=lse2, pdl=True)
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for scale in (2.0, -1.0):
        q_src.copy_(q * scale)
        out2.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check_decode(q * scale, cache, 0.2, out2, lse2)


def test_decode_config_env_reaches_the_engine(monkeypatch):
    """TCA_DECODE_CONFIG sets the launch settings of the engine's decode calls (a sweep's winner in
    a whole model); the result still equals the reference; malformed settings are errors."""
    from tca_attention.engine import dispatch, triton_decode

    assert triton_decode.parse_config("items_per_sm=2, block_n=64,num_stages=3") == {
        "items_per_sm": 2, "block_n": 64, "num_stages": 3}
    assert triton_decode.parse_config("merge_split=4") == {"merge_split": 4}
    assert triton_decode.parse_config("pdl=1,merge_split=2") == {"pdl": 1, "merge_split": 2}
    for bad in ("block_n=48", "items_per_sm=0", "chunk=64", "block_n", "num_warps=x", "merge_split=3", "pdl=2"):
        with pytest.raises(ValueError, match="TCA_DECODE_CONFIG"):
            triton_decode.parse_config(bad)
    monkeypatch.delenv(triton_decode.CONFIG_ENV, raising=False)
    assert triton_decode.env_config() == {}
    monkeypatch.setenv(triton_decode.CONFIG_ENV, "items_per_sm=1,block_n=16,merge_block=16")
    seen = {}
    real = triton_decode.ragged_decode_triton

    def spy(*a, **k):
        seen.update(k)
        return real(*a, **k)

    monkeypatch.setattr(triton_decode, "ragged_decode_triton", spy)
    gen = torch.Generator().manual_seed(43)
    q, cache = random_cache(gen, 2, 8, 2, 1, 32, 30, 200, torch.float32)
    out, lse = dispatch.ragged_decode(q, cache, 0.2, backend="triton")
    assert seen["items_per_sm"] == 1 and seen["block_n"] == 16 and seen["merge_block"] == 16
    check_decode(q, cache, 0.2, out, lse)


@pytest.mark.parametrize("use_tma", [False, True])
def test_decode_tma_variant(use_tma):
    """The TMA-descriptor load path (unmasked tiles, neighbours hidden by vis) agrees too."""
    gen = torch.Generator().manual_seed(77)
    q, cache = random_cache(gen, 2, 8, 2, 2, 32, 30, 90, torch.float16)
    out, lse = run_decode(q, cache, 0.2, chunk=32, block_n=16, use_tma=use_tma)
    check_decode(q, cache, 0.2, out, lse)


# ---------------------------------------------------------------------------------------------
# token-plan prefill fuzz: random awkward shapes against the reference
# CUDA: compile-time values (group size, head dim, dtype) come from a few configurations, so 200
# shapes compile a handful of kernel variants
TOKEN_GPU_CONFIGS = ((1, 64, torch.bfloat16), (4, 128, torch.bfloat16), (8, 128, torch.float16),
                     (2, 256, torch.bfloat16), (4, 64, torch.float16))


def random_token_shape(rng: random.Random, gpu: bool) -> dict:
    if gpu:
        g, D, dtype = rng.choice(TOKEN_GPU_CONFIGS)
        L, KV = rng.randint(2, 2048), rng.choice([1, 2, 4])
        window, block = rng.choice([16, 64, 200, 512]), rng.choice([16, 64, 128])
    else:
        g, D = rng.choice([1, 2, 4, 8]), rng.choice([16, 32])
        dtype = rng.choice([torch.bfloat16, torch.float16, torch.float32])
        L, KV = rng.choice([2, 40, 97, 150, 201]), rng.choice([1, 2])
        window, block = rng.choice([8, 24, 40]), rng.choice([8, 16, 32])
    B = rng.randint(1, 3)
    return dict(B=B, H=g * KV, KV=KV, L=L, D=D, dtype=dtype, window=window, block=block,
                ks=[0] + [rng.randrange(L) for _ in range(B - 1)], per_row=rng.random() < 0.5,
                frac=rng.choice([0.05, 0.2, 0.4, 0.7, 1.0]))


def token_fuzz(n: int, seed: int, gpu: bool, shard: tuple[int, int] = (0, 1)) -> None:
    """n random token plans (ragged per-head budgets, padding, per-row geometry or not, prompts
    that stay dense); every failing case is reported."""
    rng = random.Random(seed)
    failed = []
    for it in range(n):
        s = random_token_shape(rng, gpu)
        if it % shard[1] != shard[0]:  # another shard's shape
            continue
        gen = torch.Generator().manual_seed(seed * 1000 + it)
        q, k, v = make_qkv(gen, s["B"], s["H"], s["KV"], s["L"], s["D"], s["dtype"])
        plan = random_plan(gen, s["B"], s["KV"], s["L"], s["window"], s["block"], s["frac"], s["ks"],
                           pad_with_local_start=(it % 2 == 0), per_row=s["per_row"])
        scaling = s["D"] ** -0.5
        try:
            out = run_prefill(q, k, v, plan, scaling, None if gpu else SMALL)
            ref = R.sparse_prefill_ref(q.float(), k.float(), v.float(), plan, scaling)
            lowp = None if s["dtype"] == torch.float32 else masked_attention_lowp(q, k, v, plan_mask(plan, s["L"]), scaling)
            check_close(out, ref, lowp, ulps=1)
        except AssertionError as e:
            failed.append(f"case {it}: {s}: {e}")
    assert not failed, f"{len(failed)}/{n} failed:\n" + "\n".join(failed)


def test_token_plan_fuzz_interpreter_sizes():
    token_fuzz(12, seed=5, gpu=False)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("shard", range(GPU_FUZZ_SHARDS))
def test_gpu_token_plan_fuzz(shard):
    token_fuzz(200, seed=13, gpu=True, shard=(shard, GPU_FUZZ_SHARDS))


# ---------------------------------------------------------------------------------------------
# GPU: realistic sizes, the default tiles
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("D,dtype,g", [(128, torch.bfloat16, 4), (64, torch.float16, 3), (256, torch.bfloat16, 2)])
@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("per_row", [False, True])
def test_gpu_prefill_realistic(D, dtype, g, tma, per_row):
    gen = torch.Generator().manual_seed(D)
    B, KV, L, w, bs = 3, 2, 2048 + 333, 512, 128
    q, k, v = make_qkv(gen, B, g * KV, KV, L, D, dtype)
    plan = random_plan(gen, B, KV, L, w, bs, 0.39, [0, 100, 1800], per_row=per_row)  # row 2 dense per row
    cfg = default_config(D)
    out = run_prefill(q, k, v, plan, D**-0.5, dataclasses.replace(cfg, use_tma=tma))
    ref = R.sparse_prefill_ref(q.float(), k.float(), v.float(), plan, D**-0.5)
    check_close(out, ref, masked_attention_lowp(q, k, v, plan_mask(plan, L), D**-0.5))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_prefill_full_budget_dense_long():
    gen = torch.Generator().manual_seed(1)
    B, H, KV, L, D, w, bs = 1, 8, 2, 4096 + 77, 128, 1024, 128
    q, k, v = make_qkv(gen, B, H, KV, L, D, torch.bfloat16)
    ls = (L - w) // bs * bs
    idx = torch.arange(ls, device=DEV).expand(B, KV, ls).contiguous()
    plan = TokenPlan(idx, torch.full((B, KV), ls, dtype=torch.int32, device=DEV), ls, w, bs,
                     torch.zeros(B, dtype=torch.long, device=DEV), torch.ones(KV, dtype=torch.long, device=DEV))
    out = run_prefill(q, k, v, plan, D**-0.5)
    dense32 = R.dense_causal_ref(q.float(), k.float(), v.float(), D**-0.5)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=D**-0.5, enable_gqa=True)
    check_close(out, dense32, sdpa.transpose(1, 2))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("NQ", [1, 4])
@pytest.mark.parametrize("use_tma", [False, True])
def test_gpu_decode_realistic(NQ, use_tma):
    gen = torch.Generator().manual_seed(NQ)
    q, cache = random_cache(gen, 2, 32, 8, NQ, 128, 600, 3000, torch.bfloat16)
    out, lse = run_decode(q, cache, 128**-0.5, use_tma=use_tma)
    check_decode(q, cache, 128**-0.5, out, lse)


def test_prefill_config_env_override(monkeypatch) -> None:
    from tca_attention.engine.triton_prefill import CONFIG_ENV, config_text, parse_config

    cfg = PrefillConfig(256, 64, 8, 2, use_tma=True)
    assert parse_config(config_text(cfg)) == cfg and parse_config("128, 64, 4, 3") == PrefillConfig(128, 64, 4, 3)
    monkeypatch.setenv(CONFIG_ENV, "256,64,8,2,tma")
    assert default_config(128) == cfg and default_config(64) == cfg
    for bad in ("128,64,8", "128,64,8,3,tmx", "96,64,8,3", "128,64,8,0", "a,b,c,d"):
        with pytest.raises(ValueError, match=CONFIG_ENV):
            parse_config(bad)
    monkeypatch.delenv(CONFIG_ENV)
    assert default_config(128) == PrefillConfig(128, 64, 8, 3)


@pytest.mark.parametrize("B,KV,T,D,t_pos0,start,steps", [
    (3, 2, 7, 48, 35, 40, 9),  # the ring wraps twice; D not a power of two
    (1, 1, 1, 16, 0, 0, 3),  # one slot
    (2, 3, 5, 128, 10, 8, 4),  # counter below t_pos0: the floor modulo (torch.remainder)
])
@pytest.mark.parametrize("tail", [True, False], ids=["ragged-tail", "window"])
def test_ring_append_equals_the_reference(B, KV, T, D, t_pos0, start, steps, tail):
    """The one-launch ring append (static caches' decode steps) writes what the PyTorch reference
    writes, step after step: k/v rows (from a transposed, non-contiguous projection), every row's
    tail position, the query position and the counter; the window form (0-dim counter, no
    positions) too; bad shapes are refused by both backends."""
    from tca_attention.engine import dispatch

    gen = torch.Generator().manual_seed(B * 100 + T)
    ring = [torch.randn(B, KV, T, D, generator=gen).to(DEV, torch.bfloat16) for _ in range(2)]
    t_pos = torch.randint(-1, 50, (B, T), generator=gen).to(DEV) if tail else None
    counter = torch.tensor([start] if tail else start, device=DEV)
    q_pos = torch.tensor([-7], device=DEV) if tail else None
    state = {name: [x.clone() if x is not None else None for x in (*ring, t_pos, counter, q_pos)]
             for name in ("triton", "reference")}
    for _ in range(steps):
        k, v = (torch.randn(B, 1, KV, D, generator=gen).to(DEV, torch.bfloat16).transpose(1, 2) for _ in range(2))
        for backend, (tk, tv, tp, c, qp) in state.items():
            dispatch.ring_append(tk, tv, k, v, c, t_pos0 if tail else 0, tp, qp, backend=backend)
        for a, b in zip(state["triton"], state["reference"]):
            assert (a is None and b is None) or torch.equal(a, b)
    tk, tv, tp, c, qp = state["triton"]
    assert int(c) == start + steps and (not tail or int(qp) == start + steps - 1)
    slot = (start + steps - 1 - (t_pos0 if tail else 0)) % T
    assert torch.equal(tk[:, :, slot], k[:, :, 0]) and (not tail or bool((tp[:, slot] == start + steps - 1).all()))
    for backend in ("triton", "reference"):
        with pytest.raises(ValueError, match="ring_append"):
            dispatch.ring_append(tk, tv, k[:, :1] if KV > 1 else k[:1, :, :, :8], v, c, 0, tp, qp, backend=backend)
        with pytest.raises(ValueError, match="counter"):
            dispatch.ring_append(tk, tv, k, v, c.float(), 0, tp, qp, backend=backend)


@pytest.mark.parametrize("kernel, bias", [("prefill", 0), ("prefill", 1), ("block", 0), ("block", 1),
                                          ("decode", 0), ("decode", 1), ("decode_pdl", 0), ("compaction", 0),
                                          ("select", 0), ("ring_append", 0)])
def test_kernels_lower_for_hopper(kernel, bias):
    """The prefill, block and decode kernels (all three run triton_common's online-softmax step)
    and the prefill's compaction and the selection's ranking kernels compile for sm_90 with the installed triton (no GPU needed) and fit the H100's shared memory;
    the prefill and block kernels' tiles use wgmma (decode's 16-row tiles are too small for it);
    without a key bias the prefill's logit scale rides in the exponent's FMA (one FMA per
    exponential at least; before: a separate multiply pass)."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "sm90_compile.py")
    run = subprocess.run([sys.executable, script, kernel, str(bias)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    info = json.loads(run.stdout.strip().splitlines()[-1])
    if kernel == "ring_append":  # the static caches' one-token append: copies, no shared memory, no spill
        assert info["shared"] == 0 and info["wgmma"] == 0 and info["stack"] <= 0, info
        return
    if kernel in ("compaction", "select"):  # prepare_prefill's copy/search kernels, the selection's ranking: no dot
        assert info["shared"] <= 232448 and info["wgmma"] == 0
        if kernel == "select":  # the ranking at g = 4 does not spill (it did: 4x slower on an H100)
            assert info["reg"] > 0 and 0 <= info["stack"] <= 64, info  # (reg -1: triton ships no cuobjdump)
        return
    if kernel == "decode_pdl":  # programmatic dependent launch: the split kernel waits before any load and
        # releases the merge (the script checks the merge's wait and that pdl=0 carries neither)
        assert info["gdc_wait"] == 1 and info["gdc_launch"] == 1, info
    else:
        assert info["gdc_wait"] == 0 and info["gdc_launch"] == 0, info
    assert 0 < info["shared"] <= 232448  # the H100's opt-in shared memory per block
    assert info["ex2"] > 0 and (info["wgmma"] > 0 or kernel.startswith("decode"))
    if kernel == "prefill" and not bias:
        assert info["fma"] >= info["ex2"] > 0
