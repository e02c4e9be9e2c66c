"""Batched evaluation: same answers as one sample at a time, per-row KV accounting, and the
runner's fixed batches survive a crash."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tca_attention.eval.methods import EvalMethod, ModelBackend, Outcome, expand_method
from tca_attention.eval.runner import RESULTS_FILE, EvalConfig, ResultLog, evaluate
from tca_attention.eval.schema import Sample

from test_eval_pipeline import tiny_llama


@pytest.fixture(scope="module")
def backend(smol_tokenizer, tmp_path_factory) -> ModelBackend:
    from tca_attention.methods.tca.config import TCAConfig

    root = tmp_path_factory.mktemp("batching")
    b = ModelBackend("tiny-llama", model=tiny_llama(len(smol_tokenizer)), tokenizer=smol_tokenizer,
                     tca_config=TCAConfig(block_size=16, window=64, tau=0.9), calibration_length=512)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TCA_CACHE_DIR", str(root / "cache"))  # the core's budget cache
        b.prepare(root)
    return b


def _sample(i: int, kind: str = "generate", new_tokens: int | None = None) -> Sample:
    """new_tokens None: a different limit per sample (the batch decodes to the largest)."""
    return Sample(id=f"s{i}", task="t", length=0, context="", question="", answer_prefix="", answers=("x",),
                  max_new_tokens=6 + i if new_tokens is None else new_tokens, kind=kind,
                  metadata={"nll_tokens": 40 + 10 * i})


def _prompts(tokenizer, lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(100, len(tokenizer) - 100, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("kind", ["generate", "nll"])
def test_full_attention_batch_equals_single_runs(backend: ModelBackend, kind: str) -> None:
    ids = _prompts(backend.tokenizer, [700, 731, 690])
    samples = [_sample(i, kind) for i in range(3)]
    [spec] = expand_method("full")
    batched = backend.run_batch(spec, samples, ids, None)
    single = [backend.run(spec, s, x, None) for s, x in zip(samples, ids)]
    for b, s, x in zip(batched, single, ids):
        assert b.prediction == s.prediction
        if kind == "nll":
            assert b.nll == pytest.approx(s.nll, rel=1e-4)
        assert b.kept_fraction == 1.0
        # the row's own tokens, not the padded length (the batch may decode a few tokens further)
        assert b.kv_bytes == pytest.approx(s.kv_bytes, rel=0.02)


def test_tca_batch_without_padding_equals_single_runs(backend: ModelBackend) -> None:
    ids = _prompts(backend.tokenizer, [700, 700, 700])
    samples = [_sample(i, new_tokens=6) for i in range(3)]
    [spec] = expand_method("tca:tau=0.5")
    batched = backend.run_batch(spec, samples, ids, None)
    single = [backend.run(spec, s, x, None) for s, x in zip(samples, ids)]
    for b, s in zip(batched, single):
        assert b.prediction == s.prediction
        assert b.kept_fraction == pytest.approx(s.kept_fraction, abs=1e-12)
        assert 0.0 < b.kept_fraction < 0.95 and b.kv_bytes < b.dense_kv_bytes


def test_tca_batch_with_padding_equals_single_runs(backend: ModelBackend) -> None:
    """Blocks are counted from each row's first real token, so a left-padded row keeps what it
    keeps alone and answers the same; each row's accounting is of its own tokens."""
    ids = _prompts(backend.tokenizer, [700, 737, 690])
    samples = [_sample(i, new_tokens=6) for i in range(3)]
    [spec] = expand_method("tca:tau=0.5")
    batched = backend.run_batch(spec, samples, ids, None)
    single = [backend.run(spec, s, x, None) for s, x in zip(samples, ids)]
    for b, s in zip(batched, single):
        assert b.prediction == s.prediction
        assert b.kept_fraction == pytest.approx(s.kept_fraction, abs=1e-12)
        assert b.dense_kv_bytes == pytest.approx(s.dense_kv_bytes, rel=0.01)  # no padding slots counted


class BatchingFake:
    """Records the batches it is given; can crash after N batches."""

    model_name = "fake"

    def __init__(self, tokenizer: Any, crash_after: int | None = None, fits: int | None = None) -> None:
        self.tokenizer, self.crash_after, self.fits = tokenizer, crash_after, fits
        self.batches: list[list[str]] = []

    def load(self) -> Any:
        return self.tokenizer

    def prepare(self, run_dir: Path) -> None:
        pass

    def run(self, spec: EvalMethod, sample: Sample, ids: list[int], matched: float | None) -> Outcome:
        return self.run_batch(spec, [sample], [ids], matched)[0]

    def run_batch(self, spec, samples, ids_list, matched) -> list[Outcome]:
        if self.crash_after is not None and len(self.batches) >= self.crash_after:
            raise RuntimeError("simulated crash")
        if self.fits is not None and len(samples) > self.fits:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        self.batches.append([s.id for s in samples])
        return [Outcome(" ".join(s.answers), 1.0 if s.kind == "nll" else None, 0.5 if spec.label != "full" else 1.0,
                        500, 1000, 0.01, {}) for s in samples]


