"""The decode-side peers (TokenSelect, TidalDecode, Recycled Attention) through the real eval pipeline
on a tiny random Llama: they hold the whole cache (kept fraction 1, KV bytes equal to dense) and the
results record the fraction of it their decode steps read. Plumbing only (random weights)."""
from __future__ import annotations

from pathlib import Path

import pytest
from test_eval_pipeline import tiny_llama

from tca_attention.eval.methods import ModelBackend
from tca_attention.eval.runner import EvalConfig, evaluate


def test_decode_peers_hold_everything_and_record_what_they_read(tmp_path: Path, smol_tokenizer,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TCA_CACHE_DIR", str(tmp_path / "cache"))
    model = tiny_llama(len(smol_tokenizer))
    backend = ModelBackend("tiny-llama", device="cpu", model=model, tokenizer=smol_tokenizer)
    specs = ("tokenselect:budget=64,sinks=16,local=32", "tidaldecode:budget=128,select_layer=0,reselect_layer=-1",
             "recycled:budget=128,stride=4")
    cfg = EvalConfig(model="tiny-llama", methods=specs, tasks=("niah_single",), lengths=(384,), samples=1)
    results = evaluate(cfg, backend, tmp_path, progress=False)
    by = {r.method: r for r in results}
    assert set(by) == set(specs)
    for spec in specs:
        r = by[spec]
        assert r.kept_fraction == 1.0 and r.kv_bytes == r.dense_kv_bytes > 0, spec
        assert 0 < r.metadata["decode_attended_fraction"] < 1, spec
        assert r.prediction, spec
