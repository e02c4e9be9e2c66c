"""TCA calibration over several texts and lengths (methods/tca/calibration.CalibrationSet): the
combined retained scores are exactly the mean (or min) of the single calibrations, the record says
what was used, the cache and the registry keep the variants apart, bad settings are refused."""
from __future__ import annotations

import pytest
import torch

from tca_attention import registry
from tca_attention.integration.probe import calibrate
from tca_attention.methods.tca.calibration import CalibrationSet
from tca_attention.methods.tca.config import TCAConfig
from tiny_models import tiny

CFG = TCAConfig(block_size=16, window=32)


class CharTok:
    """One token per character (ids < 97): exact, fast, no files."""

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        return {"input_ids": torch.tensor([[ord(c) % 97 for c in text]])}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + int(i) % 26) for i in ids)


def _text(seed: int, n: int = 600) -> str:
    g = torch.Generator().manual_seed(seed)
    return "".join(chr(97 + int(i)) for i in torch.randint(0, 26, (n,), generator=g))


def _scores(b) -> torch.Tensor:
    return torch.tensor([[h.column_mean + h.observation for h in layer] for layer in b.layers if layer is not None],
                        dtype=torch.float64)


def test_calibration_set_validation():
    with pytest.raises(ValueError, match="samples must be >= 1"):
        CalibrationSet(samples=0)
    with pytest.raises(ValueError, match="distinct positive"):
        CalibrationSet(lengths=(2048, 2048))
    with pytest.raises(ValueError, match="'mean' or 'min'"):
        CalibrationSet(combine="max")
    assert CalibrationSet.parse_lengths("2048/4096") == (2048, 4096)
    with pytest.raises(ValueError, match="separated by '/'"):
        CalibrationSet.parse_lengths("2k")
    assert CalibrationSet().is_default and not CalibrationSet(samples=2).is_default


def test_several_texts_and_lengths_combine_exactly():
    model = tiny("llama")
    tok = CharTok()
    a, b = _text(1), _text(2)
    with torch.no_grad():
        one_a = calibrate(model, tok, CFG, text=a, length=300, progress=False)
        one_b = calibrate(model, tok, CFG, text=b, length=300, progress=False)
        mean = calibrate(model, tok, CFG, text=[a, b], length=300, progress=False)
        low = calibrate(model, tok, CFG, text=[a, b], length=300, progress=False, plan=CalibrationSet(combine="min"))
        long_a = calibrate(model, tok, CFG, text=a, length=500, progress=False)
        lengths = calibrate(model, tok, CFG, text=a, progress=False, plan=CalibrationSet(lengths=(300, 500)))
    sa, sb = _scores(one_a), _scores(one_b)
    assert not torch.equal(sa, sb)  # the texts differ: the combination is not trivial
    torch.testing.assert_close(_scores(mean), (sa + sb) / 2, rtol=0, atol=1e-12)
    torch.testing.assert_close(_scores(low), torch.minimum(sa, sb), rtol=0, atol=0)
    torch.testing.assert_close(_scores(lengths), (sa + _scores(long_a)) / 2, rtol=0, atol=1e-12)
    assert [s["tokens"] for s in lengths.calibration["samples"]] == [300, 500]
    assert mean.calibration["combine"] == "mean" and len(mean.calibration["samples"]) == 2
    assert "samples" not in one_a.calibration  # one sample: the record of the paper's single pass
    # the choice at tau follows the combined scores: min never keeps less than mean
    assert low.at(tau=0.9).mean_kept_fraction >= mean.at(tau=0.9).mean_kept_fraction - 1e-12


def test_corpus_windows_and_refusals(monkeypatch):
    from tca_attention.methods.tca import calibration as C

    monkeypatch.setattr(C, "essay_text", lambda: _text(3, 1000))
    model = tiny("llama")
    with torch.no_grad():
        b = calibrate(model, CharTok(), CFG, length=300, progress=False, plan=CalibrationSet(samples=3))
        with pytest.raises(ValueError, match=r"1000 tokens; 1200 are needed \(4 samples of 300\)"):
            calibrate(model, CharTok(), CFG, length=300, progress=False, plan=CalibrationSet(samples=4))
        with pytest.raises(ValueError, match="one text per sample"):
            calibrate(model, CharTok(), CFG, text=["x" * 400], progress=False, plan=CalibrationSet(samples=2))
        with pytest.raises(ValueError, match="must exceed window"):
            calibrate(model, CharTok(), CFG, progress=False, plan=CalibrationSet(lengths=(40, 300)))
    assert [s["offset"] for s in b.calibration["samples"]] == [0, 300, 600]


def test_registry_spec_caches_the_variant_apart(tmp_path, monkeypatch):
    from tca_attention.methods.tca import budget_cache
    from tca_attention.methods.tca import calibration as C

    monkeypatch.setenv("TCA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(C, "essay_text", lambda: _text(4, 1500))
    real = budget_cache.load_or_calibrate
    monkeypatch.setattr(budget_cache, "load_or_calibrate", lambda *a, **k: real(*a, **{**k, "length": 300}))
    model = tiny("llama")
    spec = "tca:window=32,preset=small-context,calib_samples=2,calib_combine=min"
    with torch.no_grad():
        multi = registry.create(spec, model=model, tokenizer=CharTok())
        single = registry.create("tca:window=32,preset=small-context", model=model, tokenizer=CharTok())
    assert len(list((tmp_path / "budgets").glob("*.json"))) == 2  # two cache entries
    assert multi.budgets.calibration["combine"] == "min" and "samples" not in single.budgets.calibration
    with pytest.raises(ValueError, match="cannot change with budgets handed in"):
        registry.create("tca:calib_samples=2", budgets=single.budgets)
    with pytest.raises(ValueError, match="token counts separated by '/'"):
        registry.create("tca:calib_lengths=2k", model=model, tokenizer=CharTok())


def test_eval_runs_calibration_sets(tmp_path, smol_tokenizer, monkeypatch):
    """`tca eval` with tca:calib_*: the set is calibrated once (the core's cache), its budgets go to
    the spec (stacked with a calibrator too), the run's own budgets to the others."""
    from tca_attention.eval.methods import ModelBackend
    from tca_attention.eval.runner import EvalConfig, evaluate
    from test_eval_pipeline import tiny_llama

    monkeypatch.setenv("TCA_CACHE_DIR", str(tmp_path / "cache"))
    backend = ModelBackend("tiny-llama", model=tiny_llama(len(smol_tokenizer)), tokenizer=smol_tokenizer,
                           tca_config=TCAConfig(block_size=16, window=64, tau=0.9), calibration_length=256)
    methods = ("tca:tau=0.5", "tca:tau=0.5,calib_samples=2,calib_combine=min",
               "tca:tau=0.5,calib_samples=2,calib_combine=min+zerotuning:scale=1.5")
    cfg = EvalConfig(model="tiny-llama", methods=methods, tasks=("perplexity",), lengths=(384,), samples=1)
    results = evaluate(cfg, backend, tmp_path / "run", progress=False)
    assert {r.method for r in results} == set(methods)
    assert all(0 < r.kept_fraction < 1 and r.nll is not None for r in results)
    assert len(list((tmp_path / "cache" / "budgets").glob("*.json"))) == 2  # the run's and the set's
    (plan, budgets), = backend._plan_budgets.items()
    assert plan.samples == 2 and budgets.calibration["combine"] == "min"
