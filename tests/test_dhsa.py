"""DHSA: boundaries found where hand-built keys change, the token top-k against a loop of the
definition, a query block aligned with one chunk selects that chunk, batch invariance, full
budget = dense attention, the density knob and bad settings (small blocks: 16 tokens)."""
from __future__ import annotations

import pytest
import torch

from tca_attention import registry
from tca_attention.methods import dhsa as DH
from tca_attention.methods.dhsa import DHSA, attended_fraction, budget_for
from method_checks import assert_alone_equals_batched, assert_full_density_equals_dense
from test_xattention import plan_lists, prompts

BS = 16


def segmented_keys(lengths: list[int], KV: int, D: int, gen: torch.Generator, noise: float = 0.01) -> torch.Tensor:
    """(KV, sum(lengths), D): each segment's keys one random direction (per KV head) plus a little noise."""
    parts = [torch.randn(KV, 1, D, generator=gen).expand(KV, n, D) for n in lengths]
    k = torch.cat(parts, 1)
    return k + noise * torch.randn(k.shape, generator=gen)


def test_boundary_scores_match_the_definition(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    k = torch.randn(2, 3, 50, 8, generator=gen, dtype=torch.float64)
    key_start = torch.tensor([0, 9])
    w, length = 3, 64
    got = DH.boundary_scores(k, key_start, w, length)
    for b in range(2):
        s0, n = int(key_start[b]), 50 - int(key_start[b])
        flat = k[b, :, s0:].permute(1, 0, 2).reshape(n, -1)  # (n, KV * D): every head's key of a token
        for p in range(length):
            if p < w - 1 or p + w >= n:
                assert got[b, p] == float("-inf"), (b, p)
                continue
            left, right = flat[p - w + 1:p + 1].mean(0), flat[p + 1:p + w + 1].mean(0)
            want = 1 - torch.nn.functional.cosine_similarity(left, right, dim=0)
            assert float(got[b, p]) == pytest.approx(float(want), abs=1e-5), (b, p)
    monkeypatch.setattr(DH, "_BOUNDARY_ELEMENTS", 1)  # one position at a time: the same scores
    torch.testing.assert_close(DH.boundary_scores(k, key_start, w, length), got, rtol=0, atol=1e-6)  # fp32 sums


def test_boundaries_are_where_the_keys_change():
    gen = torch.Generator().manual_seed(0)
    segs = [20, 25, 35, 48]  # chunk starts 0, 20, 45, 80 (128 tokens: 3 boundaries with chunk_len 32)
    k = segmented_keys(segs, 2, 8, gen)
    m = DHSA(budget=64, block_size=BS, chunk_len=32)
    ids = m.chunks(k[None], torch.zeros(1, dtype=torch.long), 128)[0]
    starts = [0] + [int(p) for p in torch.nonzero(ids.diff()).flatten() + 1]
    assert starts == [0, 20, 45, 80]
    # left-padded by 13 junk tokens: the same chunks, counted from the row's first real token
    padded = torch.cat([torch.randn(2, 13, 8, generator=gen) * 3, k], 1)[None]
    ids2 = m.chunks(padded, torch.tensor([13]), 128)[0]
    assert torch.equal(ids2, ids)
    # chunk_len caps the count: the best boundary (the most dissimilar neighbours) is kept first
    few = DHSA(budget=64, block_size=BS, chunk_len=64).chunks(k[None], torch.zeros(1, dtype=torch.long), 128)[0]
    assert int(few.max()) == 1


def brute_extra(q, k, key_start, method) -> list[list[list[int]]]:
    """Per row and query block, the selected keys (absolute positions) by the definition: chunk
    representations by loops, token scores upsampled, a stable top-k over the candidates."""
    B, H, L, D = q.shape
    bs, out = method.block_size, []
    nq_all = -(-L // bs)
    ids = method.chunks(k, key_start, nq_all * bs)
    for b in range(B):
        s0 = int(key_start[b])
        n = L - s0
        cid = ids[b, :n].tolist()
        qm, km = q[b, :, s0:].double().mean(0), k[b, :, s0:].double().mean(0)  # head means (n, D)
        kbar = {}
        for c in set(cid):
            toks = [t for t in range(n) if cid[t] == c]
            kbar[c] = km[toks].mean(0) * len(toks) ** 0.5
        rows = []
        for i in range(-(-n // bs)):
            qt = qm[i * bs: min(n, (i + 1) * bs)]
            qbar = qt.mean(0) * qt.shape[0] ** 0.5
            forced = (qt.shape[0] if i == 0 else bs + qt.shape[0])
            left = max(0, method.budget - forced)
            if method.dense_tail and (i + 1) * bs > n - method.dense_tail:
                left = 0  # the dense tail: listed blocks, no extra columns
            cand = list(range(bs, i * bs))
            ranked = sorted(cand, key=lambda t: (-float(qbar @ kbar[cid[t]]), t))
            rows.append(sorted(s0 + t for t in ranked[:left]))
        out.append(rows)
    return out


def plan_extra(plan, b: int, h: int) -> list[list[int]]:
    return [sorted(c for c in row if c >= 0) for row in plan.extra_cols[b, h].tolist()]


CASES = [((150, 97, 60), 4, 2), ((130,), 3, 3)]  # GQA + padding, MHA


@pytest.mark.parametrize("lengths,H,KV", CASES)
@pytest.mark.parametrize("budget,tail", [(32, 0), (48, 20), (80, 0)])
def test_plan_is_the_token_top_k_of_the_definition(lengths, H, KV, budget, tail, monkeypatch):
    D = 8
    _, _, q, k, key_start = prompts(lengths, H, KV, D, seed=budget + H, scale=2.0)
    L = q.shape[2]
    method = DHSA(budget=budget, block_size=BS, chunk_len=8, nms=2, dense_tail=tail)
    plan = method.plan(0, q, k, key_start, D**-0.5)
    plan.validate(H, KV, L)
    monkeypatch.setattr(DH, "_SELECT_ELEMENTS", 1)  # one query block at a time: the same plan
    assert torch.equal(method.plan(0, q, k, key_start, D**-0.5).extra_cols, plan.extra_cols)
    assert plan.indptr.shape[1] == KV  # one list per KV head, the same for each
    want = brute_extra(q, k, key_start, method)
    for b, n in enumerate(lengths):
        nq = -(-n // BS)
        for h in range(KV):
            lists = plan_lists(plan, b, h)
            t0 = max(0, n - tail) // BS if tail else nq  # the first dense-tail block
            assert lists[:nq] == [[0]] + [[0, i] if i < t0 else list(range(i + 1)) for i in range(1, nq)]
            assert all(not x for x in lists[nq:])
            extra = plan_extra(plan, b, h)
            assert extra[:nq] == want[b] and all(not x for x in extra[nq:]), (b, h)
            assert all(len(x) + min(BS, n - i * BS) + (BS if i else 0) <= budget for i, x in enumerate(extra[:nq]))
        alone = method.plan(0, q[b:b + 1, :, L - n:], k[b:b + 1, :, L - n:], torch.zeros(1, dtype=torch.long),
                            D**-0.5, padded=False)
        assert float(alone.kept_fraction(n)[0, 0]) == pytest.approx(attended_fraction(n, budget, BS, tail))


def test_a_query_block_aligned_with_one_chunk_selects_it():
    """Keys of one chunk (tokens 50..69) point along e, so do the last block's queries: with room for
    20 tokens beyond its forced blocks, the last block selects exactly that chunk."""
    gen = torch.Generator().manual_seed(1)
    KV, H, D = 2, 4, 8
    segs = [30, 20, 20, 30, 28]  # chunks start at 0, 30, 50, 70, 100; 128 tokens = 8 blocks
    k = segmented_keys(segs, KV, D, gen)[None]
    e = torch.zeros(D)
    e[0] = 1.0
    k[:, :, 50:70] = 5 * e + 0.01 * torch.randn(1, KV, 20, D, generator=gen)
    k[:, :, :50] -= 5 * e  # the others point away from e
    k[:, :, 70:] -= 5 * e
    q = torch.randn(1, H, 128, D, generator=gen) * 0.1
    q[:, :, 112:] += e
    method = DHSA(budget=2 * BS + 20, block_size=BS, chunk_len=16, dense_tail=0)
    ids = method.chunks(k, torch.zeros(1, dtype=torch.long), 128)[0]
    assert ids[49] != ids[50] and bool((ids[50:70] == ids[50]).all()) and ids[69] != ids[70]
    plan = method.plan(0, q, k, torch.zeros(1, dtype=torch.long), D**-0.5, padded=False)
    assert plan_extra(plan, 0, 0)[7] == list(range(50, 70))


# 30 tokens: 2 blocks, no plan alone, every causal block in the batch; 83 tokens list more blocks
# than 96 (its dense tail starts a block earlier: 18 vs 15), the padded row lists the most
@pytest.mark.parametrize("lengths,tail", [((150, 97, 30), 10), ((96, 83), 8)])
def test_plan_alone_equals_plan_in_padded_batch(lengths, tail):
    H, KV, D = 4, 2, 8
    qs, ks, q, k, key_start = prompts(lengths, H, KV, D, seed=11, scale=2.0)
    method = DHSA(budget=48, block_size=BS, chunk_len=8, nms=2, dense_tail=tail)
    batched = method.plan(0, q, k, key_start, D**-0.5)
    for r, n in enumerate(lengths):
        nq = -(-n // BS)
        alone = method.plan(0, qs[r][None], ks[r][None], torch.zeros(1, dtype=torch.long), D**-0.5, padded=False)
        if alone is None:
            assert nq <= 2 and plan_lists(batched, r, 0)[:nq] == [[0], [0, 1]][:nq]
            continue
        shift = int(key_start[r])
        for h in range(KV):
            assert plan_lists(batched, r, h)[:nq] == plan_lists(alone, 0, h)
            assert plan_extra(batched, r, h)[:nq] == [[c + shift for c in x] for x in plan_extra(alone, 0, h)]
        torch.testing.assert_close(batched.kept_fraction(q.shape[2])[r], alone.kept_fraction(n)[0])


def test_short_prompts_and_bad_settings():
    q, k = torch.randn(1, 2, 2 * BS, 8), torch.randn(1, 2, 2 * BS, 8)
    assert DHSA(budget=64, block_size=BS).plan(0, q, k, torch.zeros(1, dtype=torch.long), 1.0) is None
    for bad, why in (({"budget": 200}, "budget >= 2 x block_size = 256"), ({"block_size": 24}, "power of two"),
                     ({"budget": 64, "block_size": 16, "chunk_len": 0}, "chunk_len"),
                     ({"budget": 64, "block_size": 16, "nms": 0}, "nms"),
                     ({"budget": 64, "block_size": 16, "boundary_window": 0}, "boundary_window"),
                     ({"budget": 64, "block_size": 16, "dense_tail": -1}, "dense_tail")):
        with pytest.raises(ValueError, match=why):
            DHSA(**bad)
    m = DHSA()
    assert (m.budget, m.block_size, m.chunk_len, m.boundary_window, m.nms, m.dense_tail, m.name) == \
        (2048, 128, 16, 4, 8, 64, "dhsa")
    assert m.decode_keep(0, 3).tolist() == [128] * 3 and m.select_decode(0, None, None) is None
    with pytest.raises(ValueError, match="not a valid int"):
        registry.create("dhsa:budget=lots")


def test_density_knob_solves_the_attended_fraction():
    for L, bs, tail in ((4096, 64, 64), (1000, 16, 0), (8192, 128, 64)):
        budgets = list(range(2 * bs, L + bs + 1, max(1, L // 64)))
        fracs = [attended_fraction(L, b, bs, tail) for b in budgets]
        assert all(a <= b for a, b in zip(fracs, fracs[1:])) and attended_fraction(L, L + bs, bs, tail) == 1.0
        for target in (0.1, 0.25, 0.5, 0.9):
            b = budget_for(target, L, {"block_size": bs, "dense_tail": tail})
            near = [attended_fraction(L, x, bs, tail) for x in (b - 1, b, b + 1) if x >= 2 * bs]
            assert abs(attended_fraction(L, b, bs, tail) - target) == min(abs(f - target) for f in near)
    spec = registry.at_density("dhsa:block_size=64", 0.25, 4096)
    assert spec == f"dhsa:budget={budget_for(0.25, 4096, {'block_size': 64})},block_size=64"
    assert registry.density_param("dhsa") == "budget" and "dhsa" in registry.describe()


def test_plan_runs_on_the_triton_kernel():
    from kernel_helpers import DEV  # sets up the interpreter without CUDA
    from tca_attention.engine import dispatch

    H, KV, D = 4, 2, 16
    _, _, q, k, key_start = prompts((90, 70), H, KV, D, seed=9, scale=2.0)
    v = torch.randn(k.shape, dtype=torch.float64)
    q, k, v, key_start = (t.to(DEV, torch.float32) if t.is_floating_point() else t.to(DEV) for t in (q, k, v, key_start))
    plan = DHSA(budget=48, block_size=BS, chunk_len=8, dense_tail=16).plan(0, q, k, key_start, D**-0.5)
    assert float(plan.kept_fraction(q.shape[2]).mean()) < 1
    tri = dispatch.prefill(q, k, v, plan, D**-0.5, backend="triton")
    ref = dispatch.prefill(q, k, v, plan, D**-0.5, backend="reference")
    assert float((tri - ref).abs().max()) <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_full_budget_equals_dense(arch):
    assert_full_density_equals_dense(arch, DHSA(budget=256, block_size=BS, chunk_len=8, dense_tail=0), steps_n=12,
                                     new_tokens=8)


def test_sparse_model_run_alone_equals_batched():
    # (at budget 48 the 75-token prompt generates EOS after two tokens, which the helper's 6-token
    # comparison cannot take; its prefill plans and logits were checked equal alone and batched)
    assert_alone_equals_batched(DHSA(budget=64, block_size=BS, chunk_len=8, dense_tail=16))


@pytest.mark.slow  # about 20 s on two shared CPU cores (the eval's tiny model has a 49K vocabulary)
def test_eval_runs_both_chunk_methods(tmp_path, smol_tokenizer, monkeypatch):
    """dhsa and longheads through `tca eval` on a tiny model: the recorded attended fraction is the
    closed form their density knobs solve with (a prompt of one sample, no padding)."""
    from tca_attention.eval.methods import ModelBackend
    from tca_attention.eval.runner import EvalConfig, evaluate
    from tca_attention.methods.longheads import attended_fraction as longheads_fraction
    from test_eval_pipeline import tiny_llama

    monkeypatch.setenv("TCA_CACHE_DIR", str(tmp_path / "cache"))
    backend = ModelBackend("tiny-llama", device="cpu", model=tiny_llama(len(smol_tokenizer)), tokenizer=smol_tokenizer)
    specs = ("dhsa:budget=96,block_size=16,dense_tail=16", "longheads:chunks=6,chunk_size=16")
    cfg = EvalConfig(model="tiny-llama", methods=specs, tasks=("niah_single",), lengths=(256,), samples=1)
    results = {r.method: r for r in evaluate(cfg, backend, tmp_path, progress=False)}
    d, lh = results[specs[0]], results[specs[1]]
    n = d.prompt_tokens
    assert d.kept_fraction == lh.kept_fraction == 1.0  # the cache keeps everything
    assert d.metadata["prefill_kept_fraction"] == pytest.approx(attended_fraction(n, 96, 16, 16))
    assert lh.metadata["prefill_kept_fraction"] == pytest.approx(longheads_fraction(n, 6, 16))
    assert 0 < d.metadata["prefill_kept_fraction"] < 1 and 0 < lh.metadata["prefill_kept_fraction"] < 1


def test_bench_methods_sweeps_both_chunk_methods():
    """`tca bench methods --methods peers` expands every peer's sweep, these two included."""
    from tca_attention.benchmarks import bench_methods

    args = bench_methods.parse_args(["--methods", "peers", "--out", "r.json"])
    assert [s for s in args.specs if s.split(":")[0] in ("dhsa", "longheads")] == \
        ["longheads:chunks=16", "longheads:chunks=64", "dhsa:budget=2048", "dhsa:budget=8192"]
    assert all(registry.normalize(s) == s for s in args.specs)
    assert {s.split(":")[0] for s in args.specs} == set(bench_methods.PEER_SWEEPS)
