"""Recycled Attention: dense prefill, a whole cache; a full decode step every `stride` steps (or when
the query turns away from the last full step's), in between the top-K tokens of the last full step's
attention plus every token added since.

Layer-level tests drive RaggedLayers by hand and check the reads against brute force; model-level
tests run tiny random models (reference executors).
"""
from __future__ import annotations

import pytest
import torch
from kernel_helpers import DEV  # noqa: F401  before the kernels: the interpreter without CUDA
from decode_peer_checks import (D, G, KV, assert_covering_budget_equals_dense, assert_layers_alone_equal_batched,
                                assert_model_alone_equals_batched, assert_static_equals_dynamic, decode_step,
                                padded, prefill_layer, read_slots)

from tca_attention import registry
from tca_attention.methods.recycled import RecycledAttention


def pattern(layer, q, r: int, budget: int) -> list[set[int]]:
    """Row r, per KV head: the budget real tokens of largest attention probability (softmax of
    q.k / sqrt(D) over the row's real tokens, summed over the group's query heads; float64)."""
    s, fill = int(layer.t_first[r]), layer.t_fill
    qs = q[r, :, 0].double().view(KV, G, D)
    out = []
    for h in range(KV):
        p = torch.softmax(qs[h] @ layer.t_keys[r, h, s:fill].double().T * D**-0.5, dim=-1).sum(0)
        out.append({s + i for i in sorted(range(fill - s), key=lambda i: -float(p[i]))[:budget]})
    return out


def new_step(layer, m, gen, q):
    B = q.shape[0]
    return decode_step([layer], m, *(torch.randn(B, KV, 1, D, generator=gen),) * 2, q)[0][0]


def test_full_every_stride_steps_and_the_recycled_pattern_in_between():
    gen = torch.Generator().manual_seed(1)
    m = RecycledAttention(budget=5, stride=3)
    lengths = [40, 26, 9]
    k, ks = padded(lengths, gen)
    layer = prefill_layer(k, torch.randn_like(k), ks, m)
    for t in range(7):
        q = torch.randn(3, KV * G, 1, D, generator=gen)
        sel = new_step(layer, m, gen, q)
        if t % 3 == 0:  # a full step: reads everything, records its pattern
            assert sel is None
            top, base = [pattern(layer, q, r, 5) for r in range(3)], layer.t_fill - 1
            continue
        assert sel.page_size == 1 and sel.pages.shape[-1] == 5 + 3
        for r in range(3):
            since = set(range(base, layer.t_fill))  # the full step's own token onwards
            assert read_slots(sel, layer, r) == [h | since for h in top[r]], (t, r)


def test_hand_built_pattern_is_recycled():
    """The full step's query attends to two known tokens per KV head; the next step, whose query
    points elsewhere, still reads those two (plus the tokens since)."""
    m = RecycledAttention(budget=2, stride=5)
    L = 12
    k = torch.zeros(1, KV, L, D)
    k[0, 0, 3, 0] = k[0, 0, 7, 0] = 8.0
    k[0, 1, 1, 1] = k[0, 1, 5, 1] = 8.0
    layer = prefill_layer(k, torch.randn_like(k), torch.zeros(1, dtype=torch.long), m)
    q = torch.zeros(1, KV * G, 1, D)
    q[0, :G, 0, 0] = q[0, G:, 0, 1] = 1.0
    zeros = torch.zeros(1, KV, 1, D)
    assert decode_step([layer], m, zeros, zeros, q)[0][0] is None  # full; position 12 added
    sel = decode_step([layer], m, zeros, zeros, -q)[0][0]
    assert read_slots(sel, layer, 0) == [{3, 7, 12, 13}, {1, 5, 12, 13}]


def test_dissimilar_queries_take_a_full_step_per_row():
    gen = torch.Generator().manual_seed(2)
    m = RecycledAttention(budget=4, stride=100, similarity=0.5)
    k, ks = padded([30, 30], gen)
    layer = prefill_layer(k, torch.randn_like(k), ks, m)
    q = torch.randn(2, KV * G, 1, D, generator=gen)
    assert new_step(layer, m, gen, q) is None
    top = [pattern(layer, q, r, 4) for r in range(2)]
    base = layer.t_fill - 1
    sel = new_step(layer, m, gen, q * 2)  # cosine 1: both recycle
    assert [read_slots(sel, layer, r) for r in range(2)] == [[h | {base, base + 1} for h in top[r]] for r in range(2)]
    q2 = q.clone()
    q2[1] = -q[1]  # row 1 turns around (cosine -1 < 0.5): a full step for row 1 only
    sel = new_step(layer, m, gen, q2)
    assert read_slots(sel, layer, 0) == [h | {base, base + 1, base + 2} for h in top[0]]
    assert read_slots(sel, layer, 1) == [set(range(layer.t_fill))] * KV
    top1, base1 = pattern(layer, q2, 1, 4), layer.t_fill - 1
    sel = new_step(layer, m, gen, q2)  # row 1 now recycles its new pattern, compared with its new query
    assert read_slots(sel, layer, 1) == [h | {base1, base1 + 1} for h in top1]
    assert new_step(layer, m, gen, -q2) is None  # both turn around: a full step, no selection at all


