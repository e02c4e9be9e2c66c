"""Decode-time page selection (DecodeSelection) in the ragged decode executors, and Quest's page
scoring (engine/page_bounds.py).

The Triton kernel (under the interpreter without CUDA) against ragged_decode_ref with random
selections on awkward shapes and a fixed-seed fuzz loop; all pages == no selection; a hand-built
case with a known answer; bound properties, incremental updates and the page choice.
Tolerances: kernel_helpers (those of tests/test_triton_kernels.py).
"""
from __future__ import annotations

import random

import pytest
import torch
from kernel_helpers import CUDA, DEV, GPU_FUZZ_SHARDS, check_decode, fp32, run_decode  # before the kernels: the interpreter

from tca_attention.engine import dispatch
from tca_attention.engine import reference as R
from tca_attention.engine.page_bounds import page_bounds, page_upper_bound, top_pages, update_page_bounds
from tca_attention.engine.plan import DecodeSelection, RaggedCacheView

BLOCK_N = 16 if not CUDA else 32  # tiles both smaller and larger than the pages


def make_cache(
    gen: torch.Generator, B: int, H: int, KV: int, NQ: int, D: int, T: int, fill: int, max_g: int,
    pads: list[int], dtype: torch.dtype,
) -> tuple[torch.Tensor, RaggedCacheView]:
    """A decode step: per (row, KV head) global segments of random lengths in [0, max_g) (the first
    empty), a tail of T slots filled up to `fill` (later slots: pos -1), row b left-padded over its
    first pads[b] tail slots (pos -1), and NQ queries at the last NQ filled positions (earlier
    queries do not see the later slots)."""
    lens = torch.randint(0, max_g, (B * KV,), generator=gen)
    lens[0] = 0
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    N = int(offsets[-1])
    start = 2 * max_g  # global positions lie below the tail's
    g_pos = torch.cat([torch.sort(torch.randperm(start, generator=gen)[: int(n)]).values for n in lens])
    slot = torch.arange(T)
    t_pos = torch.where((slot[None] < fill) & (slot[None] >= torch.tensor(pads)[:, None]), start + slot, -1)  # (B, T)
    q_pos = (start + fill - NQ + torch.arange(NQ)).repeat(B, 1)
    f = lambda *s: torch.randn(*s, generator=gen).to(DEV, dtype)  # noqa: E731
    cache = RaggedCacheView(q_pos.to(DEV), f(N, D), f(N, D), g_pos.to(DEV), offsets.to(DEV), f(B, KV, T, D),
                            f(B, KV, T, D), t_pos.to(DEV))
    return f(B, H, NQ, D), cache


