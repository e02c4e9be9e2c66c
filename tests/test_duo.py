"""duo: DuoAttention's gate optimisation and its deployment through head-split's execution.

The gated attention against its definition, the optimiser on a constructed case where one head
matters (its gate stays, the others fall), the optimisation end to end on a tiny model through the
real probe (cached), the state's JSON and identity checks, all heads retrieval = dense, the density
knob, batch invariance, and the registry.
"""
from __future__ import annotations

import json

import pytest
import torch

from tca_attention import registry
from tca_attention.integration import enable
from tca_attention.integration.probe import ModelProbe
from tca_attention.methods import duo
from tca_attention.methods.duo import Duo, DuoGates, Optimisation, gated_attention, streaming_mask
from tca_attention.methods.head_split import HeadScores, HeadSplit, NeedlePrompt
from tca_attention.methods.state import ModelIdentity, StateError
from test_batch_invariance import greedy
from test_head_split import SINKS, W, B, CharTok, fake_scores, left_padded
from tiny_models import tiny


def gates_of(model, values) -> DuoGates:
    return DuoGates(ModelIdentity.of(model), tuple(tuple(r) for r in values), {"source": "test"})


def test_gated_attention_mixes_full_and_streaming_per_kv_head():
    gen = torch.Generator().manual_seed(0)
    Bn, H, KV, L, D = 2, 4, 2, 40, 8
    q, k, v = torch.randn(Bn, H, L, D, generator=gen), torch.randn(Bn, KV, L, D, generator=gen), torch.randn(Bn, KV, L, D, generator=gen)
    sinks, recent = 3, 5
    out = gated_attention(q, k, v, 0.3, torch.tensor([1.0, 0.25]), sinks, recent)  # (B, L, H, D)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    logits = q @ kk.transpose(-1, -2) * 0.3
    j, s = torch.arange(L)[:, None], torch.arange(L)[None, :]
    full = torch.softmax(logits.masked_fill(s > j, float("-inf")), -1) @ vv
    near = (s <= j) & ((s < sinks) | (j - s < recent))
    assert torch.equal(streaming_mask(L, sinks, recent), near)
    stream = torch.softmax(logits.masked_fill(~near, float("-inf")), -1) @ vv
    want = torch.cat([full[:, :2], 0.25 * full[:, 2:] + 0.75 * stream[:, 2:]], 1).transpose(1, 2)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


class OneHeadMatters:
    """A probe over hand-built attention (2 layers x 2 KV heads, 6 query heads): in layer 0, KV head
    0's answer-span queries look at the needle (far beyond any streaming window), whose values are
    large; every other head attends to its most recent key, which a streaming head keeps. The hidden
    state is the sum of the layers' outputs: only gate (0, 0) changes it."""

    def __init__(self, model, L: int = 64):
        self.model, self.L = model, L
        gen = torch.Generator().manual_seed(0)
        D = 16
        self.k = torch.randn(1, 2, L, D, generator=gen)
        self.v = torch.randn(1, 2, L, D, generator=gen) * 0.1
        self.v[0, 0, 8:12] = 5.0  # the needle's values in KV head 0
        local = torch.zeros(1, 6, L, D)
        for j in range(L):  # every head points at its own previous key...
            local[0, :, j] = 20 * self.k[0, :, max(j - 1, 0)].repeat_interleave(3, 0)
        far = local.clone()
        for j in range(50, 60):  # ...but layer 0's KV head 0's queries on the answer span point at the needle
            far[0, :3, j] = 20 * self.k[0, 0, 8 + j % 4]
        self.q = (far, local)

    def hidden_states(self, input_ids, override=None):
        outs = []
        for layer in (0, 1):
            q = self.q[layer]
            out = override(layer, q, self.k, self.v, 0.25) if override is not None else None
            if out is None:
                out = gated_attention(q, self.k, self.v, 0.25, torch.ones(2), 0, 1)
            outs.append(out.flatten(2))  # (1, L, H*D)
        return outs[0] + outs[1]


def test_optimiser_keeps_the_head_that_matters_and_drops_the_others():
    model = tiny("llama")
    probe = OneHeadMatters(model)
    prompt = NeedlePrompt(list(range(64)), (8, 12), (50, 60))
    opt = Optimisation(steps=60, sinks=2, recent=8, lr=0.05, reg=0.05)
    gates = duo.optimise_gates(probe, [prompt], opt, progress=False)
    g = torch.tensor(gates.layers)
    assert g[0, 0] > 0.9, g  # dropping its far keys changes the hidden states: kept
    assert float(g.flatten()[1:].max()) < 0.3, g  # the others lose nothing as streaming heads: the L1 wins
    assert gates.calibration["steps"] == 60 and gates.calibration["final_loss"]["distill"] >= 0
    assert all(p.requires_grad for p in model.parameters())  # the weights were frozen only while optimising


