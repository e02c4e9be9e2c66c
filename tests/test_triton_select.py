"""The fused Triton TCA selection against its PyTorch reference (and TCA.plan / the cache on top).

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1). Inputs of every
dtype are upcast exactly to fp32 by both paths, so s may differ only by fp32 summation order; the
selection itself is compared exactly (a) when the reference is fed the kernel's own s, so float
rounding cannot flip near-ties, and (b) end to end on inputs built without near-ties in s.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import subprocess
import sys

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
    if "tca_attention.methods.tca.triton_select" in sys.modules:  # imported earlier without the interpreter
        importlib.reload(sys.modules["tca_attention.methods.tca.triton_select"])

import pytest  # noqa: E402

from tca_attention.methods.tca import selection as sel  # noqa: E402
from tca_attention.methods.tca.budgets import Budgets, HeadBudget
from tca_attention.methods.state import ModelIdentity  # noqa: E402
from tca_attention.ragged_cache import RaggedLayer  # noqa: E402
from tca_attention.methods.tca.candidates import candidate_ladder  # noqa: E402
from tca_attention.methods.tca.config import TCAConfig  # noqa: E402
from tca_attention.engine import dispatch  # noqa: E402
from tca_attention.engine import reference as R  # noqa: E402
from tca_attention.methods.tca import select as TS  # noqa: E402
from tca_attention.methods.tca.select import SelectionSpec  # noqa: E402
from tca_attention.methods.tca.triton_select import select_and_pack_triton  # noqa: E402
from tca_attention.methods.base import row_geometry  # noqa: E402
from tca_attention.methods.tca.method import TCA  # noqa: E402
from kernel_helpers import GPU_FUZZ_SHARDS  # noqa: E402

DEV = torch.device("cuda" if CUDA else "cpu")


def ladder_p(KV: int, b: int, gen: torch.Generator) -> torch.Tensor:
    """(KV, |K|) keep distributions: random candidate-ladder rows, one head dense where KV > 2."""
    lad = candidate_ladder(b)
    rows = lad[torch.randint(0, lad.shape[0], (KV,), generator=gen)]
    if KV > 2:
        rows[0] = 0.0
        rows[0, 0] = 1.0  # dense head: every block keeps b
    return rows


def separated_inputs(B, H, KV, L, D, dtype, gen, scaling=None):
    """q/k (exact in every dtype) whose last-query logits are c_h * delta * perm[t]: each key its own
    rank, neighbours ~8/L apart in logit, so s has no near-ties (checked by the tests).

    perm[t] = 32 * k[t, 0] + k[t, 1] with small integers; q has weight on those two features only.
    """
    scaling = D**-0.5 if scaling is None else scaling
    delta = 2.0 ** round(torch.log2(torch.tensor(8.0 / (L * scaling))).item())
    c = torch.tensor([1.0, 1.25, 1.5, 1.75])[torch.randint(0, 4, (B, H), generator=gen)]
    q = torch.zeros(B, H, D)
    q[..., 0], q[..., 1] = 32 * delta * c, delta * c
    perm = torch.argsort(torch.rand(B, KV, L, generator=gen), dim=-1)
    k = torch.randn(B, KV, L, D, generator=gen)  # features >= 2 are ignored by q
    k[..., 0], k[..., 1] = (perm // 32).float(), (perm % 32).float()
    return q.to(dtype), k.to(dtype)


def run_both(q_last, k, key_start, keep_rank, n, b, alpha, norm, scaling):
    """Triton and reference selection; n: int (every row) or (B,) per-row block counts."""
    M = int(keep_rank.sum(-1).max())
    n_dev = n if isinstance(n, int) else n.to(DEV)
    spec = SelectionSpec(key_start.to(DEV), keep_rank.to(DEV), n_dev, b, alpha, norm, M)
    tri = select_and_pack_triton(q_last.to(DEV), k.to(DEV), spec, scaling)
    tri = [t.cpu() for t in tri]
    ref = TS.select_and_pack_ref(q_last, k, SelectionSpec(key_start, keep_rank, n, b, alpha, norm, M), scaling)
    return tri, ref, M


def row_ranks(p: torch.Tensor, L: int, key_start: torch.Tensor, b: int, w: int):
    """Per-row geometry as TCA.plan builds it: (n_rows (B,), keep_rank (B, KV, n_max))."""
    n_rows, _ = row_geometry(L, key_start, b, w)
    return n_rows, sel.keep_per_rank_rows(sel.ladder_cumsum(p), n_rows, (L - w) // b, b)


# (B, H, KV, L, D, b, window, key_start, alpha, mass_norm, dtype)
CASES = [
    (1, 1, 1, 700, 64, 64, 128, [0], 0.0, "sum", torch.float32),  # g = 1, L % b != 0
    (2, 6, 2, 1000, 128, 128, 256, [0, 300], 0.5, "max", torch.bfloat16),  # g = 3, padding > 2 blocks
    (3, 12, 3, 700, 64, 64, 128, [0, 70, 200], 0.5, "sum", torch.float16),  # g = 4, KV = 3
    (2, 4, 1, 1000, 64, 64, 128, [130, 0], 0.0, "max", torch.float32),  # g = 4, KV = 1
    (1, 4, 2, 520, 256, 64, 128, [0], 0.5, "sum", torch.bfloat16),  # head dim 256
    (3, 4, 2, 600, 64, 64, 128, [0, 411, 37], 0.5, "max", torch.float32),  # a row dense alone (189 <= w + b)
]


@pytest.mark.parametrize("B,H,KV,L,D,b,w,ks,alpha,norm,dtype", CASES)
def test_select_matches_reference(B, H, KV, L, D, b, w, ks, alpha, norm, dtype):
    gen = torch.Generator().manual_seed(L + H + D)
    key_start = torch.tensor(ks)
    p = ladder_p(KV, b, gen)
    n, keep_rank = row_ranks(p, L, key_start, b, w)
    if max(ks) == 0:  # no padding: one shared block count and keep-per-rank, as TCA.plan passes them
        n, keep_rank = (L - w) // b, sel.keep_per_rank(p, (L - w) // b, b)
    scaling = D**-0.5
    # random inputs: s close to the reference; selection exact given the kernel's s
    q = (torch.randn(B, H, D, generator=gen) * 2).to(dtype)
    k = torch.randn(B, KV, L, D, generator=gen).to(dtype)
    (idx, ln, ret, s), (_, _, ret_ref, s_ref), M = run_both(q, k, key_start, keep_rank, n, b, alpha, norm, scaling)
    torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=1e-7)  # fp32 math on both sides
    for bi, st in enumerate(ks):
        assert bool((s[bi, :, :st] == 0).all())
    idx_r, ln_r, ret_r = TS.select_from_importance_ref(s, SelectionSpec(key_start, keep_rank, n, b, alpha, norm, M))
    assert idx.shape == (B, KV, M) and ln.dtype == torch.int32
    assert torch.equal(ln, ln_r) and torch.equal(idx, idx_r)
    torch.testing.assert_close(ret, ret_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ret, ret_ref, rtol=1e-4, atol=1e-6)
    # blocks start at each row's first real token: padding never kept, every head keeps exactly
    # its ladder's count for the row's own block count, inside the row's global region
    n_rows = n if isinstance(n, torch.Tensor) else torch.full((B,), n)
    for bi, st in enumerate(ks):
        for h in range(KV):
            kept = idx[bi, h, : ln[bi, h]]
            assert bool((kept >= st).all()) and bool((kept < st + int(n_rows[bi]) * b).all())
            assert bool((kept[1:] > kept[:-1]).all())
            assert bool((idx[bi, h, ln[bi, h]:] == L).all())
            assert int(ln[bi, h]) == int(keep_rank[..., h, :].expand(B, -1)[bi].sum())
    # inputs without near-ties: exact end to end
    q, k = separated_inputs(B, H, KV, L, D, dtype, gen)
    (idx, ln, ret, s), (idx_ref, ln_ref, ret_ref, s_ref), _ = run_both(q, k, key_start, keep_rank, n, b, alpha, norm, scaling)
    srt = s_ref.sort(-1).values
    pos = srt[..., 1:] > 0
    gap = (srt[..., 1:] - srt[..., :-1])[pos] / srt[..., 1:][pos]
    assert float(gap.min()) > 1e-3, "test inputs should have no near-ties"
    assert torch.equal(ln, ln_ref) and torch.equal(idx, idx_ref)
    torch.testing.assert_close(ret, ret_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("alpha,norm", [(0.0, "sum"), (0.5, "max")])
def test_padded_row_selects_what_it_selects_alone(alpha, norm):
    """Batch invariance of the fused selection: each row of a left-padded batch keeps exactly the
    tokens it keeps alone (shifted by its padding), on both backends."""
    B, H, KV, L, D, b, w = 3, 4, 2, 300, 32, 16, 32
    gen = torch.Generator().manual_seed(5)
    key_start = torch.tensor([0, 49, 100])  # real lengths 300 / 251 / 200, different block phases
    p = ladder_p(KV, b, gen)
    n_rows, keep_rank = row_ranks(p, L, key_start, b, w)
    q, k = separated_inputs(B, H, KV, L, D, torch.float32, gen)
    (idx, ln, ret, _), (idx_r, ln_r, _, _), _ = run_both(q, k, key_start, keep_rank, n_rows, b, alpha, norm, 0.125)
    assert torch.equal(idx, idx_r) and torch.equal(ln, ln_r)
    for r, st in enumerate(key_start.tolist()):
        Lr = L - st
        n = (Lr - w) // b
        kr = sel.keep_per_rank(p, n, b)
        alone, _, _ = run_both(q[r : r + 1], k[r : r + 1, :, st:], torch.zeros(1, dtype=torch.long), kr, n, b,
                               alpha, norm, 0.125)
        a_idx, a_len, a_ret, _ = alone
        assert torch.equal(ln[r], a_len[0]), r
        for h in range(KV):
            assert torch.equal(idx[r, h, : ln[r, h]] - st, a_idx[0, h, : a_len[0, h]]), (r, h)
        torch.testing.assert_close(ret[r], a_ret[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alpha,norm", [(0.0, "sum"), (0.5, "max")])
def test_ties_break_like_stable_argsort(alpha, norm):
    B, H, KV, L, D, b, w = 2, 4, 2, 600, 64, 64, 128
    gen = torch.Generator().manual_seed(3)
    key_start = torch.tensor([0, 90])
    n, keep_rank = row_ranks(ladder_p(KV, b, gen), L, key_start, b, w)
    q = torch.randn(B, H, D, generator=gen)
    # constant keys: s flat, every full block has the same h -> all ties, exact on both sides
    k = torch.ones(B, KV, L, D)
    (idx, ln, ret, s), (idx_ref, ln_ref, ret_ref, _), M = run_both(q, k, key_start, keep_rank, n, b, alpha, norm, 0.125)
    assert torch.equal(ln, ln_ref) and torch.equal(idx, idx_ref)
    # flat s: every block (counted from the row's first real token) keeps its first keep[j] tokens
    for bi in range(B):
        st = int(key_start[bi])
        for h in range(KV):
            kept = idx[bi, h, : ln[bi, h]]
            blk = (kept - st) // b
            rank = kept - (st + blk * b)  # position inside the row's block
            start = torch.searchsorted(blk, blk)  # first entry of each block in the kept list
            assert torch.equal(rank, torch.arange(len(kept)) - start), (bi, h)
    # pairwise duplicated keys: ties inside blocks, broken toward the lower index
    k = torch.randn(B, KV, L // 2, D, generator=gen).repeat_interleave(2, dim=2)
    (idx, ln, _, s), _, M = run_both(q, k, key_start, keep_rank, n, b, alpha, norm, 0.125)
    assert torch.equal(s[..., 0::2], s[..., 1::2]), "duplicated keys must give equal s"
    idx_r, ln_r, _ = TS.select_from_importance_ref(s, SelectionSpec(key_start, keep_rank, n, b, alpha, norm, M))
    assert torch.equal(ln, ln_r) and torch.equal(idx, idx_r)
    # of a tied pair the earlier token wins (key_start is even: pairs never straddle a block)
    B_, KV_, _ = idx.shape
    for bi in range(B_):
        for h in range(KV_):
            kept = set(idx[bi, h, : ln[bi, h]].tolist())
            assert all(t - 1 in kept for t in kept if t % 2 and t - 1 >= int(key_start[bi])), (bi, h)
    # and the first keep[j] valid tokens of each block win under constant keys (checked above)


def fake_budgets(config: TCAConfig, KV: int, layers: int, gen: torch.Generator) -> Budgets:
    """Budgets without a model: each head picks a random ladder candidate (head 0 of layer 0 dense)."""
    ladder = candidate_ladder(config.block_size)
    C = ladder.shape[0]
    heads_per_layer = []
    for li in range(layers):
        heads = []
        for h in range(KV):
            c = C if (li == 0 and h == 0) else int(torch.randint(0, C, (1,), generator=gen))
            sc = tuple(0.0 if i < c else 1.0 for i in range(C))  # first passing candidate: c (None if c == C)
            heads.append(HeadBudget(sc, sc))
        heads_per_layer.append(tuple(heads))
    ident = ModelIdentity("llama", "fake", layers, 4 * KV, KV, 64, 256, 100, (0.0,) * 8)
    return Budgets(ident, config, tuple(tuple(r) for r in ladder.tolist()), tuple(heads_per_layer))


@pytest.mark.parametrize("padded,opts", [
    (False, {}), (True, {}), (False, {"last_q": 8}), (True, {"last_q": 8, "floor": 0.9}), (True, {"gqa": "union"}),
    (False, {"last_q": 3, "gqa": "union"}),
])
def test_tca_plan_triton_equals_reference_and_commit(padded, opts):
    B, KV, g, L, D = 2, 2, 2, 800, 64
    cfg = TCAConfig(block_size=64, window=128, alpha=0.5)
    gen = torch.Generator().manual_seed(7)
    budgets = fake_budgets(cfg, KV, 2, gen)
    q_last, k = separated_inputs(B, KV * g, KV, L, D, torch.float32, gen)
    q = torch.randn(B, KV * g, L, D, generator=gen)
    r = opts.get("last_q", 1)
    q[:, :, -r:] = window_inputs(q_last, r, gen)  # the selection queries: no near-ties
    v = torch.randn(B, KV, L, D, generator=gen)
    key_start = torch.tensor([0, 150]) if padded else torch.zeros(B, dtype=torch.long)
    for layer in range(2):
        m = TCA(budgets, **opts)
        tri = m.plan(layer, q.to(DEV), k.to(DEV), key_start.to(DEV), 0.125, backend="triton", padded=padded)
        ref = m.plan(layer, q, k, key_start, 0.125, backend="reference", padded=padded)
        assert torch.equal(tri.kept_idx.cpu(), ref.kept_idx) and torch.equal(tri.kept_len.cpu(), ref.kept_len)
        torch.testing.assert_close(tri.retained.cpu(), ref.retained, rtol=1e-4, atol=1e-6)
        assert (tri.local_start, tri.window, tri.block_size, tri.kept_total) == (
            ref.local_start, ref.window, ref.block_size, ref.kept_total)
        assert torch.equal(tri.decode_keep.cpu(), ref.decode_keep)
        if padded or opts.get("floor") or opts.get("gqa") == "union":
            assert ref.kept_total is None
        else:
            assert ref.kept_total == int(ref.kept_len.sum())
        # the cache holds the same tensors with and without the host-known total
        total = int(ref.kept_len.sum())
        plans = [dataclasses.replace(ref, kept_total=None), dataclasses.replace(ref, kept_total=total)]
        layers = []
        for p in plans:
            lay = RaggedLayer(cfg.block_size, cfg.window, backend="reference")
            kk = k.transpose(2, 3).contiguous().transpose(2, 3)  # strided k: the direct gather must cope
            lay.update(kk, v)
            lay.commit_prefill(p, key_start, ref.decode_keep)
            layers.append(lay)
        a, c = layers
        assert a.g_keys.shape[0] == total
        for name in ("g_keys", "g_values", "g_pos", "g_offsets", "t_keys", "t_values"):
            x, y = getattr(a, name), getattr(c, name)
            assert x.dtype == y.dtype and torch.equal(x[..., : a.t_fill, :] if name[0] == "t" else x,
                                                      y[..., : c.t_fill, :] if name[0] == "t" else y), name
        if padded:
            assert bool((a.g_pos >= 0).all())  # the plan never keeps padding


def test_dispatch_backends_agree_and_validate():
    gen = torch.Generator().manual_seed(1)
    B, H, KV, L, D, b = 1, 2, 1, 400, 64, 32
    n = (L - 64) // b
    q, k = separated_inputs(B, H, KV, L, D, torch.float32, gen)
    kr = sel.keep_per_rank(ladder_p(KV, b, gen), n, b)
    M = int(kr.sum(-1).max())
    q, k, kr = q.to(DEV), k.to(DEV), kr.to(DEV)  # compiled Triton (on a GPU machine) needs CUDA tensors
    spec = SelectionSpec(torch.zeros(B, dtype=torch.long, device=DEV), kr, n, b, 0.0, "sum", M)
    a = TS.select_and_pack(q, k, spec, 0.125, backend="triton")
    r = TS.select_and_pack(q, k, spec, 0.125, backend="reference")
    assert torch.equal(a[0], r[0]) and torch.equal(a[1], r[1])
    with pytest.raises(ValueError):
        TS.select_and_pack(q, k, dataclasses.replace(spec, mass_norm="median"), 0.125, backend="triton")
    with pytest.raises(ValueError):  # max_kept too small for the reference
        TS.select_and_pack(q, k, dataclasses.replace(spec, max_kept=M - 1), 0.125, backend="reference")
    with pytest.raises(ValueError):  # the Triton path needs the output width on the host
        TS.select_and_pack(q, k, dataclasses.replace(spec, max_kept=None), 0.125, backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_select_has_no_host_sync():
    B, H, KV, L, D, b, w = 1, 32, 8, 8192, 128, 128, 4096
    n = (L - w) // b
    gen = torch.Generator().manual_seed(0)
    kr = sel.keep_per_rank(ladder_p(KV, b, gen), n, b)
    M = int(kr.sum(-1).max())
    q = torch.randn(B, H, D, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(B, KV, L, D, device=DEV, dtype=torch.bfloat16)
    ks = torch.zeros(B, dtype=torch.long, device=DEV)
    kr_d = kr.to(DEV, torch.int32)
    spec = SelectionSpec(ks, kr_d, n, b, 0.5, "max", M)
    select_and_pack_triton(q, k, spec, D**-0.5)  # compile
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = select_and_pack_triton(q, k, spec, D**-0.5)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = TS.select_and_pack_ref(q, k, spec, D**-0.5)
    idx_r, ln_r, _ = TS.select_from_importance_ref(out[3], spec)
    assert torch.equal(out[0], idx_r) and torch.equal(out[1], ln_r)
    torch.testing.assert_close(out[3], ref[3], rtol=1e-3, atol=1e-6)


def plans_without_host_sync(m: TCA, q, k, key_start, scaling):
    """TCA.plan on the Triton path (compiled first, then run under CUDA sync debug mode "error",
    so a host sync raises) and on the reference, for the same padded batch."""
    m.plan(0, q, k, key_start, scaling, backend="triton", padded=True)  # compile, cache the ladder
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tri = m.plan(0, q, k, key_start, scaling, backend="triton", padded=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return tri, m.plan(0, q, k, key_start, scaling, backend="reference", padded=True)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_padded_tca_plan_has_no_host_sync_and_rows_select_as_alone():
    """TCA.plan on a left-padded batch (per-row geometry, keep-per-rank built on the device) runs
    the fused selection without a host sync, equals the reference, and each row keeps what it
    keeps alone (shifted by its padding)."""
    B, KV, g, L, D, b, w = 3, 8, 4, 4096 + 333, 128, 128, 1024
    gen = torch.Generator().manual_seed(2)
    cfg = TCAConfig(block_size=b, window=w)
    budgets = fake_budgets(cfg, KV, 1, gen)
    q_last, k = separated_inputs(B, KV * g, KV, L, D, torch.bfloat16, gen)
    q, k = q_last[:, :, None].to(DEV), k.to(DEV)  # TCA.plan reads only the last query
    key_start = torch.tensor([0, 700, 3500], device=DEV)  # the last row is dense alone (829 <= w + b)
    m = TCA(budgets)
    tri, ref = plans_without_host_sync(m, q, k, key_start, D**-0.5)
    assert torch.equal(tri.kept_idx, ref.kept_idx) and torch.equal(tri.kept_len, ref.kept_len)
    assert torch.equal(tri.row_local_start, ref.row_local_start)
    for r, s in enumerate(key_start.tolist()):
        alone = m.plan(0, q[r : r + 1], k[r : r + 1, :, s:], torch.zeros(1, dtype=torch.long, device=DEV), D**-0.5,
                       backend="triton", padded=False)
        if alone is None:
            assert int(tri.row_local_start[r]) == s and int(tri.kept_len[r].max()) == 0
            continue
        assert int(tri.row_local_start[r]) - s == alone.local_start
        for h in range(KV):
            got = tri.kept_idx[r, h, : int(tri.kept_len[r, h])] - s
            assert torch.equal(got, alone.kept_idx[0, h, : int(alone.kept_len[0, h])]), (r, h)


# -- options last_q = r and gqa="union": the fused window selection against its reference --------
from tca_attention.methods.tca import triton_select as TT  # noqa: E402


def window_inputs(q_last: torch.Tensor, r: int, gen: torch.Generator) -> torch.Tensor:
    """(B, H, r, D) queries: q_last scaled per query by 1, 1.25, 1.5 or 1.75 (exact in every dtype).
    On separated_inputs' keys every query's logits are increasing in the key's rank, so the pooled
    importance of the keys every query sees (the global region) keeps the ranks: no near-ties."""
    c = torch.tensor([1.0, 1.25, 1.5, 1.75])[torch.randint(0, 4, (*q_last.shape[:2], r), generator=gen)]
    return (q_last.float()[:, :, None] * c[..., None]).to(q_last.dtype)


def min_global_gap(s: torch.Tensor, key_start: torch.Tensor, local_start: torch.Tensor) -> float:
    """Smallest relative gap between sorted importances inside each row's global region."""
    gaps = []
    for bi in range(s.shape[0]):
        srt = s[bi, :, int(key_start[bi]): int(local_start[bi])].sort(-1).values
        if srt.shape[-1] > 1:
            gaps.append(((srt[..., 1:] - srt[..., :-1]) / srt[..., 1:]).min())
    return float(torch.stack(gaps).min()) if gaps else 1.0


