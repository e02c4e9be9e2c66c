"""TCA's dense_layers option: the first n decoder layers keep everything, at prefill and in decode."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tca_attention import registry
from tca_attention.integration import enable
from tca_attention.methods.state import ModelIdentity
from tca_attention.methods.tca.config import TCAConfig
from tca_attention.methods.tca.method import TCA
from test_batch_invariance import B_, W_, greedy, mixed_budgets
from tiny_models import tiny


def _tca(model, **kw) -> TCA:
    return TCA(mixed_budgets(TCAConfig(block_size=B_, window=W_), ModelIdentity.of(model)), dense_below=0, **kw)


def _held(model, ids, mask, steps: int, **options) -> list[tuple[list[int], list[int]]]:
    """Per layer after prefill and `steps` greedy steps: (slots held, slots a dense cache holds) per row."""
    with torch.no_grad(), enable(model, _tca(model, **options), backend="reference") as session:
        *_, cache = greedy(model, ids, mask, steps, session)
    return [(layer.kept_tokens_per_row().tolist(), layer.dense_tokens_per_row().tolist()) for layer in cache.layers]


def _batch(seed: int, padded_row: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (2, 300), generator=gen)
    mask = torch.ones_like(ids)
    mask[padded_row, :pad] = 0
    return ids, mask


def test_dense_layers_keep_everything_and_the_rest_is_unchanged():
    """dense_layers=2: layers 0-1 hold every token after prefill and decode, the others hold exactly
    what they hold without the option; the plain TCA run really drops tokens in layers 0-1."""
    torch.manual_seed(0)
    model = tiny("llama", num_hidden_layers=4)
    ids, mask = _batch(3, 1, 40)
    held = {n: _held(model, ids, mask, 2 * B_ + 3, dense_layers=n) for n in (0, 2)}
    for kept, dense in held[2][:2]:  # layers 0 and 1: every token of every row
        assert kept == dense
    assert all(kept != dense for kept, dense in held[0][:2])  # without the option they drop tokens
    assert held[2][2:] == held[0][2:]


def test_all_layers_dense_equals_full_attention():
    model = tiny("llama", num_hidden_layers=3)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 97, (2, 280), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :25] = 0
    with torch.no_grad(), enable(model, None) as session:
        want, want_steps, want_toks, _ = greedy(model, ids, mask, 12, session)
    with torch.no_grad(), enable(model, _tca(model, dense_layers=3), backend="reference") as session:
        got, got_steps, got_toks, _ = greedy(model, ids, mask, 12, session)
        assert session.method.report()["dense_layers"] == 3
    torch.testing.assert_close(got_steps, want_steps, rtol=1e-4, atol=1e-4)
    assert torch.equal(got_toks, want_toks)


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_dense_layers_refuses_bad_values(bad):
    model = tiny("llama", num_hidden_layers=2)
    with pytest.raises(ValueError, match="dense_layers"):
        _tca(model, dense_layers=bad)


def test_dense_layers_is_a_spec_option():
    name, params = registry.parse_spec("tca:tau=0.8,dense_layers=2")
    assert name == "tca" and params["dense_layers"] == 2
    assert {"dense_layers", "dense_at"} <= {f.name for f in dataclasses.fields(TCA)}


def test_dense_at_keeps_the_named_layers_only():
    torch.manual_seed(0)
    model = tiny("llama", num_hidden_layers=4)
    ids, mask = _batch(4, 0, 30)
    held = {at: _held(model, ids, mask, B_ + 2, dense_at=at) for at in ((), (1, 3))}
    assert all(held[(1, 3)][i][0] == held[(1, 3)][i][1] for i in (1, 3))
    assert all(held[()][i][0] != held[()][i][1] for i in (1, 3))
    assert [held[(1, 3)][i] for i in (0, 2)] == [held[()][i] for i in (0, 2)]


@pytest.mark.parametrize("bad,match", [((4,), "does not have"), ((1, 1), "distinct"), ((-1,), "dense_at"),
                                       ([1], "dense_at")])
def test_dense_at_refuses_bad_layers(bad, match):
    model = tiny("llama", num_hidden_layers=4)
    with pytest.raises(ValueError, match=match):
        _tca(model, dense_at=bad)


def test_dense_at_refuses_a_sliding_layer():
    model = tiny("llama", num_hidden_layers=4)
    budgets = mixed_budgets(TCAConfig(block_size=B_, window=W_), ModelIdentity.of(model))
    budgets = dataclasses.replace(budgets, layers=(None,) + budgets.layers[1:])  # layer 0: sliding
    with pytest.raises(ValueError, match="sliding-window layer"):
        TCA(budgets, dense_at=(0, 2))
    assert TCA(budgets, dense_at=(2,)).dense_at == (2,)


def test_dense_at_spec_parses_slash_lists():
    model = tiny("llama", num_hidden_layers=4)
    budgets = mixed_budgets(TCAConfig(block_size=B_, window=W_), ModelIdentity.of(model))
    m = registry.create("tca:dense_at=1/3,dense_layers=1", budgets=budgets)
    assert m.dense_at == (1, 3) and m.dense_layers == 1 and m.report()["dense_at"] == [1, 3]
    with pytest.raises(ValueError, match="dense_at"):
        registry.create("tca:dense_at=1/x", budgets=budgets)