def test_optimisation_end_to_end_on_a_tiny_model_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("TCA_CACHE_DIR", str(tmp_path))
    model = tiny("gemma3")  # sliding layers are left alone
    before = [p.detach().clone() for p in model.parameters()]
    opt = Optimisation(steps=3, length=300, sinks=4, recent=16, depths=(0.3, 0.7))
    calls = []
    real = duo.optimise_gates
    monkeypatch.setattr(duo, "optimise_gates", lambda *a, **k: calls.append(1) or real(*a, **k))
    gates = duo.load_or_optimise(ModelProbe(model), CharTok(), "tiny", opt, announce=False)
    assert [r is None for r in gates.layers] == [True, False, True]
    row = gates.layers[1]
    assert len(row) == 2 and all(0 <= x <= 1 for x in row) and max(row) < 1.0  # they moved (L1 pulls down)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # weights untouched
    assert calls == [1] and len(list((tmp_path / "duo_gates").glob("*.json"))) == 1
    assert duo.load_or_optimise(ModelProbe(model), CharTok(), "tiny", opt, announce=False) == gates
    assert calls == [1]  # cached
    assert gates.summary()["kv_heads"] == 2


def test_state_round_trips_and_refuses_other_models_and_versions(tmp_path):
    model, other = tiny("llama"), tiny("qwen2")
    gates = gates_of(model, [(0.9, 0.1), (0.4, 0.6)])
    path = gates.save(tmp_path / "g.json")
    assert DuoGates.load(path, model=model) == gates
    with pytest.raises(StateError, match="do not fit this model"):
        DuoGates.load(path, model=other)
    with pytest.raises(StateError, match="do not fit this model"):
        enable(other, Duo(gates))
    data = gates.to_json()
    for broken, why in (({**data, "version": 2}, "version 2 is not supported"),
                        ({**data, "format": "tca-attention/head-scores"}, "not a tca-attention/duo-gates file"),
                        ({**data, "layers": data["layers"][:1]}, "layers must be a list of 2"),
                        ({**data, "layers": [[0.5, 1.5], None]}, r"layers\[0\] must be null or 2 gates"),
                        ({**data, "layers": [None, None]}, "no layer has gates"),
                        ({**data, "model": {**data["model"], "num_kv_heads": 0}}, "must be a positive integer")):
        with pytest.raises(StateError, match=why):
            DuoGates.from_json(broken)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(StateError, match="corrupt"):
        DuoGates.load(tmp_path / "bad.json")
    assert json.loads(path.read_text())["format"] == "tca-attention/duo-gates"


def test_retrieval_heads_are_the_highest_gates():
    model = tiny("llama")
    m = Duo(gates_of(model, [(0.9, 0.1), (0.4, 0.6)]), retrieval_fraction=0.5)
    assert [m.kinds(0), m.kinds(1)] == [("dense", "streaming"), ("streaming", "dense")]
    assert m.report() == {"retrieval_heads": 2, "kv_heads": 4}
    assert m.decode_keep(0, 2).tolist() == [m.block_size, 0]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_all_retrieval_heads_equal_dense(arch):
    """retrieval_fraction=1: a left-padded batch prefills and decodes greedily as plain attention."""
    model = tiny(arch).double()
    _, ids, mask = left_padded((200, 151, 40), seed=5)
    gates = DuoGates(ModelIdentity.of(model), fake_scores(model).layers)
    method = Duo(gates, retrieval_fraction=1.0, sinks=SINKS, window=W, block_size=B)
    with torch.no_grad():
        with enable(model, None) as dense:
            dp, dl, dt, _ = greedy(model, ids, mask, 30, dense)
        with enable(model, method, backend="reference") as session:
            sp, sl, st, cache = greedy(model, ids, mask, 30, session)
    assert torch.equal(st, dt)
    valid = mask.bool()
    assert torch.equal(sp[valid], dp[valid])
    assert float((sl - dl).abs().max()) <= 64 * torch.finfo(torch.float32).eps * float(dl.abs().max())
    assert all(l.g_pos.numel() == 0 and l.t_fill == ids.shape[1] + 30 for l in cache.tca_layers())


def test_same_as_head_split_with_the_gates_as_scores():
    """Duo runs head-split's execution: the same outputs and cache as HeadSplit on the gates."""
    model = tiny("llama")
    gates = gates_of(model, [(0.9, 0.1), (0.4, 0.6)])
    _, ids, mask = left_padded((300, 251, 45), seed=6)
    runs = []
    with torch.no_grad():
        for method in (Duo(gates, retrieval_fraction=0.5, sinks=SINKS, window=W, block_size=B), HeadSplit(HeadScores(gates.model, gates.layers), retrieval_fraction=0.5, sinks=SINKS, window=W, block_size=B)):
            with enable(model, method, backend="reference") as session:
                runs.append(greedy(model, ids, mask, 20, session))
    (dp, dl, dt, _), (hp, hl, ht, _) = runs
    assert torch.equal(dp, hp) and torch.equal(dl, hl) and torch.equal(dt, ht)
    with torch.no_grad(), enable(model, Duo(gates, retrieval_fraction=0.0, sinks=SINKS, window=W, block_size=B), backend="reference") as session:
        zp = greedy(model, ids, mask, 1, session)[0]
    assert not torch.allclose(zp[mask.bool()], dp[mask.bool()])  # streaming heads do drop keys


