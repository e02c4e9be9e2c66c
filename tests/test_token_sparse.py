"""Token Sparse Attention: the subset executor (reference, gather + SDPA, brute force), the paper's
selection against a brute force of its definition, hand-built selections, tokens left out get zero
attention output, keep = 1 equals dense on tiny models, alone equals batched, knobs and registry."""
from __future__ import annotations

import math
import types

import pytest
import torch

from tca_attention import registry
from tca_attention.engine import dispatch, subset
from tca_attention.engine.plan import SubsetPlan, pack_mask
from tca_attention.engine.reference import dense_causal_ref
from tca_attention.methods.token_sparse import TokenSparse
from method_checks import assert_alone_equals_batched, assert_full_density_equals_dense


def depth(n: int):
    """A stand-in model of n layers for check_model (the methods read only the depth)."""
    return types.SimpleNamespace(config=types.SimpleNamespace(num_hidden_layers=n))


def bound(m: TokenSparse, n_layers: int = 2) -> TokenSparse:
    m.check_model(depth(n_layers))
    return m


def rand(B, H, KV, L, D, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, L, D, generator=g, dtype=dtype), torch.randn(B, KV, L, D, generator=g, dtype=dtype),
            torch.randn(B, KV, L, D, generator=g, dtype=dtype))


# -- the executor ----------------------------------------------------------------------------------
def brute_subset(q, k, v, plan, scaling):
    """Each listed query attends, in fp64, to the listed keys at or before it; the rest output 0."""
    B, H, L, D = q.shape
    Hp, KV = plan.idx.shape[1], k.shape[1]
    out = torch.zeros(B, L, H, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            ph = h // (H // Hp)
            s = plan.idx[b, ph, : int(plan.length[b, ph])].tolist()
            kv = h // (H // KV)
            for t in s:
                keys = [u for u in s if u <= t]
                logits = torch.stack([q[b, h, t].double() @ k[b, kv, u].double() for u in keys]) * scaling
                out[b, t, h] = torch.softmax(logits, 0) @ v[b, kv, keys].double()
    return out


@pytest.mark.parametrize("per_query_head", [True, False])
def test_subset_executors_match_brute_force(per_query_head):
    B, H, KV, L, D = 3, 6, 2, 37, 8
    q, k, v = rand(B, H, KV, L, D)
    ks = torch.tensor([0, 4, 19])
    g = torch.Generator().manual_seed(3)
    Hp = H if per_query_head else KV
    mask = (torch.rand(B, Hp, L, generator=g) < 0.45) & (torch.arange(L)[None, None] >= ks[:, None, None])
    mask[2, 0] = False  # an empty subset: that head outputs zeros everywhere
    plan = SubsetPlan(*pack_mask(mask), ks)
    plan.validate(H, KV, L)
    want = brute_subset(q, k, v, plan, 0.35)
    for got in (subset.subset_prefill_ref(q, k, v, plan, 0.35), subset.subset_prefill_gather(q, k, v, plan, 0.35),
                dispatch.prefill(q, k, v, plan, 0.35, backend="reference"), dispatch.prefill(q, k, v, plan, 0.35)):
        assert got.shape == (B, L, H, D)
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)
    # a query head's tokens outside its subset output exactly zero
    heads = torch.arange(H) // (H // Hp)
    outside = ~mask[:, heads].transpose(1, 2)  # (B, L, H)
    assert float(subset.subset_prefill_gather(q, k, v, plan, 0.35)[outside].abs().max()) == 0


def test_full_subset_is_dense_and_kept_fraction():
    B, H, KV, L, D = 2, 4, 2, 29, 8
    q, k, v = rand(B, H, KV, L, D, seed=1)
    ks = torch.tensor([0, 6])
    mask = (torch.arange(L)[None, None] >= ks[:, None, None]).expand(B, KV, L)
    plan = SubsetPlan(*pack_mask(mask), ks)
    got, ref = subset.subset_prefill_gather(q, k, v, plan, 0.3), dense_causal_ref(q, k, v, 0.3, ks)
    torch.testing.assert_close(got[0], ref[0], atol=2e-6, rtol=1e-5)  # the oracle computes in fp32
    torch.testing.assert_close(got[1, 6:], ref[1, 6:], atol=2e-6, rtol=1e-5)
    assert torch.all(plan.kept_fraction(L) == 1)
    half = SubsetPlan(*pack_mask(mask & (torch.arange(L) >= L - 10)), ks)  # 10 of n tokens
    n = torch.tensor([29.0, 23.0], dtype=torch.float64)[:, None]
    torch.testing.assert_close(half.kept_fraction(L), (10 * 11 / 2) / (n * (n + 1) / 2) * torch.ones(2, KV, dtype=torch.float64))


