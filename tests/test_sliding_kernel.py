"""`enable(..., sliding_kernel=True)` (the default): a model's sliding-window layers prefilled by
the engine's windowed kernel equal transformers' SDPA over its (L, L) sliding mask
(`sliding_kernel=False`), padded batches included, on both backends (Triton under the
interpreter on a CPU); short prompts and decode stay with SDPA."""
from __future__ import annotations

import pytest
import torch

from tca_attention.engine import dispatch
from tca_attention.engine.plan import sliding_window_plan
from tca_attention.integration import enable
from tca_attention.integration.hf import key_start_from_diagonal
from tiny_models import tiny


def _sliding_mask(B: int, L: int, window: int, pad: list[int]) -> torch.Tensor:
    j, k = torch.arange(L)[:, None], torch.arange(L)[None, :]
    allowed = (k <= j) & (k > j - window)
    real = torch.arange(L)[None, :] >= torch.tensor(pad)[:, None]  # (B, L) left padding
    return (allowed[None] & real[:, None, :])[:, None]  # (B, 1, L, L)


def test_plan_equals_masked_attention_and_key_start_from_the_diagonal():
    B, H, KV, L, D, W = 2, 4, 2, 37, 16, 9
    q, k, v = torch.randn(B, H, L, D), torch.randn(B, KV, L, D), torch.randn(B, KV, L, D)
    mask = _sliding_mask(B, L, W, [0, 5])
    key_start = key_start_from_diagonal(mask, B, L, q.device)
    assert key_start.tolist() == [0, 5]
    assert key_start_from_diagonal(None, B, L, q.device).tolist() == [0, 0]
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    assert key_start_from_diagonal(additive, B, L, q.device).tolist() == [0, 5]
    plan = sliding_window_plan(B, KV, L, W, key_start)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1), attn_mask=mask, scale=0.3)
    for backend in ("reference", "triton"):
        out = dispatch.sparse_prefill(q, k, v, plan, 0.3, backend=backend).transpose(1, 2)  # (B, H, L, D)
        torch.testing.assert_close(out[0], expected[0], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(out[1, :, 5:], expected[1, :, 5:], atol=2e-5, rtol=1e-4)  # real queries


def test_right_padding_and_bad_window_are_refused():
    mask = _sliding_mask(1, 8, 3, [0])
    mask[0, 0, 7, 7] = False  # a hole after the first real token: right padding
    with pytest.raises(ValueError, match="left padding only"):
        key_start_from_diagonal(mask, 1, 8, torch.device("cpu"))
    with pytest.raises(ValueError, match="window must be >= 1"):
        sliding_window_plan(1, 1, 8, 0, torch.zeros(1, dtype=torch.long))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gemma3_with_the_kernel_equals_sdpa(backend):
    """Tiny Gemma3 (window 40, layers sliding / full / sliding), a left-padded batch of prompts
    longer than the window: the same logits, and the same greedy continuation (decode steps and
    short prompts go through SDPA either way); the kernel is the session's default."""
    model = tiny("gemma3")
    L, pad = 96, [0, 11]
    ids = torch.randint(1, 97, (2, L))
    mask = (torch.arange(L)[None, :] >= torch.tensor(pad)[:, None]).long()
    calls = []
    with torch.no_grad():
        with enable(model, None, sliding_kernel=False) as session:
            session._sliding_prefill = lambda call: calls.append(("off", call.layer_idx))
            want = model(input_ids=ids, attention_mask=mask).logits
            want_gen = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        assert calls == []
        with enable(model, None, backend=backend) as session:
            real = session._sliding_prefill
            session._sliding_prefill = lambda call: calls.append(call.layer_idx) or real(call)
            got = model(input_ids=ids, attention_mask=mask).logits
            got_gen = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert sorted(set(calls)) == [0, 2]  # the two sliding layers, never the full one
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1, pad[1]:], want[1, pad[1]:], atol=1e-4, rtol=1e-4)
    assert torch.equal(got_gen, want_gen)


def test_short_prompts_stay_with_sdpa():
    model = tiny("gemma3")
    calls = []
    with torch.no_grad(), enable(model, None, sliding_kernel=True) as session:
        session._sliding_prefill = lambda call: calls.append(call)
        model(input_ids=torch.randint(1, 97, (1, 40)))  # not longer than the window
    assert calls == []


def test_tca_and_static_decode_with_the_kernel():
    """With TCA on the full layer, and through the static (CUDA-graph) decode path, the kernel
    changes nothing but how the sliding layers' prompt attention is computed."""
    from tca_attention.methods.state import ModelIdentity
    from tca_attention.methods.tca.config import TCAConfig
    from tca_attention.methods.tca.method import TCA
    from test_batch_invariance import B_, W_, mixed_budgets

    model = tiny("gemma3")
    L, pad = 96, [0, 11]
    ids = torch.randint(1, 97, (2, L))
    mask = (torch.arange(L)[None, :] >= torch.tensor(pad)[:, None]).long()
    method = TCA(mixed_budgets(TCAConfig(block_size=B_, window=W_), ModelIdentity.of(model)), dense_below=0)
    runs, calls = {}, []
    with torch.no_grad():
        for kernel in (False, True):
            with enable(model, method, backend="triton", sliding_kernel=kernel) as session:
                if kernel:
                    real = session._sliding_prefill
                    session._sliding_prefill = lambda call: calls.append(call.layer_idx) or real(call)
                runs[kernel] = (session.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False),
                                session.generate(ids, attention_mask=mask, max_new_tokens=4, cuda_graph=True))
    assert sorted(set(calls)) == [0, 2]
    assert torch.equal(runs[True][0], runs[False][0]) and torch.equal(runs[True][1], runs[False][1])


def test_eval_with_the_kernel(tmp_path, smol_tokenizer, monkeypatch):
    """`tca eval --sliding-kernel`: a run folder of its own, the kernel used, the same answers."""
    from tca_attention.eval.methods import ModelBackend
    from tca_attention.eval.runner import EvalConfig, evaluate
    from tca_attention.integration.hf import Session

    monkeypatch.setenv("TCA_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    real = Session._sliding_prefill
    monkeypatch.setattr(Session, "_sliding_prefill", lambda self, call: calls.append(call.layer_idx) or real(self, call))
    model = tiny("gemma3", vocab_size=len(smol_tokenizer))
    preds = {}
    for kernel in (False, True):
        cfg = EvalConfig(model="tiny-gemma3", methods=("full",), tasks=("niah_single", "perplexity"), lengths=(256,),
                         samples=1, sliding_kernel=kernel)
        backend = ModelBackend("tiny-gemma3", model=model, tokenizer=smol_tokenizer, sliding_kernel=kernel)
        run_dir = tmp_path / cfg.run_name()
        preds[kernel] = {(r.task, r.prediction, round(r.nll or 0.0, 4)) for r in evaluate(cfg, backend, run_dir,
                                                                                             progress=False)}
        assert ("sliding-kernel" in cfg.run_name()) == kernel
    assert sorted(set(calls)) == [0, 2]
    assert preds[True] == preds[False]
