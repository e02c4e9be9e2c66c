"""TokenSelect: dense prefill, a whole cache, and per decode step sinks + local + the middle tokens of
largest soft vote per KV head, with a selection cache reused while the queries stay similar.

Layer-level tests drive RaggedLayers by hand and check the selection against brute force; model-level
tests run tiny random models (reference executors; one layer through the Triton kernel).
"""
from __future__ import annotations

import pytest
import torch
from kernel_helpers import DEV  # noqa: F401  before the kernels: the interpreter without CUDA
from decode_peer_checks import (D, G, KV, assert_covering_budget_equals_dense, assert_layers_alone_equal_batched,
                                assert_model_alone_equals_batched, assert_static_equals_dynamic,
                                assert_triton_equals_reference, decode_step, padded, prefill_layer, read_slots)

from tca_attention import registry
from tca_attention.methods.tokenselect import TokenSelect, budget_for


def brute_force(layer, q, r: int, m: TokenSelect) -> list[set[int]]:
    """Row r, per KV head: its first sinks and last local real tokens, plus the budget middle tokens of
    largest sum over the voting heads of softmax(q.k) over the middle (float64)."""
    s, fill = int(layer.t_first[r]), layer.t_fill
    n = fill - s
    sink = set(range(s, s + min(m.sinks, n)))
    local = set(range(max(s, fill - m.local), fill))
    middle = [j for j in range(s, fill) if j not in sink and j not in local]
    keys = layer.t_keys[r, :, middle].double()  # (KV, M, D)
    qs = q[r, :, 0].double().view(KV, G, D)
    votes = torch.softmax(torch.einsum("kgd,kmd->kgm", qs, keys), dim=-1).sum(1)  # (KV, M)
    if m.vote == "all":
        votes = votes.sum(0, keepdim=True).expand(KV, -1)
    out = []
    for h in range(KV):
        top = sorted(range(len(middle)), key=lambda i: -float(votes[h, i]))[: m.budget]
        out.append(sink | local | {middle[i] for i in top})
    return out


@pytest.mark.parametrize("vote", ["kv", "all"])
def test_selection_is_the_soft_vote_of_each_row(vote):
    gen = torch.Generator().manual_seed(1)
    m = TokenSelect(budget=6, sinks=3, local=5, threshold=2.0, vote=vote)  # threshold > 1: no reuse
    lengths = [60, 41, 9]  # the last row (at most 13 tokens) fits sinks + budget + local: it reads everything
    k, key_start = padded(lengths, gen)
    layer = prefill_layer(k, torch.randn_like(k), key_start, m)
    for _ in range(4):
        kn, q = torch.randn(3, KV, 1, D, generator=gen), torch.randn(3, KV * G, 1, D, generator=gen)
        [sel], _ = decode_step([layer], m, kn, kn, q)
        assert sel.page_size == 1 and sel.pages.shape[-1] == 3 + 6 + 5
        for r in range(3):
            assert read_slots(sel, layer, r) == brute_force(layer, q, r, m), r
        assert read_slots(sel, layer, 2) == [set(range(int(key_start[2]), layer.t_fill))] * KV
        if vote == "all":  # one set per layer
            assert read_slots(sel, layer, 0)[0] == read_slots(sel, layer, 0)[1]


def test_hand_built_votes_pick_the_aligned_tokens():
    """Keys orthogonal to the query except at two middle positions: those two are read."""
    m = TokenSelect(budget=2, sinks=1, local=2, threshold=2.0)
    L = 20
    k = torch.zeros(1, KV, L, D)
    k[0, 0, 7, 0] = k[0, 0, 12, 0] = 5.0  # KV head 0: positions 7 and 12 align with the query
    k[0, 1, 3, 1] = k[0, 1, 9, 1] = 5.0  # KV head 1: positions 3 and 9
    k[0, 1, 15, 1] = 1.0  # a weaker one that loses
    layer = prefill_layer(k, torch.randn_like(k), torch.zeros(1, dtype=torch.long), m)
    q = torch.zeros(1, KV * G, 1, D)
    q[0, :G, 0, 0] = 1.0
    q[0, G:, 0, 1] = 1.0
    [sel], _ = decode_step([layer], m, torch.zeros(1, KV, 1, D), torch.zeros(1, KV, 1, D), q)
    assert read_slots(sel, layer, 0) == [{0, 7, 12, 19, 20}, {0, 3, 9, 19, 20}]


def test_the_selection_cache_is_reused_while_queries_stay_similar():
    gen = torch.Generator().manual_seed(2)
    m = TokenSelect(budget=4, sinks=2, local=3, threshold=0.9)
    k, key_start = padded([50, 50], gen)
    layer = prefill_layer(k, torch.randn_like(k), key_start, m)
    q = torch.randn(2, KV * G, 1, D, generator=gen)
    step = lambda q: decode_step([layer], m, *(torch.randn(2, KV, 1, D, generator=gen),) * 2, q)[0][0]  # noqa: E731
    first = step(q)
    middle = lambda sel, r: [h - set(range(2)) - set(range(layer.t_fill - 3, layer.t_fill)) for h in read_slots(sel, layer, r)]  # noqa: E731
    before = [middle(first, r) for r in range(2)]
    # the same direction: cosine 1 >= 0.9, both rows reuse (new keys could not change it)
    second = step(q * 3)
    assert [middle(second, r) for r in range(2)] == before
    assert m.report()["selection_reuse"] == 1.0
    # row 0 keeps its direction, row 1 turns away: row 0 reuses, row 1 votes afresh
    q2 = q.clone()
    q2[1] = torch.randn(KV * G, 1, D, generator=gen)
    third = step(q2)
    assert middle(third, 0) == before[0]
    assert read_slots(third, layer, 1) == brute_force(layer, q2, 1, m)
    assert m.report()["selection_reuse"] == pytest.approx(3 / 4)  # (row, step)s: 2 of 2, then 1 of 2
    # no reuse above a threshold of 1
    m2 = TokenSelect(budget=4, sinks=2, local=3, threshold=1.5)
    layer2 = prefill_layer(k, torch.randn_like(k), key_start, m2)
    for _ in range(2):
        [sel], _ = decode_step([layer2], m2, *(torch.randn(2, KV, 1, D, generator=gen),) * 2, q)
        assert read_slots(sel, layer2, 0) == brute_force(layer2, q, 0, m2)
    assert m2.report()["selection_reuse"] == 0.0