def random_selection(gen: torch.Generator, B: int, KV: int, T: int, page_size: int) -> DecodeSelection:
    """Up to P random pages per (row, KV head) (P random), about 30% of the entries unused (-1);
    head (0, 0) lists no page at all."""
    n = -(-T // page_size)
    P = int(torch.randint(1, n + 1, (1,), generator=gen))
    idx = torch.rand(B, KV, n, generator=gen).argsort(-1)[..., :P]
    drop = torch.rand(B, KV, P, generator=gen) < 0.3
    drop[0, 0] = True
    idx = torch.where(drop, n, idx).sort(-1).values  # unused entries last
    return DecodeSelection(page_size, torch.where(idx == n, -1, idx).to(DEV, torch.int32))


def check_selected(q, cache, sel, scaling, factor: float = 2.0, **kw) -> None:
    sel.validate(cache)
    out, lse = run_decode(q, cache, scaling, selection=sel, block_n=BLOCK_N, **kw)
    check_decode(q, cache, scaling, out, lse, sel, factor)


CASES = [
    # B, H, KV, Q, D, T, fill, max_g, pads, page_size, dtype, chunk
    (2, 8, 8, 1, 32, 45, 45, 40, [0, 7], 1, torch.float32, 16),  # token-level, g = 1
    (3, 8, 2, 2, 64, 50, 43, 60, [0, 5, 20], 4, torch.bfloat16, 32),
    (2, 16, 2, 1, 16, 100, 77, 30, [3, 0], 16, torch.float16, None),  # g = 8
    (1, 6, 2, 3, 32, 130, 130, 50, [0], 64, torch.bfloat16, 32),  # pages > tile, a 2-slot last page
    (2, 4, 1, 1, 64, 33, 30, 1, [0, 31], 16, torch.float32, 16),  # no global keys; row 1 sees nothing
    (2, 8, 4, 2, 16, 70, 64, 80, [0, 10], 64, torch.float16, 48),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}H{c[1]}KV{c[2]}Q{c[3]}D{c[4]}T{c[5]}ps{c[9]}{str(c[10])[6:]}")
def test_selected_decode_matches_reference(case):
    B, H, KV, NQ, D, T, fill, max_g, pads, ps, dtype, chunk = case
    gen = torch.Generator().manual_seed(T * 7 + ps)
    q, cache = make_cache(gen, B, H, KV, NQ, D, T, fill, max_g, pads, dtype)
    check_selected(q, cache, random_selection(gen, B, KV, T, ps), D**-0.5, chunk=chunk)


GPU_CONFIGS = ((1, 64, torch.float16, 16, None), (4, 128, torch.bfloat16, 64, 2 * BLOCK_N),
               (8, 128, torch.bfloat16, 1, None), (8, 256, torch.bfloat16, 16, 5 * BLOCK_N))


def fuzz_case(rng: random.Random, realistic: bool) -> tuple:
    """A random shape. Realistic (CUDA): the kernel's compile-time values come from GPU_CONFIGS, so
    200 shapes compile about ten kernel variants, not hundreds (each takes seconds)."""
    if realistic:  # (group, head dim, dtype, page size, split-K chunk): a few compiled variants
        g, D, dtype, ps, chunk = rng.choice(GPU_CONFIGS)
    else:
        g, D, dtype = rng.choice([1, 2, 3, 4, 8]), rng.choice([16, 32, 64]), rng.choice([torch.float32, torch.bfloat16, torch.float16])
        ps, chunk = rng.choice([1, 4, 16, 64]), rng.choice([None, 2 * BLOCK_N, 5 * BLOCK_N])
    KV = rng.choice([1, 2, 8] if realistic else [1, 2, 4])
    T = rng.randint(1, 3000 if realistic else 200)
    B = rng.randint(1, 4 if realistic else 3)
    fill = rng.randint(1, T)
    pads = [0] + [rng.choice([0, rng.randint(0, fill)]) for _ in range(B - 1)]
    return (B, g * KV, KV, rng.randint(1, 3), D, T, fill, rng.randint(1, 4000 if realistic else 100), pads,
            ps, dtype, chunk)


def run_fuzz(n: int, realistic: bool, shard: tuple[int, int] = (0, 1)) -> None:
    """Every shape twice: its inputs upcast to fp32 (max error 1e-4: the indirection is exact) and
    in its dtype, within 4x (not 2x) torch's low-precision max error. The 2x rule is a statistic of
    large outputs: on 60 small bf16/fp16 shapes of this loop the unchanged no-selection kernel broke
    it on 4 (worst 2.9x), the selected one on 1 (3.1x), while fp32 inputs stayed within 1e-4."""
    rng = random.Random(1234)
    gen = torch.Generator().manual_seed(1234)
    for i in range(n):
        B, H, KV, NQ, D, T, fill, max_g, pads, ps, dtype, chunk = case = fuzz_case(rng, realistic)
        q, cache = make_cache(gen, B, H, KV, NQ, D, T, fill, max_g, pads, dtype)
        sel = random_selection(gen, B, KV, T, ps)
        if i % shard[1] != shard[0]:  # another shard's shape (its inputs drawn all the same: one stream)
            continue
        try:
            check_selected(*fp32(q, cache), sel, D**-0.5, chunk=chunk)
            if dtype != torch.float32:
                check_selected(q, cache, sel, D**-0.5, factor=4.0, chunk=chunk)
        except Exception as e:  # a mismatch, or a kernel fault (run with CUDA_LAUNCH_BLOCKING=1 to name it)
            raise AssertionError(f"fuzz shape {i}: {case}: {type(e).__name__}: {e}") from e


def test_fuzz_selected_decode():
    run_fuzz(20, realistic=False)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("shard", range(GPU_FUZZ_SHARDS))
def test_gpu_fuzz_selected_decode(shard):
    run_fuzz(200, realistic=True, shard=(shard, GPU_FUZZ_SHARDS))


@pytest.mark.parametrize("ps", [1, 16, 64])
def test_all_pages_equals_no_selection(ps):
    gen = torch.Generator().manual_seed(ps)
    q, cache = make_cache(gen, 2, 8, 2, 2, 32, 37, 33, 50, [0, 6], torch.float32)
    sel = DecodeSelection.all_pages(cache, ps)
    sel.validate(cache)
    ref, ref_lse = R.ragged_decode_ref(q, cache, 0.2)
    ref_s, ref_s_lse = R.ragged_decode_ref(q, cache, 0.2, sel)
    assert torch.equal(ref, ref_s) and torch.equal(ref_lse, ref_s_lse)
    out, lse = run_decode(q, cache, 0.2, block_n=BLOCK_N)
    out_s, lse_s = run_decode(q, cache, 0.2, block_n=BLOCK_N, selection=sel)
    torch.testing.assert_close(out_s, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_s, lse, atol=1e-5, rtol=1e-5)
    check_decode(q, cache, 0.2, out_s, lse_s)


def test_one_page_known_answer():
    """Each head lists one page (head (0, 0) none): its answer is attention over its global keys
    and that page's keys, written out with torch."""
    gen = torch.Generator().manual_seed(3)
    B, H, KV, D, T, ps, scaling = 2, 4, 2, 16, 40, 4, 0.25
    q, cache = make_cache(gen, B, H, KV, 1, D, T, T, 30, [0, 0], torch.float32)
    pages = torch.tensor([[[-1], [9]], [[3], [0]]], dtype=torch.int32, device=DEV)
    sel = DecodeSelection(ps, pages)
    out, lse = run_decode(q, cache, scaling, block_n=BLOCK_N, selection=sel)
    g = H // KV
    for b in range(B):
        for h in range(KV):
            s, e = int(cache.g_offsets[b * KV + h]), int(cache.g_offsets[b * KV + h + 1])
            p = int(pages[b, h, 0])
            tail = slice(p * ps, (p + 1) * ps) if p >= 0 else slice(0, 0)
            keys = torch.cat([cache.g_keys[s:e], cache.t_keys[b, h, tail]])
            vals = torch.cat([cache.g_values[s:e], cache.t_values[b, h, tail]])
            qh = q[b, h * g : (h + 1) * g, 0]  # (g, D)
            want = torch.softmax(qh @ keys.T * scaling, -1) @ vals
            torch.testing.assert_close(out[b, 0, h * g : (h + 1) * g], want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(lse[b, h * g : (h + 1) * g, 0], torch.logsumexp(qh @ keys.T * scaling, -1))
    check_decode(q, cache, scaling, out, lse, sel)


def test_dispatch_passes_the_selection():
    gen = torch.Generator().manual_seed(4)
    q, cache = make_cache(gen, 2, 4, 2, 1, 16, 20, 20, 10, [0, 2], torch.float32)
    sel = random_selection(gen, 2, 2, 20, 4)
    ref = R.ragged_decode_ref(q, cache, 0.3, sel)
    for backend in ("reference", "triton"):
        out, lse = dispatch.ragged_decode(q, cache, 0.3, backend, selection=sel)
        torch.testing.assert_close(out, ref[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, ref[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(dispatch.ragged_decode(q, cache, 0.3, "reference")[0], ref[0])  # it selects


def test_validate_rejects_bad_selections():
    gen = torch.Generator().manual_seed(5)
    _, cache = make_cache(gen, 2, 4, 2, 1, 16, 20, 20, 10, [0, 0], torch.float32)  # 5 pages of 4
    ok = torch.tensor([0, 2, 4, -1], dtype=torch.int32, device=DEV).expand(2, 2, 4)
    DecodeSelection(4, ok).validate(cache)
    bad = {
        "power of two": DecodeSelection(3, ok),
        "(B, KV, P)": DecodeSelection(4, ok[:1]),
        "int32": DecodeSelection(4, ok.long()),
        r"\[0, 5\)": DecodeSelection(4, ok + 1),
        "come after": DecodeSelection(4, ok.flip(-1)),
        "ascending": DecodeSelection(4, torch.tensor([2, 2, -1], dtype=torch.int32, device=DEV).expand(2, 2, 3)),
    }
    for msg, sel in bad.items():
        with pytest.raises(ValueError, match=msg):
            sel.validate(cache)


# ---------------------------------------------------------------------------------------------
# Quest's page scoring
def true_page_max(q: torch.Tensor, t_keys: torch.Tensor, fill: int, ps: int) -> torch.Tensor:
    """max over a group's rows and a page's filled slots of q.k, per filled page -> (B, KV, n)."""
    B, H, NQ, D = q.shape
    KV = t_keys.shape[1]
    n = -(-fill // ps)
    qk = q.reshape(B, KV, -1, D).double() @ t_keys[:, :, :fill].double().transpose(-1, -2)  # (B, KV, g*Q, fill)
    qk = torch.nn.functional.pad(qk, (0, n * ps - fill), value=float("-inf"))
    return qk.view(B, KV, -1, n, ps).amax(-1).amax(2)


@pytest.mark.parametrize("ps", [1, 4, 16])
def test_page_bound_is_an_upper_bound(ps):
    gen = torch.Generator().manual_seed(ps)
    B, KV, g, NQ, T, D, fill = 2, 2, 4, 2, 50, 16, 45
    t_keys = torch.randn(B, KV, T, D, generator=gen).to(DEV)
    t_keys[:, :, fill:] = 1e4  # unfilled slots must not count
    q = torch.randn(B, KV * g, NQ, D, generator=gen).to(DEV)
    bound = page_upper_bound(q, *page_bounds(t_keys, fill, ps))
    assert bound.shape == (B, KV, -(-T // ps)) and bound.dtype == torch.float32
    true = true_page_max(q, t_keys, fill, ps)
    n = true.shape[-1]
    assert (bound[..., :n].double() >= true - 1e-5 * (1 + true.abs())).all()
    if ps == 1:  # one key per page: the bound is the exact max
        torch.testing.assert_close(bound[..., :n].double(), true, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("ps", [1, 4, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_incremental_update_equals_recomputation(ps, dtype):
    gen = torch.Generator().manual_seed(ps)
    t_keys = torch.randn(2, 3, 60, 16, generator=gen).to(DEV, dtype)
    kmin, kmax = page_bounds(t_keys, 13, ps)
    for s in range(13, 30):  # decode: one slot per step
        update_page_bounds(kmin, kmax, t_keys, s, 1, ps)
    update_page_bounds(kmin, kmax, t_keys, 30, 7, ps)  # several at once
    want_min, want_max = page_bounds(t_keys, 37, ps)
    assert kmin.dtype == dtype and torch.equal(kmin, want_min) and torch.equal(kmax, want_max)
    with pytest.raises(ValueError, match="outside"):
        update_page_bounds(kmin, kmax, t_keys, 59, 2, ps)


@pytest.mark.parametrize("fill,k", [(45, 5), (45, 2), (7, 6), (1, 3)])
def test_top_pages(fill, k):
    gen = torch.Generator().manual_seed(fill + k)
    B, KV, T, ps = 2, 3, 50, 4
    bound = torch.randn(B, KV, -(-T // ps), generator=gen).to(DEV)
    n = -(-fill // ps)
    always = (1, 1)
    pages = top_pages(bound, k, fill, ps, always)
    assert pages.shape == (B, KV, k) and pages.dtype == torch.int32
    _, cache = make_cache(gen, B, 2 * KV, KV, 1, 16, T, fill, 5, [0] * B, torch.float32)
    DecodeSelection(ps, pages).validate(cache)  # sorted, unique, -1 last, in range
    m = min(k, n)
    assert (pages[..., m:] == -1).all() and (pages[..., :m] >= 0).all() and (pages[..., :m] < n).all()
    for b in range(B):
        for h in range(KV):
            chosen = set(pages[b, h, :m].tolist())
            forced = set(range(always[0])) | set(range(n - always[1], n))
            assert forced <= chosen  # the last (current) page and the sink pages
            rest = [p for p in range(n) if p not in forced]
            best = sorted(rest, key=lambda p: -float(bound[b, h, p]))[: m - len(forced)]
            assert chosen - forced == set(best)  # then the largest bounds
    with pytest.raises(ValueError, match="always"):
        top_pages(bound, 2, fill, ps, (2, 1))
    with pytest.raises(ValueError, match="always"):
        top_pages(bound, 2, fill, ps, (1, 0))


def test_quest_selection_end_to_end():
    """Bounds of the tail, scored by the step's queries, choose pages that both executors agree on."""
    gen = torch.Generator().manual_seed(8)
    B, H, KV, NQ, D, T, fill, ps = 2, 8, 2, 1, 32, 70, 61, 8
    q, cache = make_cache(gen, B, H, KV, NQ, D, T, fill, 40, [0, 9], torch.bfloat16)
    bound = page_upper_bound(q, *page_bounds(cache.t_keys, fill, ps))
    sel = DecodeSelection(ps, top_pages(bound, 3, fill, ps, (1, 1)))
    check_selected(q, cache, sel, D**-0.5)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_selection_step_never_syncs():
    """A decode step's update, scoring, choice and selected attention make no host sync."""
    gen = torch.Generator().manual_seed(9)
    B, H, KV, D, T, fill, ps = 2, 32, 8, 128, 4096, 3000, 16
    q, cache = make_cache(gen, B, H, KV, 1, D, T, fill, 2000, [0, 100], torch.bfloat16)
    kmin, kmax = page_bounds(cache.t_keys, fill - 1, ps)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        update_page_bounds(kmin, kmax, cache.t_keys, fill - 1, 1, ps)
        sel = DecodeSelection(ps, top_pages(page_upper_bound(q, kmin, kmax), 32, fill, ps, (1, 1)))
        out, lse = dispatch.ragged_decode(q, cache, D**-0.5, selection=sel)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    check_decode(q, cache, D**-0.5, out, lse, sel)
