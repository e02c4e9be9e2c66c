"""Smoke run of the real pipeline (core methods, integration, cache, report) on a tiny random
Llama: plumbing only, accuracy is meaningless with random weights."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tca_attention.eval.methods import ModelBackend
from tca_attention.eval.report import write_report
from tca_attention.eval.runner import EvalConfig, evaluate


def tiny_llama(vocab_size: int, device: str = "cpu"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      attn_implementation="sdpa")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return LlamaForCausalLM(cfg).to(device, dtype).eval()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_every_method_runs_through_the_real_pipeline(tmp_path: Path, smol_tokenizer, device: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from tca_attention.methods.tca.config import TCAConfig

    monkeypatch.setenv("TCA_CACHE_DIR", str(tmp_path / "cache"))  # the core's budget cache

    if device == "cuda" and not torch.cuda.is_available():
        pytest.fail("the gpu-marked test needs CUDA")
    model = tiny_llama(len(smol_tokenizer), device)
    backend = ModelBackend("tiny-llama", device=device, model=model, tokenizer=smol_tokenizer,
                           tca_config=TCAConfig(block_size=16, window=64, tau=0.9), calibration_length=512)
    matched = "streaming:block_size=16@match=tca:tau=0.5"
    cfg = EvalConfig(model="tiny-llama", methods=("full", "tca:tau=0.5", matched),
                     tasks=("niah_single", "perplexity"), lengths=(768,), samples=1)
    results = evaluate(cfg, backend, tmp_path, progress=False)
    assert len(results) == 6
    by = {(r.method, r.task): r for r in results}
    assert (tmp_path / "budgets.json").exists() and list((tmp_path / "cache" / "budgets").glob("*.json"))
    assert all(by[("full", t)].kept_fraction == 1.0 for t in cfg.tasks)
    tca = [by[("tca:tau=0.5", t)].kept_fraction for t in cfg.tasks]
    assert all(0.0 < f < 0.95 for f in tca)
    assert all(by[("tca:tau=0.5", t)].kv_bytes < by[("tca:tau=0.5", t)].dense_kv_bytes for t in cfg.tasks)
    stream = [by[(matched, t)] for t in cfg.tasks]
    assert all(r.metadata["window"] < 768 for r in stream)
    assert abs(sum(r.kept_fraction for r in stream) / 2 - sum(tca) / 2) < 0.05  # same KV budget as TCA
    nll = [r.nll for r in results if r.task == "perplexity"]
    assert len(nll) == 3 and all(x is not None and 0 < x < 20 for x in nll)
    assert all(r.prediction for r in results if r.task == "niah_single")  # something was generated
    files = write_report(results, tmp_path / "report")
    assert matched in files["report"].read_text()


@pytest.mark.slow
def test_real_smollm2_at_4k_and_8k(tmp_path: Path) -> None:
    """The real default model through every method at 4K and 8K (CPU: about 15-30 minutes,
    plus one calibration of about 8 minutes unless the core's budget cache has it)."""
    backend = ModelBackend("smollm2")
    cfg = EvalConfig(model="smollm2", methods=("full", "tca", "streaming:block_size=16@match=tca"), tasks=("niah_single",),
                     lengths=(4096, 8192), samples=2)
    results = evaluate(cfg, backend, tmp_path, progress=False)
    by = {(r.method, r.sample_id): r for r in results}
    assert len(by) == 12
    # measured 2026-11-22: full attention finds this needle (depth 30%) at 4K
    assert by[("full", "niah_single-4096-0001")].score == 1.0
    for L in (4096, 8192):
        tca = [by[("tca", f"niah_single-{L}-{i:04d}")].kept_fraction for i in range(2)]
        stream = [by[("streaming:block_size=16@match=tca", f"niah_single-{L}-{i:04d}")].kept_fraction
                  for i in range(2)]
        assert 0.0 < sum(tca) / 2 < 1.0
        assert abs(sum(stream) / 2 - sum(tca) / 2) < 0.02
