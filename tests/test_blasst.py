"""BLASST: the plan (dense blocks with in-loop skipping at lambda = threshold or scale_factor / length),
lambda 0 = dense attention on the model path, a far-below block skipped on the model path, the
skipped pairs in the session's kept fraction, alone = batched, and the registry (block 16)."""
from __future__ import annotations

import pytest
import torch

from tca_attention import registry
from tca_attention.engine.plan import BlockPlan
from tca_attention.methods.blasst import BLASST
from method_checks import assert_alone_equals_batched, assert_full_density_equals_dense


def test_plan_is_dense_with_skipping_at_lambda():
    B, H, KV, L, D = 3, 4, 2, 100, 8
    q, k = torch.randn(B, H, L, D), torch.randn(B, KV, L, D)
    ks = torch.tensor([0, 20, 90])
    plan = BLASST(scale_factor=5.0, block_size=16).plan(0, q, k, ks, 1.0)
    plan.validate(H, KV, L)
    dense = BlockPlan.dense(B, KV, L, ks, 16, 16)
    assert torch.equal(plan.indptr, dense.indptr) and torch.equal(plan.indices, dense.indices)  # every causal block
    torch.testing.assert_close(plan.skip_threshold, torch.tensor([5 / 100, 5 / 80, 5 / 10]))  # scale / real length
    assert plan.skip_dropped.shape == (B, H) and int(plan.skip_dropped.sum()) == 0
    fixed = BLASST(threshold=0.01, scale_factor=5.0, block_size=16).plan(0, q, k, ks, 1.0)
    assert fixed.skip_threshold.tolist() == pytest.approx([0.01] * 3)  # threshold wins over scale_factor
    off = BLASST(scale_factor=0.0, block_size=16).plan(0, q, k, ks, 1.0)
    assert off.skip_threshold is None and torch.equal(off.indices, dense.indices)  # the kernel's plain path
    assert BLASST(block_size=16).plan(0, q[:, :, :16], k[:, :, :16], torch.zeros(B, dtype=torch.long), 1.0) is None


def test_settings():
    for bad in ({"block_size": 24}, {"scale_factor": -1.0}, {"threshold": -0.1}, {"threshold": float("inf")},
                {"scale_factor": float("nan")}):
        with pytest.raises(ValueError):
            BLASST(**bad)
    d = BLASST()
    assert (d.scale_factor, d.threshold, d.block_size, d.name) == (1000.0, 0.0, 128, "blasst")
    assert d.decode_keep(0, 2).tolist() == [128, 128] and d.select_decode(0, None, None) is None


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_lambda_zero_equals_dense(arch):
    assert_full_density_equals_dense(arch, BLASST(scale_factor=0.0, block_size=16), steps_n=8, new_tokens=6)


def test_skipping_on_the_model_path_counts_in_the_kept_fraction():
    """A tiny llama with skipping: the session's kept fraction is the plan's attended pairs minus the
    pairs the kernel dropped, below 1 and growing as lambda shrinks. The random model's attention is
    nearly flat, so only lambda near 1 (or above: drop any block not raising the running max by
    ln lambda) drops much."""
    from tca_attention.integration import enable
    from tca_attention.integration.adapter import cache_kwargs
    from tiny_models import tiny

    model = tiny("llama").float()
    ids = torch.randint(0, 97, (1, 120), generator=torch.Generator().manual_seed(0))
    fractions = []
    with torch.no_grad():
        for lam in (3.0, 0.9, 1e-4):
            with enable(model, BLASST(threshold=lam, block_size=16)) as session:
                model(input_ids=ids, **cache_kwargs(session.new_cache()))
                fractions.append(session.prefill_report()["kept_fraction"])
    assert fractions[0] < fractions[1] <= fractions[2] <= 1.0
    assert fractions[0] < 0.5 and fractions[1] < 1.0


def test_sparse_model_run_alone_equals_batched():
    assert_alone_equals_batched(BLASST(threshold=0.9, block_size=16))


def test_registry_builds_it():
    m = registry.create("blasst:scale_factor=100,block_size=16")
    assert isinstance(m, BLASST) and m == BLASST(scale_factor=100.0, block_size=16)
    assert registry.normalize("blasst: block_size=16, threshold=0.010") == "blasst:threshold=0.01,block_size=16"
    assert registry.expand("blasst:scale_factor=10|1000") == ["blasst:scale_factor=10", "blasst:scale_factor=1000"]
    with pytest.raises(ValueError, match="declares no density knob"):
        registry.at_density("blasst", 0.5, 1000)


def test_eval_sweeps_the_threshold(tmp_path, smol_tokenizer, monkeypatch):
    from tca_attention.eval.methods import ModelBackend
    from tca_attention.eval.runner import EvalConfig, evaluate
    from test_eval_pipeline import tiny_llama

    monkeypatch.setenv("TCA_CACHE_DIR", str(tmp_path / "cache"))
    backend = ModelBackend("tiny-llama", device="cpu", model=tiny_llama(len(smol_tokenizer)), tokenizer=smol_tokenizer)
    cfg = EvalConfig(model="tiny-llama", methods=("blasst:threshold=3.0|1e-06,block_size=16",), tasks=("niah_single",),
                     lengths=(512,), samples=1)
    by = {r.method: r for r in evaluate(cfg, backend, tmp_path, progress=False)}
    hi, lo = (by[f"blasst:threshold={t},block_size=16"] for t in (3.0, 1e-06))
    assert hi.kept_fraction == lo.kept_fraction == 1.0  # the cache keeps everything
    a, b = hi.metadata["prefill_kept_fraction"], lo.metadata["prefill_kept_fraction"]
    assert 0 < a < b <= 1, (a, b)  # more skipped at the larger lambda