def test_subset_plan_validation():
    ks = torch.tensor([2])
    good = SubsetPlan(torch.tensor([[[2, 5, 9]]]), torch.tensor([[3]], dtype=torch.int32), ks)
    good.validate(2, 1, 10)
    with pytest.raises(ValueError, match="real tokens"):
        SubsetPlan(torch.tensor([[[1, 5, 9]]]), torch.tensor([[3]], dtype=torch.int32), ks).validate(2, 1, 10)
    with pytest.raises(ValueError, match="strictly ascending"):
        SubsetPlan(torch.tensor([[[5, 5, 9]]]), torch.tensor([[3]], dtype=torch.int32), ks).validate(2, 1, 10)
    with pytest.raises(ValueError, match="must hold L"):
        SubsetPlan(torch.tensor([[[2, 5, 9]]]), torch.tensor([[2]], dtype=torch.int32), ks).validate(2, 1, 10)
    with pytest.raises(ValueError, match="Hp in"):
        SubsetPlan(torch.tensor([[[2], [3], [4]]]), torch.tensor([[1, 1, 1]], dtype=torch.int32), ks).validate(2, 1, 10)


# -- the selection ---------------------------------------------------------------------------------
def brute_select(m: TokenSparse, q, k, ks, scaling) -> torch.Tensor:
    """The paper's selection, one row and head at a time, with plain loops over the definition."""
    B, H, L, D = q.shape
    g = H // k.shape[1]
    W, out = m.recent, torch.zeros(B, H, L, dtype=torch.bool)
    for b in range(B):
        s0 = int(ks[b])
        n = L - s0
        if n <= m.min_tokens + W:
            out[b, :, s0:] = True
            continue
        P = n - W  # prefix keys s0 .. s0 + P - 1
        pooled = torch.zeros(H, P, dtype=torch.float64)
        for h in range(H):
            mean = torch.zeros(P, dtype=torch.float64)
            for t in range(L - W, L):
                logits = torch.stack([q[b, h, t] @ k[b, h // g, u] for u in range(s0, t + 1)]) * scaling
                mean += torch.softmax(logits.double(), 0)[:P] / W
            r = m.kernel // 2
            pooled[h] = torch.stack([sum(mean[j] for j in range(i - r, i + r + 1) if 0 <= j < P) / m.kernel
                                     for i in range(P)])
        if m.keep > 0:
            count = math.ceil(m.keep * P)
        else:
            glob = pooled.mean(0)
            glob = glob / glob.sum()
            acc, dropped = 0.0, 0
            for x in sorted(glob.tolist()):
                acc += x
                if acc < m.coverage:
                    dropped += 1
            count = P if dropped == 0 else P - dropped - 1
        count = min(max(count, m.min_tokens), P)
        for h in range(H):
            top = sorted(range(P), key=lambda i: (-float(pooled[h, i]), i))[:count]
            out[b, h, [s0 + i for i in top]] = True
            out[b, h, L - W:] = True
    return out


@pytest.mark.parametrize("knobs", [dict(coverage=0.2), dict(coverage=0.05, kernel=1), dict(keep=0.3, kernel=3)])
def test_selection_matches_the_definition(knobs):
    m = bound(TokenSparse(min_tokens=4, recent=6, start=0.0, **knobs))
    B, H, KV, L, D = 3, 4, 2, 41, 8
    q, k, _ = rand(B, H, KV, L, D, seed=5)
    q = q * 2
    ks = torch.tensor([0, 9, 33])  # the last row is short: dense
    got = m.select(q.float(), k.float(), ks, 0.4)
    want = brute_select(m, q, k, ks, 0.4)
    assert torch.equal(got, want)
    plan = m.plan(1, q.float(), k.float(), ks, 0.4)
    assert isinstance(plan, SubsetPlan) and torch.equal(plan.idx, pack_mask(want)[0])
    assert bool((plan.length[0] < L).all()) and bool((plan.length[2] == L - 33).all())


def test_hand_built_selection_per_query_head():
    """Query head 0 looks for direction e0 (carried by key 5), head 1 for e1 (key 17): with one token
    kept besides the recent ones, each head keeps its own; tokens left out output zero."""
    L, D, W = 40, 8, 4
    e = torch.eye(D)
    k = torch.randn(1, 1, L, D) * 0.01
    k[0, 0, 5], k[0, 0, 17] = 10 * e[0], 10 * e[1]
    q = torch.zeros(1, 2, L, D)
    q[0, 0, :], q[0, 1, :] = e[0], e[1]
    m = bound(TokenSparse(keep=0.001, min_tokens=1, recent=W, kernel=1, start=0.0))
    plan = m.plan(0, q, k, torch.zeros(1, dtype=torch.long), 1.0, padded=False)
    recent = list(range(L - W, L))
    assert plan.idx[0, 0, : int(plan.length[0, 0])].tolist() == [5] + recent
    assert plan.idx[0, 1, : int(plan.length[0, 1])].tolist() == [17] + recent
    v = torch.randn(1, 1, L, D)
    out = dispatch.prefill(q, k, v, plan, 1.0)  # (1, L, 2, D)
    for h, token in ((0, 5), (1, 17)):
        left_out = [t for t in range(L - W) if t != token]
        assert float(out[0, left_out, h].abs().max()) == 0 and float(out[0, token, h].abs().max()) > 0
    assert float(out[0, L - 1, 0].sub(v[0, 0, 5]).abs().max()) < 1e-3  # the last query reads key 5's value
    # coverage: nearly all the mass is on the two keys, so a coverage of 0.5 drops everything else
    cov = bound(TokenSparse(coverage=0.5, min_tokens=1, recent=W, kernel=1, start=0.0))
    sel = cov.select(q, k, torch.zeros(1, dtype=torch.long), 1.0)
    assert sel[0, 0].nonzero().flatten().tolist() == [5] + recent


def test_dense_layers_short_prompts_and_depth():
    q, k, _ = rand(1, 2, 1, 30, 8, dtype=torch.float32)
    ks = torch.zeros(1, dtype=torch.long)
    m = bound(TokenSparse(keep=0.5, min_tokens=4, recent=4), n_layers=4)  # start 0.5: layers 2, 3 sparse
    assert m.plan(1, q, k, ks, 0.3) is None and isinstance(m.plan(2, q, k, ks, 0.3), SubsetPlan)
    assert bound(TokenSparse(keep=0.5, min_tokens=26, recent=4), 4).plan(3, q, k, ks, 0.3) is None  # L <= 26 + 4
    assert bound(TokenSparse(coverage=0.0, min_tokens=4, recent=4), 4).plan(3, q, k, ks, 0.3) is None  # tau = 0
    with pytest.raises(RuntimeError, match="check_model"):
        TokenSparse().plan(3, q, k, ks, 0.3)


@pytest.mark.parametrize("bad, match", [
    (dict(coverage=1.0), "coverage"), (dict(coverage=-0.1), "coverage"), (dict(keep=1.5), "keep"),
    (dict(min_tokens=-1), "min_tokens"), (dict(recent=0), "recent"), (dict(kernel=4), "odd kernel"),
    (dict(start=2.0), "start"),
])
def test_bad_knobs_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        TokenSparse(**bad)


# -- model path ------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_keep_all_equals_dense(arch):
    assert_full_density_equals_dense(arch, TokenSparse(keep=1.0, min_tokens=0, recent=8, start=0.0))


def test_alone_equals_batched():
    assert_alone_equals_batched(TokenSparse(keep=0.4, min_tokens=8, recent=16, kernel=3, start=0.0))


def test_registry_builds_it():
    m = registry.create("token-sparse:coverage=0.01,min_tokens=64")
    assert isinstance(m, TokenSparse) and m == TokenSparse(coverage=0.01, min_tokens=64)
    assert registry.normalize("token-sparse:start=0.5, keep=0.3") == "token-sparse:keep=0.3,start=0.5"
    with pytest.raises(ValueError, match="declares no density knob"):
        registry.at_density("token-sparse", 0.5, 1000)
    with pytest.raises(ValueError, match="coverage"):
        registry.create("token-sparse:coverage=2")
