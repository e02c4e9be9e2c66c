"""FlexPrefill: last-query statistics against a brute force of the definition, the pattern choice on
hand-built heads (a diagonal head goes vertical-slash, a block-structured head query-aware), batch
invariance, gamma = 1 equals dense, and the registry and eval paths (small blocks: block 16)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tca_attention import registry
from tca_attention.methods import flexprefill as F
from tca_attention.methods.flexprefill import FlexPrefill, patterns
from method_checks import assert_alone_equals_batched, assert_full_density_equals_dense
from test_xattention import padded, plan_lists, prompts

BS = 16


# -- the statistics against a brute force --------------------------------------------------------
def brute_stats(q, k, key_start, scaling, bs):
    """Per (row, head) with at least bs real tokens: vertical (n,), slash (n,), estimate (nb,)."""
    B, H, L, D = q.shape
    g = H // k.shape[1]
    out = {}
    for b in range(B):
        s0 = int(key_start[b])
        n = L - s0
        if n < bs:
            continue
        nb = -(-n // bs)
        for h in range(H):
            qh, kh = q[b, h, s0:].double(), k[b, h // g, s0:].double()
            last = qh[n - bs:]
            logits = last @ kh.T * scaling  # (bs, n)
            pos = torch.arange(n - bs, n)[:, None]
            logits[torch.arange(n)[None, :] > pos] = float("-inf")
            p = torch.softmax(logits, -1)
            vertical = p.mean(0)
            slash = torch.zeros(n, dtype=torch.float64)
            for i in range(bs):
                for o in range(n - bs + i + 1):
                    slash[o] += p[i, n - bs + i - o] / bs
            kmean = torch.stack([kh[j * bs:(j + 1) * bs].mean(0) for j in range(nb)])
            est = torch.softmax(kmean @ last.mean(0) * scaling, 0)
            out[b, h] = vertical, slash, est
    return out


@pytest.mark.parametrize("lengths,H,KV", [((75, 60, 41), 4, 2), ((53,), 3, 3)])
def test_last_query_stats_match_brute_force(lengths, H, KV, monkeypatch):
    D = 8
    _, _, q, k, key_start = prompts(lengths, H, KV, D, seed=len(lengths), scale=2.0)
    L = q.shape[2]
    nq = -(-L // BS)
    want = brute_stats(q, k, key_start, D**-0.5, BS)
    monkeypatch.setattr(F, "_SCORE_ELEMENTS", 1)  # one KV head per chunk
    vert, slash, est = F.last_query_stats(q, k, key_start, D**-0.5, BS, nq)
    assert want
    for (b, h), (v, s, e) in want.items():
        n = len(v)
        torch.testing.assert_close(vert[b, h, :n].double(), v, rtol=1e-5, atol=1e-6)
        assert float(vert[b, h, n:].abs().sum()) == 0
        torch.testing.assert_close(slash[b, h, :n].double(), s, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(est[b, h, :len(e)].double(), e, rtol=1e-5, atol=1e-6)
        assert float(est[b, h, len(e):].abs().sum()) == 0
        assert float(v.sum()) == pytest.approx(1.0) and float(s.sum()) == pytest.approx(1.0)


def test_divergence_and_cover_count():
    p = torch.tensor([0.5, 0.5, 0.0])
    assert float(F.sqrt_js(p, p)) == 0.0
    assert float(F.sqrt_js(p, torch.tensor([0.0, 0.0, 1.0]))) == pytest.approx(math.sqrt(math.log(2)))
    x = torch.tensor([0.125, 0.5, 0.25, 0.125])  # sorted cumulative: 0.5, 0.75, 0.875, 1
    got = [F.cover_count(x, g).item() for g in (0.4, 0.5, 0.7, 0.8, 1.0)]
    assert got == [1, 2, 2, 3, 4]  # reaching gamma exactly takes one more (the paper's code), at most all


# -- hand-built heads ----------------------------------------------------------------------------
TARGET = [0, 0, 1, 2, 1, 3, 2, 4]  # query block i attends to key block TARGET[i] (<= i)


def hand_built(seed: int = 0):
    """Two heads, 8 blocks of 16, D 64, scaling 1. Head 0: every query attends only to itself (a
    diagonal). Head 1: keys of block j lie along u_j, queries of block i along u_TARGET[i]."""
    gen = torch.Generator().manual_seed(seed)
    L, D = 8 * BS, 64
    x = torch.randn(L, D, generator=gen, dtype=torch.float64)
    diag = 8 * x / x.norm(dim=-1, keepdim=True)  # self logit 64, others ~N(0, 8)
    u = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))[0].T  # orthonormal rows
    blk = torch.arange(L) // BS
    noise = lambda: 0.05 * torch.randn(L, D, generator=gen, dtype=torch.float64)  # noqa: E731
    kb = 4 * u[blk] + noise()
    qb = 4 * u[torch.tensor(TARGET)[blk]] + noise()
    q = torch.stack([diag, qb])[None]  # (1, 2, L, D)
    k = torch.stack([diag, kb])[None]
    return q, k


def test_diagonal_head_goes_vertical_slash_and_block_head_query_aware(monkeypatch):
    q, k = hand_built()
    ks = torch.zeros(1, dtype=torch.long)
    m = FlexPrefill(gamma=0.9, tau=0.1, min_budget=BS, block_size=BS)
    qaware, keep = patterns(m, q, k, ks, 1.0)
    assert qaware.tolist() == [[False, True]]
    for i in range(8):
        assert torch.nonzero(keep[0, 0, i]).flatten().tolist() == sorted({0, i}), i  # sink + diagonal
        assert torch.nonzero(keep[0, 1, i]).flatten().tolist() == sorted({0, TARGET[i], i}), i
    plan = m.plan(0, q, k, ks, 1.0)
    plan.validate(2, 2, q.shape[2])
    assert plan_lists(plan, 0, 1) == [sorted({0, TARGET[i], i}) for i in range(8)]
    for attr in ("_SCORE_ELEMENTS", "_LIST_ELEMENTS"):  # one head per chunk: the same plan
        monkeypatch.setattr(F, attr, 1)
    chunked = m.plan(0, q, k, ks, 1.0)
    assert torch.equal(chunked.indptr, plan.indptr) and torch.equal(chunked.indices, plan.indices)
    # tau = 0: no head is query-aware; the block head's target blocks are then lost (one vertical block)
    qa0, keep0 = patterns(FlexPrefill(gamma=0.9, tau=0.0, min_budget=BS, block_size=BS), q, k, ks, 1.0)
    assert not qa0.any() and not keep0[0, 1, 3, 2] and keep0[0, 1, 7, 4]  # block 4: the last queries' column
    # tau = 1 > sqrt(ln 2): every head is query-aware
    qa1, _ = patterns(FlexPrefill(gamma=0.9, tau=1.0, min_budget=BS, block_size=BS), q, k, ks, 1.0)
    assert qa1.all()


def test_budgets_grow_with_gamma_and_min_budget():
    _, _, q, k, key_start = prompts((160, 130), 4, 2, 8, seed=5, scale=3.0)
    fractions = []
    for gamma in (0.3, 0.6, 0.9, 1.0):
        plan = FlexPrefill(gamma=gamma, tau=0.0, min_budget=BS, block_size=BS).plan(0, q, k, key_start, 8**-0.5)
        fractions.append(float(plan.kept_fraction(q.shape[2]).mean()))
    assert fractions[0] < fractions[2] < fractions[3] == 1.0, fractions
    big = FlexPrefill(gamma=0.3, tau=0.0, min_budget=4 * BS, block_size=BS).plan(0, q, k, key_start, 8**-0.5)
    assert float(big.kept_fraction(q.shape[2]).mean()) > fractions[0]


def test_plan_alone_equals_plan_in_padded_batch():
    lengths = (150, 97, 40, 30)  # 30: 2 blocks, dense alone (no plan) and all blocks in the batch
    H, KV, D = 4, 2, 8
    qs, ks, q, k, key_start = prompts(lengths, H, KV, D, seed=11, scale=3.0)
    method = FlexPrefill(gamma=0.7, tau=0.3, min_budget=BS, block_size=BS)
    batched = method.plan(0, q, k, key_start, D**-0.5)
    kinds = patterns(method, q, k, key_start, D**-0.5)[0][:2]
    assert kinds.any() and not kinds.all(), kinds  # both patterns appear
    sparse = 0
    for r, n in enumerate(lengths):
        nq = -(-n // BS)
        for pad_flag in (False, True):
            alone = method.plan(0, qs[r][None], ks[r][None], torch.zeros(1, dtype=torch.long), D**-0.5,
                                padded=pad_flag)
            for h in range(H):
                got = plan_lists(batched, r, h)[:nq]
                want = [list(range(i + 1)) for i in range(nq)] if alone is None else plan_lists(alone, 0, h)
                assert got == want, (r, h)
            if alone is not None:
                sparse += 1
                torch.testing.assert_close(batched.kept_fraction(q.shape[2])[r], alone.kept_fraction(n)[0])
    assert sparse == 6 and float(batched.kept_fraction(q.shape[2])[:2].mean()) < 1


def test_short_prompts_and_bad_settings():
    q, k = torch.randn(1, 2, 2 * BS, 8), torch.randn(1, 2, 2 * BS, 8)
    zero = torch.zeros(1, dtype=torch.long)
    assert FlexPrefill(block_size=BS, min_budget=1).plan(0, q, k, zero, 1.0) is None
    q, k = torch.randn(1, 2, 5 * BS, 8), torch.randn(1, 2, 5 * BS, 8)
    assert FlexPrefill(block_size=BS, min_budget=5 * BS).plan(0, q, k, zero, 1.0) is None  # min budget: all
    assert FlexPrefill(block_size=BS, min_budget=4 * BS).plan(0, q, k, zero, 1.0) is not None
    for bad in ({"gamma": 0.0}, {"gamma": 1.5}, {"tau": -0.1}, {"min_budget": 0}, {"block_size": 24}):
        with pytest.raises(ValueError):
            FlexPrefill(**bad)
    m = FlexPrefill()
    assert (m.gamma, m.tau, m.min_budget, m.block_size, m.name) == (0.9, 0.1, 512, 128, "flexprefill")
    assert m.decode_keep(0, 3).tolist() == [128] * 3 and m.select_decode(0, None, None) is None


def test_plan_runs_on_the_triton_kernel():
    from kernel_helpers import DEV  # sets up the interpreter without CUDA
    from tca_attention.engine import dispatch

    H, KV, D = 4, 2, 16
    _, _, q, k, key_start = prompts((75, 52), H, KV, D, seed=9, scale=2.0)
    v = torch.randn(k.shape, dtype=torch.float64)
    q, k, v, key_start = (t.to(DEV, torch.float32) if t.is_floating_point() else t.to(DEV) for t in (q, k, v, key_start))
    plan = FlexPrefill(gamma=0.5, tau=0.1, min_budget=BS, block_size=BS).plan(0, q, k, key_start, D**-0.5)
    assert float(plan.kept_fraction(q.shape[2]).mean()) < 1
    tri = dispatch.prefill(q, k, v, plan, D**-0.5, backend="triton")
    ref = dispatch.prefill(q, k, v, plan, D**-0.5, backend="reference")
    assert float((tri - ref).abs().max()) <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_full_gamma_equals_dense(arch):
    assert_full_density_equals_dense(arch, FlexPrefill(gamma=1.0, min_budget=BS, block_size=BS))


def test_sparse_model_run_alone_equals_batched():
    assert_alone_equals_batched(FlexPrefill(gamma=0.5, tau=0.1, min_budget=BS, block_size=BS), new_tokens=5)


# -- registry, eval ------------------------------------------------------------------------------
def test_registry_builds_it():
    m = registry.create("flexprefill:gamma=0.95")
    assert isinstance(m, FlexPrefill) and m == FlexPrefill(gamma=0.95)
    assert registry.normalize("flexprefill: block_size=16,gamma=0.50, tau=0.2,min_budget=32") == \
        "flexprefill:gamma=0.5,tau=0.2,min_budget=32,block_size=16"
    assert registry.expand("flexprefill:gamma=0.5|0.9") == ["flexprefill:gamma=0.5", "flexprefill:gamma=0.9"]
    with pytest.raises(ValueError, match="declares no density knob"):
        registry.at_density("flexprefill", 0.5, 1000)
    assert "flexprefill" in registry.describe()


def test_eval_sweeps_gamma(tmp_path: Path, smol_tokenizer, monkeypatch):
    from tca_attention.eval.methods import ModelBackend
    from tca_attention.eval.runner import EvalConfig, evaluate
    from test_eval_pipeline import tiny_llama

    monkeypatch.setenv("TCA_CACHE_DIR", str(tmp_path / "cache"))
    backend = ModelBackend("tiny-llama", device="cpu", model=tiny_llama(len(smol_tokenizer)), tokenizer=smol_tokenizer)
    sweep = "flexprefill:gamma=0.3|0.9,tau=0,min_budget=16,block_size=16"
    cfg = EvalConfig(model="tiny-llama", methods=("full", sweep), tasks=("niah_single",), lengths=(512,), samples=1)
    results = evaluate(cfg, backend, tmp_path, progress=False)
    by = {r.method: r for r in results}
    assert len(results) == 3
    lo, hi = (by[f"flexprefill:gamma={g},tau=0.0,min_budget=16,block_size=16"] for g in (0.3, 0.9))
    assert lo.kept_fraction == hi.kept_fraction == 1.0 and lo.kv_bytes == lo.dense_kv_bytes  # cache: all
    a, b = lo.metadata["prefill_kept_fraction"], hi.metadata["prefill_kept_fraction"]
    assert 0 < a < b <= 1, (a, b)