def test_a_row_reads_the_same_tokens_alone_and_in_a_padded_batch():
    """Queries that stay similar for some steps and rows (the selection cache in play) and turn away
    in others."""
    base = {}

    def q_fn(t, gen, B):
        fresh = torch.randn(B, KV * G, 1, D, generator=gen)
        if t % 3 == 0 or "q" not in base:
            base["q"] = fresh
        return base["q"] + 0.05 * fresh * torch.tensor([0.0, 1.0, 20.0, 0.5])[:B, None, None, None]

    assert_layers_alone_equal_batched(lambda: TokenSelect(budget=8, sinks=3, local=6, threshold=0.9),
                                      [61, 40, 53, 12], 12, q_fn=q_fn)
    assert_layers_alone_equal_batched(lambda: TokenSelect(budget=5, sinks=0, local=1, vote="all"), [33, 47], 6)


def test_tiny_model_alone_equals_batched():
    assert_model_alone_equals_batched(TokenSelect(budget=8, sinks=4, local=8))


def test_a_budget_covering_the_cache_equals_dense_decoding():
    """Without reuse (a reused selection does not list the tokens that left the local window since it
    was made, as in the paper's implementation, so it is not exact even with a covering budget)."""
    m = TokenSelect(budget=128, sinks=4, local=8, threshold=2.0)
    rec = assert_covering_budget_equals_dense(m)
    assert all(sel is not None and sel.page_size == 1 for _, sel in rec.log)
    assert m.report()["decode_kept_fraction"] == pytest.approx(1.0)


def test_one_layer_through_the_triton_kernel():
    assert_triton_equals_reference(TokenSelect(budget=6, sinks=2, local=4))


def test_report_is_the_mean_read_fraction():
    gen = torch.Generator().manual_seed(8)
    m = TokenSelect(budget=3, sinks=1, local=2, threshold=2.0)
    assert m.report() == {"decode_kept_fraction": None, "selection_reuse": None}
    k, key_start = padded([20, 5], gen)
    layer = prefill_layer(k, k, key_start, m)
    decode_step([layer], m, *(torch.randn(2, KV, 1, D, generator=gen),) * 2, torch.randn(2, KV * G, 1, D, generator=gen))
    # 21 tokens: row 0 reads 1 + 3 + 2 of 21, row 1 all of its 6
    assert m.report()["decode_kept_fraction"] == pytest.approx((6 / 21 + 1) / 2)


@pytest.mark.parametrize("lengths", [(200,), (200, 157)], ids=["alone", "padded"])
@pytest.mark.parametrize("vote,threshold", [("kv", 0.1), ("all", 2.0)])
def test_static_decode_equals_dynamic(lengths, vote, threshold):
    """greedy_static (static steps, eager on the CPU) gives the dynamic path's tokens, read fractions
    and selection reuse (a low threshold: rows reuse their cached selection on some steps)."""
    make = lambda: TokenSelect(budget=24, sinks=4, local=16, threshold=threshold, vote=vote)  # noqa: E731
    dynamic, static = assert_static_equals_dynamic(make, lengths)
    assert static["selection_reuse"] == dynamic["selection_reuse"]
    assert static["selection_reuse"] > 0 if threshold < 1 else static["selection_reuse"] == 0


def test_registry_density_and_bad_knobs():
    m = registry.create("tokenselect:budget=64,sinks=4,local=16,threshold=0.8,vote=all")
    assert isinstance(m, TokenSelect) and (m.budget, m.sinks, m.local, m.threshold, m.vote) == (64, 4, 16, 0.8, "all")
    assert registry.normalize("tokenselect:vote=kv, budget=8") == "tokenselect:budget=8,vote=kv"
    registry._check_params_match_fields()
    assert registry.density_param("tokenselect") == "budget"
    assert registry.at_density("tokenselect", 0.25, 10000) == "tokenselect:budget=1860"  # 2500 - 128 - 512
    assert registry.at_density("tokenselect:sinks=0,local=100", 0.001, 1000) == "tokenselect:budget=1,sinks=0,local=100"
    assert budget_for(0.5, 4000, {"sinks": 10, "local": 10}) == 1980
    for spec, msg in (("tokenselect:budget=0", "budget"), ("tokenselect:sinks=-1", "sinks"),
                      ("tokenselect:local=0", "local"), ("tokenselect:threshold=-2", "threshold"),
                      ("tokenselect:threshold=inf", "threshold"), ("tokenselect:vote=max", "vote")):
        with pytest.raises(ValueError, match=msg):
            registry.create(spec)
    from tca_attention.benchmarks import bench_methods
    from tca_attention.eval.methods import expand_method

    assert bench_methods.PEER_SWEEPS["tokenselect"] == "tokenselect:budget=2048|8192"
    [em] = expand_method("tokenselect@match=tca:tau=0.5")
    assert (em.spec, em.match) == ("tokenselect", "tca:tau=0.5")