def test_alone_equals_batched():
    """Each prompt's prefill logits, greedy tokens and step logits are the same alone and in a left-padded batch."""
    model = tiny("qwen2")
    method = Duo(gates_of(model, [(0.9, 0.1), (0.4, 0.6)]), retrieval_fraction=0.5, sinks=SINKS, window=W, block_size=B)
    prompts, ids, mask = left_padded((300, 251, 45), seed=7)
    L = ids.shape[1]
    with torch.no_grad(), enable(model, method, backend="reference") as session:
        bp, bl, bt, _ = greedy(model, ids, mask, 30, session)
        assert session.prefill_report()["kept_fraction"] < 1  # it is sparse
        for r, p in enumerate(prompts):
            ap, al, at, _ = greedy(model, p[None], torch.ones(1, len(p), dtype=torch.long), 30, session)
            assert torch.equal(bt[r], at[0]), r
            tol = 64 * torch.finfo(torch.float32).eps * float(ap.abs().max())
            assert float((bp[r, L - len(p):] - ap[0]).abs().max()) <= tol
            assert float((bl[r] - al[0]).abs().max()) <= tol


def test_registry_create_and_at_density(tmp_path, monkeypatch):
    monkeypatch.setenv("TCA_CACHE_DIR", str(tmp_path))
    model = tiny("llama")
    gates = gates_of(model, [(0.9, 0.1), (0.4, 0.6)])
    m = registry.create("duo:retrieval_fraction=0.25,window=32,block_size=16", gates=gates)
    assert isinstance(m, Duo) and (m.retrieval_fraction, m.sinks, m.window, m.block_size) == (0.25, 64, 32, 16)
    path = gates.save(tmp_path / "g.json")
    assert registry.create(f"duo:gates={path}").gates == gates
    with pytest.raises(StateError):
        registry.create(f"duo:gates={path}", model=tiny("qwen2"))
    with pytest.raises(ValueError, match="model= and tokenizer="):
        registry.create("duo")
    assert registry.density_param("duo") == "retrieval_fraction"
    spec = registry.at_density("duo:sinks=4,window=32,block_size=16", 0.5, 300)
    rf = registry.parse_spec(spec)[1]["retrieval_fraction"]
    from tca_attention.methods import head_split as hs
    assert rf == hs.retrieval_fraction_for(0.5, 300, {"sinks": 4, "window": 32, "block_size": 16})
    assert registry.at_density("duo", 0.5, 300) != registry.at_density("duo:sinks=4", 0.5, 300)  # its own defaults


def test_bench_sweep_and_synthetic_state():
    """`tca bench methods` sweeps duo's density knob; --synthetic-state gives it seeded random gates
    tied to the (random-weight) model."""
    from argparse import Namespace

    from tca_attention.benchmarks import bench_methods

    assert bench_methods.PEER_SWEEPS["duo"] == "duo:retrieval_fraction=0.25|0.5"
    model = tiny("llama")
    m = bench_methods.build_method("duo:retrieval_fraction=0.5", model, Namespace(synthetic_state=True))
    assert isinstance(m, Duo) and m.report() == {"retrieval_heads": 2, "kv_heads": 4}
    m.check_model(model)
    assert m.gates == bench_methods.build_method("duo", model, Namespace(synthetic_state=True)).gates  # seeded
    with pytest.raises(ValueError, match="model= and tokenizer="):
        bench_methods.build_method("duo", model, Namespace(synthetic_state=False))


def test_probe_override_replaces_full_attention_outputs_only_on_plain_attention():
    """ModelProbe.hidden_states: with no override (or one returning None) the model's own last hidden
    states; an override's output replaces the layer's attention; refused with a sparse method."""
    from tca_attention.integration.hf import Session

    model = tiny("llama")
    ids = torch.randint(0, 97, (1, 50))
    probe = ModelProbe(model)
    with torch.no_grad():
        plain = model(ids, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(probe.hidden_states(ids), plain)
        torch.testing.assert_close(probe.hidden_states(ids, lambda *a: None), plain)
        ones = probe.hidden_states(ids, lambda i, q, k, v, s: gated_attention(q, k, v, s, torch.ones(2), 0, 1))
        torch.testing.assert_close(ones, plain, rtol=1e-4, atol=1e-5)  # gate 1 = full attention
        zero = probe.hidden_states(ids, lambda i, q, k, v, s: gated_attention(q, k, v, s, torch.zeros(2), 1, 4))
        assert not torch.allclose(zero, plain, atol=1e-3)
    with pytest.raises(ValueError, match="plain attention only"):
        Session(model, Duo(gates_of(model, [(0.9, 0.1), (0.4, 0.6)])), override=lambda *a: None)
