"""The model-level crossover (integration/crossover_model.py): timed through the whole model's
prefill (a fake timer on the CPU, which has no speed path), cached per model and settings, and
used by TCA's dense_below="auto" ahead of the per-layer one."""
from __future__ import annotations

import json

import pytest
import torch
from test_batch_invariance import mixed_budgets
from tiny_models import tiny

from tca_attention.integration import crossover_model as cm
from tca_attention.methods.state import ModelIdentity
from tca_attention.methods.tca.config import TCAConfig
from tca_attention.methods.tca.method import TCA

# the policy under test, before tests/conftest.py pins it for every other test
REAL = {name: TCA.__dict__[name] for name in ("_dense_below", "model_crossover_pending")}


@pytest.fixture(autouse=True)
def _real_policy(monkeypatch):
    for name, fn in REAL.items():
        monkeypatch.setattr(TCA, name, fn)


def _tca(model, dense_below="auto") -> TCA:
    return TCA(mixed_budgets(TCAConfig(block_size=16, window=32), ModelIdentity.of(model)), dense_below=dense_below)


def test_measure_times_the_model_dense_then_with_the_method():
    """Each length: one plain forward (no session) then one through the method with its policy off."""
    model = tiny("llama")
    seen = []

    def timer(fn):
        out = fn()
        seen.append(out.past_key_values.__class__.__name__)
        return {1: 1.0, 2: 2.0, 3: 4.0, 4: 3.0}[len(seen)]  # dense 1 / tca 2 at 64; dense 4 / tca 3 at 200

    rows = cm.measure_model(model, _tca(model), lengths=(64, 200), timer=timer)
    assert rows == [{"length": 64, "dense_ms": 1.0, "tca_ms": 2.0}, {"length": 200, "dense_ms": 4.0, "tca_ms": 3.0}]
    assert seen == ["DynamicCache", "RaggedCache", "DynamicCache", "RaggedCache"]
    assert cm.ladder(model, (1024, 4096, 8192)) == (1024, 4096)  # the tiny model's 4096 positions bound it


@pytest.mark.parametrize("kernel", [True, False])
def test_both_timings_take_the_sessions_path_for_sliding_layers(kernel, monkeypatch):
    """A model with sliding-window layers (Gemma3): the windowed kernel (the session default) runs in
    the dense timing too, or in neither, so that its gain is not counted as the method's; the
    choice is part of the cache key."""
    from tca_attention.integration import hf

    model = tiny("gemma3")
    windowed = []
    real = hf.Session._sliding_prefill
    monkeypatch.setattr(hf.Session, "_sliding_prefill",
                        lambda self, call: windowed.append(type(self.method).__name__) or real(self, call))
    timings = []

    def timer(fn):
        before = len(windowed)
        fn()
        timings.append(len(windowed) - before)
        return 1.0

    cm.measure_model(model, _tca(model), lengths=(200,), timer=timer, sliding_kernel=kernel)
    sliding = sum(k == "sliding" for k in hf.layer_kinds(model))
    assert sliding > 0 and timings == ([sliding, sliding] if kernel else [0, 0])
    assert cm.cache_path(model, _tca(model), kernel) != cm.cache_path(model, _tca(model), not kernel)
    llama = tiny("llama")  # no sliding layers: the same cache entry either way
    assert cm.cache_path(llama, _tca(llama), True) == cm.cache_path(llama, _tca(llama), False)


