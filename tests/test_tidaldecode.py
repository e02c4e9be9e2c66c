"""TidalDecode: dense prefill, a whole cache; per decode step the token-selection layer (and the
re-selection layer) attends fully and picks the top-k tokens that the later layers read.

Layer-level tests drive a stack of RaggedLayers by hand (each with its own keys) and check every
layer's reads against brute force; model-level tests run tiny random models (reference executors).
"""
from __future__ import annotations

import pytest
import torch
from kernel_helpers import DEV  # noqa: F401  before the kernels: the interpreter without CUDA
from decode_peer_checks import (D, G, KV, assert_covering_budget_equals_dense, assert_layers_alone_equal_batched,
                                assert_model_alone_equals_batched, assert_static_equals_dynamic, padded,
                                prefill_layer, read_slots)

from tca_attention import registry
from tca_attention.methods.tidaldecode import TidalDecode


def stack(lengths: list[int], n_layers: int, m: TidalDecode, gen: torch.Generator):
    """n_layers layers, each prefilled with its own left-padded random keys. -> (layers, key_start)."""
    layers, ks = [], None
    for i in range(n_layers):
        k, ks = padded(lengths, gen)
        layers.append(prefill_layer(k, torch.randn_like(k), ks, m, i))
    return layers, ks


def step(layers, m: TidalDecode, gen: torch.Generator, q=None):
    """One decode step, every layer its own new key and query. -> (queries, selections)."""
    B = layers[0].t_keys.shape[0]
    qs, sels = [], []
    for i, layer in enumerate(layers):
        kn = torch.randn(B, KV, 1, D, generator=gen)
        qi = torch.randn(B, KV * G, 1, D, generator=gen) if q is None else q
        layer.update(kn, kn)
        sel = m.select_decode(i, qi, layer)
        layer.attend(qi, D**-0.5, sel)
        qs.append(qi)
        sels.append(sel)
    return qs, sels


def brute_force(layer, q, r: int, budget: int) -> list[set[int]]:
    """Row r, per KV head: the current token and the budget - 1 earlier real tokens of largest q.k,
    maximised over the group's query heads (float64)."""
    s, fill = int(layer.t_first[r]), layer.t_fill
    qs = q[r, :, 0].double().view(KV, G, D)
    out = []
    for h in range(KV):
        score = (qs[h] @ layer.t_keys[r, h, s:fill - 1].double().T).amax(0)  # (n - 1,)
        top = sorted(range(fill - 1 - s), key=lambda i: -float(score[i]))[: budget - 1]
        out.append({s + i for i in top} | {fill - 1})
    return out


def test_later_layers_read_what_the_selection_layers_chose():
    """Layers 0 (dense), 1 (selection), 2-3 (sparse), 4 (re-selection), 5 (sparse)."""
    gen = torch.Generator().manual_seed(1)
    m = TidalDecode(budget=7, select_layer=1, reselect_layer=4)
    lengths = [50, 31, 4]  # the last row's whole cache (at most 7 tokens) fits the budget
    layers, ks = stack(lengths, 6, m, gen)
    for _ in range(3):
        qs, sels = step(layers, m, gen)
        assert sels[0] is None and sels[1] is None and sels[4] is None  # dense, selection, re-selection
        for r in range(3):
            want = brute_force(layers[1], qs[1], r, 7)
            assert read_slots(sels[2], layers[2], r) == want == read_slots(sels[3], layers[3], r), r
            assert read_slots(sels[5], layers[5], r) == brute_force(layers[4], qs[4], r, 7), r
            if r == 2:
                assert want == [set(range(int(ks[2]), layers[1].t_fill))] * KV
        assert sels[2].pages.shape[-1] == 7 and sels[2].page_size == 1


def test_hand_built_selection_is_position_persistent():
    """The selection layer's keys align with its query at known positions; the next layer, whose own
    keys would pick others, reads exactly those positions."""
    m = TidalDecode(budget=3, select_layer=0, reselect_layer=-1)
    L = 16
    k0, k1 = torch.zeros(1, KV, L, D), torch.zeros(1, KV, L, D)
    k0[0, 0, 4, 0] = k0[0, 0, 11, 0] = 3.0
    k0[0, 1, 2, 0] = k0[0, 1, 8, 0] = -3.0  # KV head 1's group queries point the other way
    k1[0, :, 13, 0] = 9.0  # what layer 1 would choose itself
    zero = torch.zeros(1, dtype=torch.long)
    layers = [prefill_layer(k0, torch.randn_like(k0), zero, m, 0), prefill_layer(k1, torch.randn_like(k1), zero, m, 1)]
    q = torch.zeros(1, KV * G, 1, D)
    q[0, :G, 0, 0], q[0, G:, 0, 0] = 1.0, -1.0
    sels = []
    for i, layer in enumerate(layers):
        layer.update(torch.zeros(1, KV, 1, D), torch.zeros(1, KV, 1, D))
        sels.append(m.select_decode(i, q, layer))
    assert sels[0] is None
    assert read_slots(sels[1], layers[1], 0) == [{4, 11, 16}, {2, 8, 16}]


