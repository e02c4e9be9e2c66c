"""TCA's per-layer probe (methods/tca/layer_probe.py) and dense_at=auto: teacher-forced answers
equal a plain forward's, full budgets agree everywhere, a layer that changes the answers is found
and only it, the state file round-trips and refuses bad files, the probe is cached, and the
registry turns it into the method's dense_at."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tca_attention import registry
from tca_attention.integration.probe import ModelProbe
from tca_attention.introspect import layer_kinds
from tca_attention.methods.state import ModelIdentity, StateError
from tca_attention.methods.tca import layer_probe
from tca_attention.methods.tca.budgets import Budgets, HeadBudget
from tca_attention.methods.tca.candidates import candidate_ladder
from tca_attention.methods.tca.config import TCAConfig
from tca_attention.methods.tca.layer_probe import LayerProbe, ProbeSettings, load_or_probe, probe_layers
from tca_attention.methods.tca.method import TCA
from test_batch_invariance import B_, W_, mixed_budgets
from test_head_split import CharTok
from tiny_models import tiny

SETTINGS = ProbeSettings(length=300, prompts=2)


def full_budgets(model) -> Budgets:
    """Every head of every full-attention layer dense (no candidate reaches tau)."""
    cfg = TCAConfig(block_size=B_, window=W_)
    ident = ModelIdentity.of(model)
    ladder = candidate_ladder(cfg.block_size)
    zero = tuple(0.0 for _ in range(ladder.shape[0]))
    layers = tuple(None if kind != "full" else tuple(HeadBudget(zero, zero) for _ in range(ident.num_kv_heads))
                   for kind in layer_kinds(model))
    return Budgets(ident, cfg, tuple(tuple(r) for r in ladder.tolist()), layers)


def test_answer_logits_equal_a_plain_forward_each():
    """Two prompts of different lengths and answer starts in one left-padded batch: each row's
    teacher-forced logits = one plain forward over that prompt alone."""
    model = tiny("llama")
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 97, (90,), generator=gen).tolist(), torch.randint(0, 97, (75,), generator=gen).tolist()]
    starts = [70, 62]  # answers of 20 and 13 tokens
    got = ModelProbe(model).answer_logits(prompts, starts, None)
    assert [g.shape for g in got] == [(20, 97), (13, 97)]
    for ids, s, g in zip(prompts, starts, got):
        with torch.no_grad():
            want = model(torch.tensor([ids])).logits[0, s - 1:len(ids) - 1]
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="answer_start"):
        ModelProbe(model).answer_logits(prompts, [90, 10], None)
    with pytest.raises(ValueError, match="as many"):
        ModelProbe(model).answer_logits(prompts, [10], None)


def test_answer_logits_batched_equal_alone_under_tca():
    model = tiny("llama")
    tca = TCA(mixed_budgets(TCAConfig(block_size=B_, window=W_), ModelIdentity.of(model)), dense_below=0)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (300, 260)]
    starts = [280, 249]
    probe = ModelProbe(model)
    batched = probe.answer_logits(prompts, starts, tca)
    for ids, s, b in zip(prompts, starts, batched):
        torch.testing.assert_close(b, probe.answer_logits([ids], [s], tca)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_full_budgets_agree_in_every_layer(arch):
    model = tiny(arch)
    result = probe_layers(ModelProbe(model), CharTok(), full_budgets(model), {"last_q": 4}, SETTINGS, progress=False)
    tca = [a is not None for a in result.agreement]
    assert tca == [k == "full" for k in layer_kinds(model)]
    assert all(a == 1.0 for a in result.agreement if a is not None)
    assert all(k < 1e-6 for k in result.kl if k is not None)
    assert result.dense_layers() == ()
    assert result.settings["length"] == 300 and result.settings["options"] == {"last_q": 4}
    assert all(k == 1.0 for k in result.kept if k is not None)


class OneLayerMatters:
    """A probe whose answers change (argmax of every other position) whenever TCA runs in layer 1."""

    def __init__(self, model):
        self.model = model
        self.calls: list[tuple[int, ...] | None] = []

    def answer_logits(self, prompts, starts, method):
        self.calls.append(None if method is None else method.dense_at)
        out = []
        for ids, start in zip(prompts, starts):
            logits = torch.zeros(len(ids) - start, 97)
            logits[:, 5] = 10.0
            if method is not None and 1 not in method.dense_at:
                logits[::2, 7] = 20.0
            out.append(logits)
        return out


def test_the_layer_that_changes_answers_is_found():
    model = tiny("llama", num_hidden_layers=3)
    probe = OneLayerMatters(model)
    result = probe_layers(probe, CharTok(), mixed_budgets(TCAConfig(block_size=B_, window=W_), ModelIdentity.of(model)),
                          {}, SETTINGS, progress=False)
    assert probe.calls == [None, (1, 2), (0, 2), (0, 1)]  # dense, then one layer at a time (the prompts batched)
    assert result.agreement[1] < 0.6 and result.agreement[0] == result.agreement[2] == 1.0
    assert result.kl[1] > 0.1 and result.kl[0] == 0.0
    assert result.dense_layers() == (1,)
    assert result.dense_layers(min_agreement=0.4, max_kl=math.inf) == ()
    assert result.dense_layers(min_agreement=0.4) == (1,)  # its KL alone is above the ceiling
    with pytest.raises(ValueError, match="min_agreement"):
        result.dense_layers(1.5)
    with pytest.raises(ValueError, match="max_kl"):
        result.dense_layers(0.9, -0.1)
    with pytest.raises(ValueError, match="sets dense_at"):
        probe_layers(probe, CharTok(), full_budgets(model), {"dense_at": (1,)}, SETTINGS, progress=False)


def test_settings_are_checked_and_the_length_comes_from_the_budgets():
    with pytest.raises(ValueError, match="length"):
        ProbeSettings(length=10)
    with pytest.raises(ValueError, match="prompts"):
        ProbeSettings(prompts=0)
    model = tiny("llama")
    b = full_budgets(model)
    with pytest.raises(ValueError, match="calibration length"):
        ProbeSettings().resolved_length(b)
    assert ProbeSettings().resolved_length(Budgets(b.model, b.config, b.candidates, b.layers, {"tokens": 4096})) == 4096


def test_state_round_trips_and_refuses_bad_files(tmp_path):
    model = tiny("llama")
    state = LayerProbe(ModelIdentity.of(model), (0.5, 1.0), (0.3, 0.0), (0.2, 0.4), {"tau": 0.8})
    path = state.save(tmp_path / "p.json")
    assert LayerProbe.load(path, model=model) == state
    with pytest.raises(StateError, match="does not fit this model"):
        LayerProbe.load(path, model=tiny("qwen2"))
    data = json.loads(path.read_text())
    for key, value, why in (("agreement", [0.5], "2 entries"), ("agreement", [1.5, 1.0], r"agreement\[0\]"),
                            ("kl", [None, 0.0], "same layers"), ("version", 9, "version")):
        bad = {**data, key: value}
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(StateError, match=why):
            LayerProbe.load(tmp_path / "bad.json")


def test_probe_is_cached_per_budgets_and_options(tmp_path, monkeypatch):
    monkeypatch.setenv("TCA_CACHE_DIR", str(tmp_path))
    model = tiny("llama")
    b = full_budgets(model)
    calls = []
    real = layer_probe.probe_layers
    monkeypatch.setattr(layer_probe, "probe_layers", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = load_or_probe(ModelProbe(model), CharTok(), "tiny", b, {"last_q": 4}, SETTINGS, show=False)
    assert load_or_probe(ModelProbe(model), CharTok(), "tiny", b, {"last_q": 4}, SETTINGS, show=False) == first
    assert calls == [1]
    load_or_probe(ModelProbe(model), CharTok(), "tiny", b, {"last_q": 8}, SETTINGS, show=False)  # other options
    assert calls == [1, 1] and len(list((tmp_path / "layer_probes").glob("*.json"))) == 2


def test_registry_dense_at_auto_takes_the_probed_layers(tmp_path, monkeypatch):
    monkeypatch.setenv("TCA_CACHE_DIR", str(tmp_path))
    model = tiny("llama", num_hidden_layers=3)
    b = mixed_budgets(TCAConfig(block_size=B_, window=W_), ModelIdentity.of(model))
    seen = {}

    def fake(probe, tok, budgets, options, settings, progress=True):
        seen.update(options=options, settings=settings)
        return LayerProbe(ModelIdentity.of(model), (0.95, 0.5, 0.85), (0.0, 0.4, 0.1), (0.3, 0.3, 0.3), {})

    monkeypatch.setattr(layer_probe, "probe_layers", fake)
    spec = "tca:dense_at=auto,last_q=8,span=3,probe_length=300,probe_prompts=1"
    m = registry.create(spec, model=model, tokenizer=CharTok(), budgets=b)
    assert m.dense_at == (1, 2)  # below the default floor 0.9
    assert seen["options"] == {"last_q": 8, "span": 3} and seen["settings"] == ProbeSettings(300, 1)
    m = registry.create(spec + ",probe_min=0.8", model=model, tokenizer=CharTok(), budgets=b)
    assert m.dense_at == (1, 2)  # layer 2 agrees 0.85 >= 0.8 but its KL 0.1 is above the default ceiling
    m = registry.create(spec + ",probe_min=0.8,probe_max_kl=0.2", model=model, tokenizer=CharTok(), budgets=b)
    assert m.dense_at == (1,)
    with pytest.raises(ValueError, match="only apply with dense_at=auto"):
        registry.create("tca:probe_max_kl=0.2", model=model, tokenizer=CharTok(), budgets=b)
    with pytest.raises(ValueError, match="only apply with dense_at=auto"):
        registry.create("tca:probe_min=0.8", model=model, tokenizer=CharTok(), budgets=b)
    with pytest.raises(ValueError, match="tokenizer"):
        registry.create("tca:dense_at=auto", model=model, budgets=b)
    with pytest.raises(ValueError, match="drop dense_layers"):
        registry.create("tca:dense_at=auto,dense_layers=1", model=model, tokenizer=CharTok(), budgets=b)


def test_eval_summary_and_report_name_the_chosen_layers():
    from tca_attention.eval.report import markdown, summarize
    from tca_attention.eval.schema import Result

    def res(method, sid, **meta):
        return Result(sid, "niah", 4096, method, "m", 1.0, "exact", "x", ("x",), 4096, 0.5, 10, 20, 0.1,
                      metadata=meta)

    auto = "tca:dense_at=auto"
    rs = [res(auto, "a", dense_at=[18]), res(auto, "b", dense_at=[18]), res("tca", "a"), res("full", "a")]
    summary = summarize(rs)
    cells = summary["models"]["m"]["methods"]
    assert cells[auto]["lengths"]["4096"]["dense_at"] == [18]
    assert "dense_at" not in cells["tca"]["lengths"]["4096"]
    assert "(dense_at=auto): tca:dense_at=auto at 4096: 18." in markdown(summary)


def test_the_eval_records_the_dense_layers(tmp_path, smol_tokenizer, monkeypatch):
    """A TCA run with dense layers writes them into its result rows (and none without)."""
    from tca_attention.eval.methods import ModelBackend
    from tca_attention.eval.runner import EvalConfig, evaluate
    from test_eval_pipeline import tiny_llama

    monkeypatch.setenv("TCA_CACHE_DIR", str(tmp_path / "cache"))
    backend = ModelBackend("tiny-llama", device="cpu", model=tiny_llama(len(smol_tokenizer)), tokenizer=smol_tokenizer)
    cfg = EvalConfig(model="tiny-llama", methods=("tca:tau=0.5,dense_at=1", "tca:tau=0.5"), tasks=("niah_single",),
                     lengths=(512,), samples=1)
    by = {r.method: r for r in evaluate(cfg, backend, tmp_path, progress=False)}
    assert by["tca:tau=0.5,dense_at=1"].metadata["dense_at"] == [1]
    assert "dense_at" not in by["tca:tau=0.5"].metadata