def test_model_crossover_is_cached_per_model_and_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("TCA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cm, "ladder", lambda model: (64, 128, 256))
    model = tiny("llama")
    times = iter([1.0, 2.0, 2.0, 1.5, 4.0, 3.0])  # (dense, tca) at 64, 128, 256: tca wins from 128
    assert cm.model_crossover(model, _tca(model), timer=lambda fn: next(times)) == 128
    [path] = (tmp_path / "crossover").glob("model-*.json")
    assert json.loads(path.read_text())["rows"][0] == {"length": 64, "dense_ms": 1.0, "tca_ms": 2.0}
    assert cm.model_crossover(model, _tca(model), timer=lambda fn: 1 / 0) == 128  # from the cache
    other = TCA(_tca(model).budgets, dense_below="auto", last_q=4)  # other settings: measured again
    assert cm.cache_path(model, other) != path


def test_tca_uses_the_model_crossover_before_the_layer_one():
    model = tiny("llama")
    m = _tca(model)
    dev = torch.device("cpu")
    assert not m.model_crossover_pending(dev)  # the CPU has no speed path: auto is never dense there
    assert not _tca(model, dense_below=0).model_crossover_pending(torch.device("cuda"))
    m.use_model_crossover(dev, 250)
    q, k = torch.randn(1, 6, 200, 16), torch.randn(1, 2, 200, 16)
    ks = torch.zeros(1, dtype=torch.long)
    assert m.plan(0, q, k, ks, 0.25, padded=False) is None  # 200 < 250: dense
    assert m.report()["dense_below_used"] == 250
    q, k = torch.randn(1, 6, 260, 16), torch.randn(1, 2, 260, 16)
    assert m.plan(0, q, k, ks, 0.25, padded=False) is not None


def test_a_session_measures_it_when_the_method_asks(monkeypatch):
    """enable() asks the method, measures before patching the model (plain forwards must stay
    plain) and hands the value back; a method that does not ask costs nothing."""
    from tca_attention.integration import enable

    model = tiny("llama")
    m = _tca(model)
    monkeypatch.setattr(TCA, "model_crossover_pending", lambda self, device: True)
    calls = []

    def fake(model_, method, sliding_kernel):
        from tca_attention.integration.hf import _SESSIONS
        from tca_attention.introspect import attention_modules

        calls.append((any(mod in _SESSIONS for mod in attention_modules(model_)), sliding_kernel))
        return 123

    monkeypatch.setattr(cm, "model_crossover", fake)
    with enable(model, m):
        pass
    with enable(model, m, sliding_kernel=False):  # the session's choice goes with it
        pass
    assert calls == [(False, True), (False, False)] and m._per_layer[("model_crossover", "cpu")] == 123


def test_a_session_really_measures_before_it_patches(tmp_path, monkeypatch):
    """The real path on the CPU (a timer that runs each forward once): the measurement's own
    sessions come and go inside enable(), and the session then runs with the value."""
    from tca_attention.integration import enable

    monkeypatch.setenv("TCA_CACHE_DIR", str(tmp_path))
    # the CPU stands in for a GPU: "auto", not yet measured (the measurement's own TCA has dense_below=0)
    monkeypatch.setattr(TCA, "model_crossover_pending", lambda self, device: (
        self.dense_below == "auto" and ("model_crossover", str(device)) not in self._per_layer))
    monkeypatch.setattr(cm, "ladder", lambda model: (64, 128))
    forwards = []

    def once(fn):
        out = fn()
        forwards.append(type(out.past_key_values).__name__)
        return {1: 2.0, 2: 1.0, 3: 2.0, 4: 1.0}[len(forwards)]  # tca faster at both lengths

    monkeypatch.setattr(cm, "_default_timer", once)
    model = tiny("llama")
    m = _tca(model)
    ids = torch.randint(0, 97, (1, 100))
    with enable(model, m) as session, torch.no_grad():
        out = model(input_ids=ids, use_cache=True, **session.cache_kwargs(session.new_cache()))
    assert forwards == ["DynamicCache", "RaggedCache"] * 2
    assert m._per_layer[("model_crossover", "cpu")] == 64 and m.report()["dense_below_used"] == 64
    assert type(out.past_key_values).__name__ == "RaggedCache"  # 100 >= 64: the prompt ran sparse
    # a method whose measuring copy would ask again gets a clear error, not a recursion
    monkeypatch.setattr(TCA, "model_crossover_pending", lambda self, device: True)
    monkeypatch.setenv("TCA_CACHE_DIR", str(tmp_path / "empty"))  # nothing cached: it would measure
    with pytest.raises(RuntimeError, match="asked for a model crossover again"):
        cm.measure_model(model, _tca(model), lengths=(64,), timer=lambda fn: (fn(), 1.0)[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_session_measures_the_model_crossover_once(tmp_path, monkeypatch):
    from tca_attention.integration import enable

    monkeypatch.setenv("TCA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cm, "ladder", lambda model: (256, 512))
    model = tiny("llama").cuda()
    m = _tca(model)
    with enable(model, m):
        pass
    [path] = (tmp_path / "crossover").glob("model-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert [r["length"] for r in rows] == [256, 512] and all(r["dense_ms"] > 0 and r["tca_ms"] > 0 for r in rows)
    assert not m.model_crossover_pending(torch.device("cuda", torch.cuda.current_device()))