def test_a_row_reads_the_same_tokens_alone_and_in_a_padded_batch():
    base = {}

    def q_fn(t, gen, B):
        fresh = torch.randn(B, KV * G, 1, D, generator=gen)
        if t % 4 == 0 or "q" not in base:
            base["q"] = fresh
        return base["q"] + fresh * torch.tensor([0.0, 0.3, 3.0, 0.1])[:B, None, None, None]

    assert_layers_alone_equal_batched(lambda: RecycledAttention(budget=6, stride=4, similarity=0.6),
                                      [61, 40, 53, 5], 12, q_fn=q_fn)
    assert_layers_alone_equal_batched(lambda: RecycledAttention(budget=9, stride=3), [33, 47], 7)


def test_tiny_model_alone_equals_batched():
    assert_model_alone_equals_batched(RecycledAttention(budget=8, stride=3))


def test_a_budget_covering_the_cache_equals_dense_decoding():
    m = RecycledAttention(budget=128, stride=3)
    rec = assert_covering_budget_equals_dense(m)
    assert sum(sel is not None for _, sel in rec.log) > len(rec.log) // 2  # recycled steps ran
    assert m.report()["decode_kept_fraction"] == pytest.approx(1.0)


def test_report_is_the_mean_read_fraction():
    gen = torch.Generator().manual_seed(8)
    m = RecycledAttention(budget=3, stride=2)
    assert m.report() == {"decode_kept_fraction": None}
    k, ks = padded([20, 2], gen)
    layer = prefill_layer(k, k, ks, m)
    q = torch.randn(2, KV * G, 1, D, generator=gen)
    new_step(layer, m, gen, q)  # full: reads all (1)
    top = pattern(layer, q, 0, 3)
    new_step(layer, m, gen, torch.randn(2, KV * G, 1, D, generator=gen))
    # row 0 reads its pattern and slots 20, 21 of 22 tokens; row 1 (fewer tokens than K + 1) all of its 4
    read0 = sum(len(h | {20, 21}) for h in top) / KV
    assert 4 <= read0 <= 5
    assert m.report()["decode_kept_fraction"] == pytest.approx((1 + (read0 / 22 + 1) / 2) / 2)


@pytest.mark.parametrize("lengths", [(200,), (200, 157)], ids=["alone", "padded"])
@pytest.mark.parametrize("similarity", [0.0, 0.1])
def test_static_decode_equals_dynamic(lengths, similarity):
    """greedy_static (static steps, eager on the CPU) gives the dynamic path's tokens and read
    fractions: full steps every 4 steps (and, with similarity, when a row's query drifts), the
    recycled pattern in between, per row on the device."""
    assert_static_equals_dynamic(lambda: RecycledAttention(budget=24, stride=4, similarity=similarity), lengths)


def test_registry_density_and_bad_knobs():
    m = registry.create("recycled:budget=64,stride=5,similarity=0.8")
    assert isinstance(m, RecycledAttention) and (m.budget, m.stride, m.similarity) == (64, 5, 0.8)
    registry._check_params_match_fields()
    assert registry.density_param("recycled") == "budget"
    assert registry.at_density("recycled:stride=4", 0.2, 1000) == "recycled:budget=200,stride=4"
    assert registry.at_density("recycled", 0.0001, 100) == "recycled:budget=1"
    for spec, msg in (("recycled:budget=0", "budget"), ("recycled:stride=0", "stride"),
                      ("recycled:similarity=1.5", "similarity"), ("recycled:similarity=-0.1", "similarity")):
        with pytest.raises(ValueError, match=msg):
            registry.create(spec)
    from tca_attention.benchmarks import bench_methods
    from tca_attention.eval.methods import expand_method

    assert bench_methods.PEER_SWEEPS["recycled"] == "recycled:budget=2048|8192"
    [em] = expand_method("recycled@match=tca:tau=0.5")
    assert (em.spec, em.match) == ("recycled", "tca:tau=0.5")