def union_heads_triton(q_win, k, spec, scaling, w):
    """The per-query-head importance (B, KV, g, L) the fused union selection ranks with."""
    B, H, r, D = q_win.shape
    KV, L = k.shape[1], k.shape[2]
    ks, nb = TT._rows(spec.n_blocks, spec.key_start, B, k.device)
    pmax, psum = TT.step_window_stats(q_win, k, ks, scaling)
    s = TT.step_window_importance(q_win, k, pmax, psum, ks, nb, spec.n_max, spec.block_size, spec.alpha,
                                  spec.mass_norm, scaling, w, per_head=True)[0]
    return s.view(B, KV, H // KV, L)


def window_spec(p, L, key_start, b, w, union, g, alpha, norm, padded=True):
    """SelectionSpec as TCA.plan builds it for the options (union: max_kept bounds the union)."""
    n_max = (L - w) // b
    if padded:
        n, keep_rank = row_ranks(p, L, key_start, b, w)
    else:
        n, keep_rank = n_max, sel.keep_per_rank(p, n_max, b)
    M = int(keep_rank.sum(-1).max())
    if union:
        M = min(g * M, n_max * b)
    return SelectionSpec(key_start, keep_rank, n, b, alpha, norm, M)


def on_dev(spec: SelectionSpec) -> SelectionSpec:
    n = spec.n_blocks if isinstance(spec.n_blocks, int) else spec.n_blocks.to(DEV)
    return dataclasses.replace(spec, key_start=spec.key_start.to(DEV), keep_rank=spec.keep_rank.to(DEV), n_blocks=n)


def run_window(q_win, k, spec, scaling, w, union):
    """Fused and reference window selection (both on DEV), on the CPU at the end."""
    q_win, k, dspec = q_win.to(DEV), k.to(DEV), on_dev(spec)
    tri = TT.select_and_pack_window_triton(q_win, k, dspec, scaling, w, union)
    ref = TS.select_and_pack_window_ref(q_win, k, dspec, scaling, w, union)
    return [t.cpu() for t in tri], [t.cpu() for t in ref]


def check_window_case(B, H, KV, L, D, b, w, ks, r, union, alpha, norm, dtype, seed, s_tol=(1e-4, 1e-7), span=1):
    gen = torch.Generator().manual_seed(seed)
    key_start = torch.tensor(ks)
    g = H // KV
    spec = window_spec(ladder_p(KV, b, gen), L, key_start, b, w, union, g, alpha, norm, padded=max(ks) > 0)
    spec = dataclasses.replace(spec, span=span)
    scaling = D**-0.5
    # random inputs: s close to the reference; the selection exact given the kernel's own s
    q = (torch.randn(B, H, r, D, generator=gen) * 2).to(dtype)
    k = torch.randn(B, KV, L, D, generator=gen).to(dtype)
    (idx, ln, ret, s), (_, _, ret_ref, s_ref) = run_window(q, k, spec, scaling, w, union)
    torch.testing.assert_close(s, s_ref, rtol=s_tol[0], atol=s_tol[1])  # fp32 math on both sides
    for bi, st in enumerate(ks):
        assert bool((s[bi, :, :st] == 0).all())
    assert idx.shape == (B, KV, spec.max_kept) and ln.dtype == torch.int32
    if union:
        s_heads = union_heads_triton(q.to(DEV), k.to(DEV), on_dev(spec), scaling, w).cpu()
        torch.testing.assert_close(s_heads.mean(2), s, rtol=1e-5, atol=1e-8)
        mask = TS.union_mask_ref(s_heads, spec)
    else:
        mask = TS.select_mask_ref(s, spec)
    idx_r, ln_r = TS.pack_to_width(mask, spec.max_kept)
    assert torch.equal(ln, ln_r) and torch.equal(idx, idx_r)
    torch.testing.assert_close(ret, ret_ref, rtol=1e-4, atol=1e-6)
    if span > 1:  # sums of separated scores may nearly tie: exactness end to end is not promised
        return idx, ln
    # inputs without near-ties in the global region: exact end to end
    q_last, k = separated_inputs(B, H, KV, L, D, dtype, gen)
    q = window_inputs(q_last, r, gen)
    (idx, ln, ret, s), (idx_ref, ln_ref, ret_ref, s_ref) = run_window(q, k, spec, scaling, w, union)
    if not union:
        assert min_global_gap(s_ref, key_start, TS.local_starts(spec, B, s.device)) > 1e-3, "near-ties in the inputs"
    assert torch.equal(ln, ln_ref) and torch.equal(idx, idx_ref)
    torch.testing.assert_close(ret, ret_ref, rtol=1e-4, atol=1e-6)
    return idx, ln


# (B, H, KV, L, D, b, window, key_start, r, union, alpha, mass_norm, dtype)
WINDOW_CASES = [
    (1, 1, 1, 333, 16, 16, 48, [0], 2, False, 0.0, "sum", torch.float32),  # g = 1, odd L
    (3, 6, 2, 301, 32, 16, 32, [0, 37, 90], 7, False, 0.5, "max", torch.bfloat16),  # g = 3, padding per row
    (2, 7, 1, 250, 16, 16, 16, [5, 0], 16, False, 0.5, "sum", torch.float16),  # g = 7, r = window
    (1, 14, 2, 275, 64, 32, 64, [11], 16, False, 0.0, "max", torch.float32),  # g = 7, L % b != 0, D = 64
    (2, 4, 2, 200, 16, 16, 32, [0, 150], 7, False, 0.5, "sum", torch.float32),  # a row dense alone (50 <= w + b)
    (2, 6, 2, 301, 32, 16, 32, [0, 37], 1, True, 0.5, "sum", torch.float32),  # union, r = 1
    (2, 6, 2, 301, 32, 16, 32, [3, 0], 7, True, 0.5, "max", torch.bfloat16),  # union, r = 7
    (1, 7, 1, 190, 16, 16, 16, [0], 16, True, 0.0, "sum", torch.float16),  # union, g = 7, r = window
    (2, 2, 2, 181, 16, 16, 32, [0, 21], 2, True, 0.5, "sum", torch.float32),  # union, g = 1
]


@pytest.mark.parametrize("B,H,KV,L,D,b,w,ks,r,union,alpha,norm,dtype", WINDOW_CASES)
def test_window_select_matches_reference(B, H, KV, L, D, b, w, ks, r, union, alpha, norm, dtype):
    check_window_case(B, H, KV, L, D, b, w, ks, r, union, alpha, norm, dtype, seed=L + H + r)


def test_dot_chunk_splits_only_tiles_that_overflow():
    """The window importance dot's D chunk: whole D while a (b, D) key tile fits, else halved;
    such tiles also run with one pipeline stage (the H100 refused fp32 b = 128, D = 256 with
    triton 3.6: 260 KiB of shared memory)."""
    assert TT.window_importance_stages(128, 256, 4) == 1 and TT.window_importance_stages(128, 128, 2) == 3
    assert TT.dot_chunk(128, 256, 4) == 128 and TT.dot_chunk(256, 128, 4) == 64
    assert TT.dot_chunk(128, 256, 2) == 256 and TT.dot_chunk(64, 128, 4) == 128
    assert TT.dot_chunk(4096, 64, 4) == 16  # never below tl.dot's 16


HOPPER_SHARED_LIMIT = 232448  # bytes per block on H100 / H200 (what triton's launch checks)


@pytest.mark.parametrize("D,b,rd,dtype", [(256, 128, 64, "fp32"), (128, 128, 64, "bf16"), (256, 64, 64, "fp32")])
def test_window_importance_kernel_fits_hopper_shared_memory(D, b, rd, dtype):
    """The window importance kernel compiled for sm_90 fits the H100's shared memory at the
    largest fuzz shapes (fp32 b = 128, D = 256, 64 dot rows: refused on the H100 with triton
    3.6 and three pipeline stages) and a real bf16 shape."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "sm90_shared_memory.py")
    run = subprocess.run([sys.executable, script, str(D), str(b), str(rd), dtype], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert 0 < int(run.stdout.split()[-1]) <= HOPPER_SHARED_LIMIT


@pytest.mark.parametrize("case", [WINDOW_CASES[3], WINDOW_CASES[6]])
def test_window_select_with_the_dot_over_head_dim_chunks_matches_reference(case, monkeypatch):
    """The chunked dot (DK < D) selects what the reference selects (a small tile limit forces
    it at interpreter sizes)."""
    monkeypatch.setattr(TT, "DOT_TILE_BYTES", 1024)
    B, H, KV, L, D, b, w, ks, r, union, alpha, norm, dtype = case
    assert TT.dot_chunk(b, D, 4) < D
    check_window_case(B, H, KV, L, D, b, w, ks, r, union, alpha, norm, dtype, seed=L + H + r)


# (B, H, KV, L, D, b, window, key_start, r, union, span): option span on both fused paths
SPAN_CASES = [
    (2, 6, 2, 301, 32, 16, 32, [0, 37], 1, False, 3),  # the paper's-rule kernels, padding
    (3, 6, 2, 301, 32, 16, 32, [0, 37, 90], 7, False, 5),  # window path
    (2, 7, 1, 250, 16, 16, 16, [5, 0], 16, False, 15),  # span = block size - 1, g = 7
    (2, 6, 2, 301, 32, 16, 32, [3, 0], 7, True, 3),  # union
]


@pytest.mark.parametrize("B,H,KV,L,D,b,w,ks,r,union,span", SPAN_CASES)
def test_span_select_matches_reference(B, H, KV, L, D, b, w, ks, r, union, span):
    """Option span: the fused selection keeps exactly what the reference keeps from the kernel's
    own importance (ranking by selection.span_scores), with the same retained mass, and the
    option is live (it changes the kept set of the same inputs)."""
    gen = torch.Generator().manual_seed(L + span)
    key_start = torch.tensor(ks)
    spec = window_spec(ladder_p(KV, b, gen), L, key_start, b, w, union, H // KV, 0.5, "sum")
    spec = dataclasses.replace(spec, span=span)
    scaling = D**-0.5
    q = torch.randn(B, H, r, D, generator=gen) * 2
    k = torch.randn(B, KV, L, D, generator=gen)
    (idx, ln, ret, s), (idx_ref, ln_ref, ret_ref, s_ref) = run_window(q, k, spec, scaling, w, union)
    torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=1e-7)
    if union:
        mask = TS.union_mask_ref(union_heads_triton(q.to(DEV), k.to(DEV), on_dev(spec), scaling, w).cpu(), spec)
    else:
        mask = TS.select_mask_ref(s, spec)
    idx_r, ln_r = TS.pack_to_width(mask, spec.max_kept)
    assert torch.equal(ln, ln_r) and torch.equal(idx, idx_r)
    torch.testing.assert_close(ret, ret_ref, rtol=1e-4, atol=1e-6)
    (idx1, _, _, _), _ = run_window(q, k, dataclasses.replace(spec, span=1), scaling, w, union)
    assert not torch.equal(idx1, idx)


def test_span_scores_by_hand():
    s = torch.tensor([[0.0, 0.1, 0.5, 0.2, 0.0, 0.0, 0.3]])
    torch.testing.assert_close(sel.span_scores(s, 3), torch.tensor([[0.1, 0.6, 1.0, 0.7, 0.2, 0.3, 0.6]]))
    assert sel.span_scores(s, 1) is s


@pytest.mark.parametrize("rows,L,span", [(1, 7, 3), (3, 200, 7), (2, 1, 5), (5, 130, 9)])
def test_span_kernel_equals_span_scores(rows, L, span):
    """step_span (one launch of _span_kernel) is selection.span_scores bit for bit, padding zeros,
    ties and row edges included (L not a multiple of the kernel's block; rows never mix)."""
    from tca_attention.methods.tca.triton_select import step_span

    gen = torch.Generator().manual_seed(rows * 1000 + L)
    s = torch.rand(rows, L, generator=gen).to(DEV)
    s[:, : L // 3] = 0.0  # a padded row start
    s[:, L // 2 :: 5] = s[:, L // 2 : L // 2 + 1].clone()  # ties
    assert torch.equal(step_span(s, span), sel.span_scores(s, span))
    assert step_span(s, 1) is s


def test_window_r1_is_the_paper_rule_exactly():
    """last_q = 1 without union is the paper's rule's fused path itself, bit for bit (both
    backends), and gqa="union" with g = 1 and r = 1 (the window kernels) selects what it selects."""
    B, H, KV, L, D, b, w = 2, 4, 2, 300, 32, 16, 32
    gen = torch.Generator().manual_seed(9)
    key_start = torch.tensor([0, 45])
    spec = window_spec(ladder_p(KV, b, gen), L, key_start, b, w, False, H // KV, 0.5, "max")
    q, k = separated_inputs(B, H, KV, L, D, torch.float32, gen)
    dspec = on_dev(spec)
    paper = select_and_pack_triton(q.to(DEV), k.to(DEV), dspec, 0.125)
    for backend in ("triton", "reference"):
        qd, kd, sp = (q.to(DEV), k.to(DEV), dspec) if backend == "triton" else (q, k, spec)
        win = TS.select_and_pack_window(qd[:, :, None], kd, sp, 0.125, w, backend=backend)
        base = paper if backend == "triton" else TS.select_and_pack_ref(q, k, spec, 0.125)
        assert all(torch.equal(a, c) for a, c in zip(win, base)), backend
    # union with one query head per KV head: the per-head selection is the shared one
    q1, k1 = separated_inputs(B, KV, KV, L, D, torch.float32, gen)
    shared = select_and_pack_triton(q1.to(DEV), k1.to(DEV), dspec, 0.125)
    union = TT.select_and_pack_window_triton(q1[:, :, None].to(DEV), k1.to(DEV), dspec, 0.125, w, union=True)
    assert torch.equal(union[0], shared[0]) and torch.equal(union[1], shared[1])
    torch.testing.assert_close(union[3], shared[3], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(union[2], shared[2], rtol=1e-5, atol=1e-6)


def test_window_padded_row_selects_what_it_selects_alone():
    """Batch invariance of the window selection: a left-padded row keeps what it keeps alone."""
    B, H, KV, L, D, b, w, r = 3, 4, 2, 300, 32, 16, 32, 9
    gen = torch.Generator().manual_seed(6)
    key_start = torch.tensor([0, 49, 100])
    p = ladder_p(KV, b, gen)
    spec = window_spec(p, L, key_start, b, w, False, H // KV, 0.5, "sum")
    q_last, k = separated_inputs(B, H, KV, L, D, torch.float32, gen)
    q = window_inputs(q_last, r, gen)
    for union in (False, True):
        sp = window_spec(p, L, key_start, b, w, union, H // KV, 0.5, "sum")
        (idx, ln, ret, _), _ = run_window(q, k, sp, 0.125, w, union)
        for row, st in enumerate(key_start.tolist()):
            alone = window_spec(p, L - st, torch.zeros(1, dtype=torch.long), b, w, union, H // KV, 0.5, "sum",
                                padded=False)
            (a_idx, a_len, a_ret, _), _ = run_window(q[row: row + 1], k[row: row + 1, :, st:], alone, 0.125, w, union)
            assert torch.equal(ln[row], a_len[0]), (union, row)
            for h in range(KV):
                assert torch.equal(idx[row, h, : ln[row, h]] - st, a_idx[0, h, : a_len[0, h]]), (union, row, h)
            torch.testing.assert_close(ret[row], a_ret[0], rtol=1e-5, atol=1e-6)
    del spec


@pytest.mark.parametrize("union", [False, True])
def test_window_ties_break_like_stable_argsort(union):
    """Pairwise duplicated keys: the window path's pooled rows give bit-equal s to both keys of a
    pair (one reduction over D per key), and of a tied pair the earlier token is kept."""
    B, H, KV, L, D, b, w, r = 2, 4, 2, 300, 32, 16, 32, 5
    gen = torch.Generator().manual_seed(12)
    key_start = torch.tensor([0, 40])  # even: pairs never straddle a block
    spec = window_spec(ladder_p(KV, b, gen), L, key_start, b, w, union, H // KV, 0.5, "sum")
    q = torch.randn(B, H, r, D, generator=gen)
    k = torch.randn(B, KV, L // 2, D, generator=gen).repeat_interleave(2, dim=2)
    (idx, ln, _, s), _ = run_window(q, k, spec, 0.125, w, union)
    e = (L - r) // 2 * 2  # keys every pooled query sees: pairs [0, e)
    if union:
        s_heads = union_heads_triton(q.to(DEV), k.to(DEV), on_dev(spec), 0.125, w).cpu()
        assert torch.equal(s_heads[..., :e:2], s_heads[..., 1:e:2]), "duplicated keys must give equal s"
        mask = TS.union_mask_ref(s_heads, spec)
    else:
        assert torch.equal(s[..., :e:2], s[..., 1:e:2]), "duplicated keys must give equal s"
        mask = TS.select_mask_ref(s, spec)
    idx_r, ln_r = TS.pack_to_width(mask, spec.max_kept)
    assert torch.equal(ln, ln_r) and torch.equal(idx, idx_r)
    for bi in range(B):
        for h in range(KV):
            kept = set(idx[bi, h, : ln[bi, h]].tolist())
            assert all(t - 1 in kept for t in kept if t % 2 and t - 1 >= int(key_start[bi])), (bi, h)


@pytest.mark.parametrize("gqa", ["shared", "union"])
def test_tca_last_q_on_a_tiny_model_triton_equals_reference(gqa, monkeypatch):
    """TCA(last_q=16) in a tiny random model's prefill (left-padded batch; 2 layers, 1 with union:
    the interpreter is slow) on the Triton path: every layer's plan keeps exactly the sets the
    reference selection keeps on the same q, k."""
    from tca_attention.integration import enable
    from tiny_models import tiny

    layers = 2 if gqa == "shared" else 1
    model = tiny("llama", num_hidden_layers=layers).to(DEV)  # 6 query heads, 2 KV heads (g = 3), head dim 16
    cfg = TCAConfig(block_size=16, window=32)
    ident = ModelIdentity.of(model)
    fake = fake_budgets(cfg, ident.num_kv_heads, ident.num_layers, torch.Generator().manual_seed(4))
    budgets = Budgets(ident, fake.config, fake.candidates, fake.layers)
    calls = []
    plan = TCA.plan

    def recording(self, layer_idx, q, k, key_start, scaling, **kw):
        out = plan(self, layer_idx, q, k, key_start, scaling, **kw)
        calls.append((layer_idx, q, k, key_start, scaling, kw, out))
        return out

    monkeypatch.setattr(TCA, "plan", recording)
    gen = torch.Generator().manual_seed(8)
    L, lengths = 150, (150, 117)
    ids = torch.randint(0, 97, (2, L), generator=gen).to(DEV)
    mask = torch.ones(2, L, dtype=torch.long, device=DEV)
    mask[1, : L - lengths[1]] = 0
    m = TCA(budgets, last_q=16, gqa=gqa)
    with torch.no_grad(), enable(model, m, backend="triton") as session:
        model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
              **session.cache_kwargs(session.new_cache()))
    assert [c[0] for c in calls] == list(range(layers))
    for layer, q, k, key_start, scaling, kw, tri in calls:
        assert tri is not None and kw["backend"] == "triton"
        ref = plan(m, layer, q.cpu(), k.cpu(), key_start.cpu(), scaling, **{**kw, "backend": "reference"})
        assert torch.equal(tri.kept_len.cpu(), ref.kept_len) and torch.equal(tri.kept_idx.cpu(), ref.kept_idx), layer
        torch.testing.assert_close(tri.retained.cpu(), ref.retained, rtol=1e-4, atol=1e-6)
        assert int(ref.kept_len.min()) > 0 and bool((ref.kept_len < 7 * 16).any())  # a real selection


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("shard", range(GPU_FUZZ_SHARDS))
def test_gpu_window_select_fuzz(shard):
    """200 random shapes (this shard: every GPU_FUZZ_SHARDS-th) at GPU sizes: last_q in 1..window,
    shared and union, g in 1..8, padding, every dtype, span 1..b-1, against the reference
    (check_window_case)."""
    gen = torch.Generator().manual_seed(21)
    for i in range(200):
        B = int(torch.randint(1, 4, (1,), generator=gen))
        KV = int(torch.randint(1, 5, (1,), generator=gen))
        g = int(torch.randint(1, 9, (1,), generator=gen))
        D = [64, 128, 256][int(torch.randint(0, 3, (1,), generator=gen))]
        b = [32, 64, 128][int(torch.randint(0, 3, (1,), generator=gen))]
        w = b * int(torch.randint(1, 5, (1,), generator=gen))
        L = w + b * int(torch.randint(2, 40, (1,), generator=gen)) + int(torch.randint(0, b, (1,), generator=gen))
        r = [1, 2, 7, 16, w, int(torch.randint(1, w + 1, (1,), generator=gen))][int(torch.randint(0, 6, (1,), generator=gen))]
        ks = [0] + [int(torch.randint(0, L - 1, (1,), generator=gen)) for _ in range(B - 1)]
        union = bool(torch.randint(0, 2, (1,), generator=gen))
        alpha = [0.0, 0.5, 1.0][int(torch.randint(0, 3, (1,), generator=gen))]
        norm = ["sum", "max"][int(torch.randint(0, 2, (1,), generator=gen))]
        dtype = [torch.float32, torch.bfloat16, torch.float16][int(torch.randint(0, 3, (1,), generator=gen))]
        span = [1, 1, 3, 7, b - 1][int(torch.randint(0, 5, (1,), generator=gen))]
        if i % GPU_FUZZ_SHARDS != shard:
            continue
        check_window_case(B, g * KV, KV, L, D, b, w, ks, r, union, alpha, norm, dtype, seed=1000 + i,
                          s_tol=(1e-3, 1e-6), span=span)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("opts", [{"last_q": 16}, {"gqa": "union"}, {"last_q": 16, "gqa": "union"},
                                  {"last_q": 16, "floor": 0.9}, {"last_q": 16, "span": 7}])
def test_gpu_window_tca_plan_has_no_host_sync(opts):
    """TCA.plan with the selection options on a left-padded batch runs the fused window selection
    without a host sync and keeps what the reference keeps."""
    B, KV, g, L, D, b, w = 3, 8, 4, 4096 + 333, 128, 128, 1024
    gen = torch.Generator().manual_seed(2)
    budgets = fake_budgets(TCAConfig(block_size=b, window=w), KV, 1, gen)
    q_last, k = separated_inputs(B, KV * g, KV, L, D, torch.bfloat16, gen)
    r = opts.get("last_q", 1)
    q = window_inputs(q_last, r, gen)  # TCA.plan reads only the last r queries
    q, k = q.to(DEV), k.to(DEV)
    key_start = torch.tensor([0, 700, 3500], device=DEV)  # the last row is dense alone
    m = TCA(budgets, **opts)
    tri, ref = plans_without_host_sync(m, q, k, key_start, D**-0.5)
    assert torch.equal(tri.kept_idx, ref.kept_idx) and torch.equal(tri.kept_len, ref.kept_len)
    torch.testing.assert_close(tri.retained, ref.retained, rtol=1e-4, atol=1e-5)


def test_window_selection_below_the_dot_tile_runs_the_reference(monkeypatch):
    """Blocks of fewer than 16 keys: backend="auto" runs the reference selection even where auto
    means Triton (the fused kernels' dot tiles need 16), an explicit Triton backend refuses with a
    clear error."""
    monkeypatch.setattr(TS, "resolve", lambda backend, device: "reference" if backend == "reference" else "triton")
    gen = torch.Generator().manual_seed(3)
    B, H, KV, L, D, b, w, r = 1, 4, 2, 200, 16, 8, 16, 4
    spec = window_spec(ladder_p(KV, b, gen), L, torch.tensor([0]), b, w, False, H // KV, 0.5, "sum")
    q = torch.randn(B, H, r, D, generator=gen)
    k = torch.randn(B, KV, L, D, generator=gen)
    got = TS.select_and_pack_window(q, k, spec, D**-0.5, w, backend="auto")
    want = TS.select_and_pack_window_ref(q, k, spec, D**-0.5, w)
    assert all(torch.equal(a, c) for a, c in zip(got, want))
    with pytest.raises(ValueError, match="block_size >= 16"):
        TT.select_and_pack_window_triton(q.to(DEV), k.to(DEV), on_dev(spec), D**-0.5, w)