def test_the_first_full_layer_without_a_selection_of_this_step_selects():
    """A hybrid model whose select_layer (1) and reselect_layer (3) are sliding-window layers (never
    called): full layer 2 selects, full layer 4 re-selects, layers 5 and 6 read layer 4's choice."""
    gen = torch.Generator().manual_seed(2)
    m = TidalDecode(budget=4, select_layer=1, reselect_layer=3)
    full = [0, 2, 4, 5, 6]
    layers, _ = stack([30, 22], len(full), m, gen)
    for _ in range(2):
        sels, qs = [], []
        for i, layer in zip(full, layers):
            q = torch.randn(2, KV * G, 1, D, generator=gen)
            layer.update(*(torch.randn(2, KV, 1, D, generator=gen),) * 2)
            sels.append(m.select_decode(i, q, layer))
            qs.append(q)
        assert sels[:3] == [None] * 3 and m._state["layer"] == 4  # the last (re-)selection: layer 4
        for r in range(2):
            want = brute_force(layers[2], qs[2], r, 4)
            assert read_slots(sels[3], layers[3], r) == want == read_slots(sels[4], layers[4], r)


def test_prefill_and_continuations_clear_the_selection():
    gen = torch.Generator().manual_seed(3)
    m = TidalDecode(budget=4, select_layer=0, reselect_layer=-1)
    layers, _ = stack([30], 2, m, gen)
    step(layers, m, gen)
    assert m._state
    m.plan(0, None, None, None, 1.0)
    assert not m._state
    # a layer one step ahead of the selection (no selection of its step) selects itself
    layers[1].update(*(torch.randn(1, KV, 1, D, generator=gen),) * 2)
    assert m.select_decode(1, torch.randn(1, KV * G, 1, D, generator=gen), layers[1]) is None
    assert m._state["layer"] == 1
    # a multi-token continuation is dense in every layer and forgets the selection
    lay, _ = stack([30], 1, m, gen)
    step(lay, m, gen)
    lay[0].update(*(torch.randn(1, KV, 3, D, generator=gen),) * 2)
    assert m.select_decode(0, torch.randn(1, KV * G, 3, D, generator=gen), lay[0]) is None and not m._state


def test_a_row_reads_the_same_tokens_alone_and_in_a_padded_batch():
    assert_layers_alone_equal_batched(lambda: TidalDecode(budget=9, select_layer=0, reselect_layer=2),
                                      [61, 40, 53, 8], 10, n_layers=4)


def test_tiny_model_alone_equals_batched():
    assert_model_alone_equals_batched(TidalDecode(budget=12, select_layer=1, reselect_layer=-1), num_hidden_layers=3)


def test_a_budget_covering_the_cache_equals_dense_decoding():
    m = TidalDecode(budget=128, select_layer=0, reselect_layer=2)
    rec = assert_covering_budget_equals_dense(m, num_hidden_layers=4)
    assert {i for i, sel in rec.log if sel is not None} == {1, 3}  # the sparse layers selected
    assert m.report()["decode_kept_fraction"] == pytest.approx(1.0)


def test_report_is_the_mean_read_fraction():
    gen = torch.Generator().manual_seed(8)
    m = TidalDecode(budget=4, select_layer=1, reselect_layer=-1)
    assert m.report() == {"decode_kept_fraction": None}
    layers, _ = stack([20, 3], 3, m, gen)
    step(layers, m, gen)
    # layers 0 and 1 read all; layer 2: row 0 reads 4 of 21, row 1 all 4 of its 4
    assert m.report()["decode_kept_fraction"] == pytest.approx((1 + 1 + (4 / 21 + 1) / 2) / 3)


@pytest.mark.parametrize("lengths", [(200,), (200, 157)], ids=["alone", "padded"])
def test_static_decode_equals_dynamic(lengths):
    """greedy_static (static steps, eager on the CPU) on 5 layers (dense, selecting, sparse,
    re-selecting, sparse) gives the dynamic path's tokens and read fractions."""
    assert_static_equals_dynamic(lambda: TidalDecode(budget=24, select_layer=1, reselect_layer=3), lengths,
                                 num_hidden_layers=5)


def test_registry_density_and_bad_knobs():
    m = registry.create("tidaldecode:budget=64,select_layer=3,reselect_layer=10")
    assert isinstance(m, TidalDecode) and (m.budget, m.select_layer, m.reselect_layer) == (64, 3, 10)
    assert registry.create("tidaldecode") == TidalDecode(budget=2048, select_layer=2, reselect_layer=12)
    registry._check_params_match_fields()
    assert registry.density_param("tidaldecode") == "budget"
    assert registry.at_density("tidaldecode", 0.1, 8000) == "tidaldecode:budget=800"
    assert registry.at_density("tidaldecode", 0.0001, 100) == "tidaldecode:budget=2"
    for spec, msg in (("tidaldecode:budget=1", "budget"), ("tidaldecode:select_layer=-1", "select_layer"),
                      ("tidaldecode:select_layer=5,reselect_layer=5", "reselect_layer"),
                      ("tidaldecode:reselect_layer=-2", "reselect_layer")):
        with pytest.raises(ValueError, match=msg):
            registry.create(spec)
    from tca_attention.benchmarks import bench_methods
    from tca_attention.eval.methods import expand_method

    assert bench_methods.PEER_SWEEPS["tidaldecode"] == "tidaldecode:budget=2048|4096"
    [em] = expand_method("tidaldecode@match=tca:tau=0.5")
    assert (em.spec, em.match) == ("tidaldecode", "tca:tau=0.5")