def test_runner_batches_fixed_chunks_and_resumes(tmp_path: Path, smol_tokenizer) -> None:
    cfg = EvalConfig(model="fake", methods=("full", "tca"), tasks=("niah_single",), lengths=(512,), samples=5,
                     batch_size=2)
    assert "batch2" in cfg.run_name() and cfg.identity()["batch_size"] == 2
    assert "batch_size" not in EvalConfig(model="fake").identity()  # batch 1 names the same folders as before
    crashing = BatchingFake(smol_tokenizer, crash_after=2)
    with pytest.raises(RuntimeError):
        evaluate(cfg, crashing, tmp_path, progress=False)
    assert [len(b) for b in crashing.batches] == [2, 2]
    assert len(ResultLog(tmp_path / RESULTS_FILE).load()) == 4
    resumed = BatchingFake(smol_tokenizer)
    results = evaluate(cfg, resumed, tmp_path, progress=False)
    assert len(results) == 10 and len({r.key for r in results}) == 10
    # the unfinished chunks run whole and in the same composition: [4], then tca's three chunks
    assert resumed.batches[0] == ["niah_single-512-0004"]
    assert [len(b) for b in resumed.batches] == [1, 2, 2, 1]


def test_a_batch_out_of_memory_runs_as_halves(tmp_path: Path, smol_tokenizer, caplog) -> None:
    """A batch that runs out of GPU memory is split in halves until it fits; every sample gets its
    result, the same as with a batch that fits; a single sample out of memory is an error."""
    cfg = EvalConfig(model="fake", methods=("full",), tasks=("niah_single",), lengths=(512,), samples=5,
                     batch_size=5)
    small = BatchingFake(smol_tokenizer, fits=2)
    with caplog.at_level("WARNING"):
        results = evaluate(cfg, small, tmp_path / "a", progress=False)
    assert [len(b) for b in small.batches] == [2, 1, 2]  # 5 -> 2 + 3 -> 2 + (1 + 2)
    assert "out of GPU memory on a batch of 5" in caplog.text
    roomy = evaluate(cfg, BatchingFake(smol_tokenizer), tmp_path / "b", progress=False)
    assert sorted((r.key, r.prediction) for r in results) == sorted((r.key, r.prediction) for r in roomy)
    with pytest.raises(torch.OutOfMemoryError):
        evaluate(cfg, BatchingFake(smol_tokenizer, fits=0), tmp_path / "c", progress=False)


def test_bad_batch_size_is_an_error() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        EvalConfig(model="fake", batch_size=0)


def test_sdpa_backend_names_the_run_and_restricts_torch() -> None:
    import torch

    from tca_attention.eval.methods import sdpa_kernels

    cfg = EvalConfig(model="fake", batch_size=20, sdpa_backend="math")
    assert cfg.run_name().startswith("fake_small-context_tau0.9_seed0_batch20_sdpa-math_")
    assert cfg.identity()["sdpa_backend"] == "math"
    assert "sdpa_backend" not in EvalConfig(model="fake").identity()  # auto names the same folders as before
    with pytest.raises(ValueError, match="sdpa_backend"):
        EvalConfig(model="fake", sdpa_backend="fastest")
    q = torch.randn(1, 2, 8, 16)
    with sdpa_kernels("math"):
        ref = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert torch.allclose(ref, torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True), atol=1e-5)
    with sdpa_kernels("efficient_attention"), pytest.raises(RuntimeError):
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)  # no such kernel on the CPU


@pytest.mark.parametrize("method", ["tca:tau=0.5", "streaming:window=128,sinks=4,block_size=16"])
def test_static_decode_answers_as_generate(backend: ModelBackend, method: str) -> None:
    """--cuda-graph (static decode steps; eager on the CPU) gives each padded row the answer
    model.generate() gives, cut at the row's first EOS, and accounts its KV the same way."""
    import copy

    static = copy.copy(backend)
    static.cuda_graph = True
    ids = _prompts(backend.tokenizer, [700, 737, 690])
    samples = [_sample(i) for i in range(3)]
    [spec] = expand_method(method)
    plain = backend.run_batch(spec, samples, ids, None)
    fast = static.run_batch(spec, samples, ids, None)
    assert all(o.extra["decode"] == "static" for o in fast) and all("decode" not in o.extra for o in plain)
    for p, f in zip(plain, fast):
        assert f.prediction == p.prediction
        assert 0.0 < f.kept_fraction < 1.0
        # the static cache decodes every row to the longest limit: a few more kept tokens at most
        assert f.kept_fraction == pytest.approx(p.kept_fraction, abs=0.02)


def test_static_decode_answers_stop_at_the_first_eos() -> None:
    from tca_attention.eval.methods import _until

    assert _until([5, 6, 2, 7, 2], {2}) == [5, 6]
    assert _until([5, 6], {2}) == [5, 6]
    assert _until([3, 5], {2, 3}) == []
