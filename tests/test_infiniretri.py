"""InfiniRetri's retrieval core: phrase scores, sentence selection, the chunk loop."""
from __future__ import annotations

import pytest
import torch
from tiny_models import tiny

from tca_attention.integration.probe import ModelProbe
from tca_attention.methods import infiniretri as ir


def test_phrase_scores_hand_built():
    attn = torch.zeros(2, 10)
    attn[0, 5] = 1.0  # row 0 looks at token 5
    attn[1, 0] = 1.0  # row 1 at token 0
    w = torch.tensor([2.0, 1.0])
    s = ir.phrase_scores(attn, w, phrase=4)  # window [c - 2, c + 1]
    want = torch.zeros(10, dtype=torch.float64)
    want[4:8] = 4.0  # tokens whose window covers 5, weight 2^2
    want[0:3] += 1.0  # tokens whose window covers 0
    assert torch.equal(s, want)
    assert torch.equal(ir.phrase_scores(attn, w, phrase=1), (w[:, None] ** 2 * attn).sum(0).double())


def test_sentences_and_selection():
    ends = ir.sentence_ends(["The", " cat", " sat", ".", " It", " ran", "!", " Then", "\n\n", " end"])
    assert ends == [False, False, False, True, False, False, True, False, True, False]
    sent = ir.sentence_of(ends)
    assert sent.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 3]
    scores = torch.tensor([0, 0, 0, 0, 0, 5.0, 0, 0, 0, 3.0])
    assert ir.select(scores, sent, 1).tolist() == [False] * 4 + [True] * 3 + [False] * 3
    assert ir.select(scores, sent, 2).tolist() == [False] * 4 + [True] * 3 + [False] * 2 + [True]
    assert ir.select(torch.zeros(10), sent, 1).tolist() == [True] * 4 + [False] * 6  # ties: the earlier token


class _Needle:
    """A probe whose one layer attends from every query only to tokens with id `needle`."""

    def __init__(self, needle: int) -> None:
        self.model = torch.nn.Linear(1, 1)
        self.needle, self.calls = needle, []

    def observe(self, input_ids, observer):
        ids = input_ids[0]
        L = ids.numel()
        self.calls.append(L)
        k = torch.zeros(1, 1, L, 4)
        k[0, 0, ids == self.needle, 0] = 50.0
        q = torch.zeros(1, 2, L, 4)
        q[..., 0] = 1.0
        observer(0, q, k, k, 1.0)


def test_the_chunk_loop_retains_the_needles_sentence_across_chunks():
    words = [10, 11, 12, 13, 1]  # 1 ends a sentence
    context = words * 8
    context[17] = 99  # the needle, in sentence 3 (tokens 15..19)
    ends = [t == 1 for t in context]
    probe = _Needle(99)
    cfg = ir.InfiniRetri(chunk=12, topk=1, phrase=1)
    kept, report = ir.retain(probe, cfg, prefix=[5], context=context, ends=ends, suffix=[7, 8, 9], question=(0, 2))
    assert kept == context[15:20]
    assert report["retained_tokens"] == 5 and [s["read"] for s in report["steps"]] == [12, 12 + 5, 5 + 12, 5 + 4]
    assert probe.calls == [1 + 12 + 3, 1 + 17 + 3, 1 + 17 + 3, 1 + 9 + 3]


def test_full_budget_retains_everything_and_the_prompt_is_unchanged():
    """topk >= the context and one chunk: the retained context is the context, so generation from
    it equals plain dense generation."""
    model = tiny("llama").float()
    gen = torch.Generator().manual_seed(3)
    prefix, context, suffix = [1, 2], torch.randint(3, 97, (60,), generator=gen).tolist(), [4, 5, 6]
    kept, report = ir.retain(ModelProbe(model), ir.InfiniRetri(chunk=64, topk=64, phrase=8), prefix, context,
                             [False] * 59 + [True], suffix, (0, 2))
    assert kept == context and report["kept_fraction"] == 1.0


def test_real_attention_keeps_the_sentences_the_question_reads():
    """On a tiny model, with topk of a few tokens, fewer tokens are retained than read, and whole
    sentences only."""
    model = tiny("llama").float()
    gen = torch.Generator().manual_seed(4)
    context = torch.randint(3, 97, (90,), generator=gen).tolist()
    ends = [i % 9 == 8 for i in range(90)]
    kept, report = ir.retain(ModelProbe(model), ir.InfiniRetri(chunk=30, topk=3, phrase=4), [1], context, ends,
                             [4, 5, 6, 7], (1, 3))
    assert 0 < len(kept) < 90 and len(kept) % 9 == 0  # whole sentences of 9 tokens
    assert report["kept_fraction"] == len(kept) / 90


@pytest.mark.parametrize("bad", [dict(chunk=0), dict(topk=0), dict(phrase=0)])
def test_bad_knobs_raise(bad):
    with pytest.raises(ValueError):
        ir.InfiniRetri(**bad)


def test_bad_spans_raise():
    with pytest.raises(ValueError, match="question span"):
        ir.retain(_Needle(1), ir.InfiniRetri(), [1], [2, 3], [False, True], [4], (0, 2))
    with pytest.raises(ValueError, match="sentence marks"):
        ir.retain(_Needle(1), ir.InfiniRetri(), [1], [2, 3], [True], [4], (0, 1))


def test_locate_tolerates_merged_edge_tokens():
    assert ir.locate([1, 2, 3, 4, 5, 6], [9, 3, 4, 5]) == (2, 5)  # first token merged with its neighbour
    assert ir.locate([1, 2, 3, 4, 5, 6], [2, 3, 4, 5]) == (1, 5)
    assert ir.locate([1, 2, 3, 4, 3, 4], [3, 4], start=3) == (4, 6)
    with pytest.raises(ValueError, match="not found"):
        ir.locate([1, 2, 3], [7, 8, 9, 10])


def test_through_the_eval(tmp_path, smol_tokenizer, monkeypatch):
    """`tca eval` runs it: a budget keeping everything answers as full attention does; a small one
    keeps a fraction of the prompt (what the answer's KV holds) and says what it read."""
    from test_eval_pipeline import tiny_llama

    from tca_attention.eval.methods import ModelBackend
    from tca_attention.eval.runner import EvalConfig, evaluate

    monkeypatch.setenv("TCA_CACHE_DIR", str(tmp_path / "cache"))
    backend = ModelBackend("tiny-llama", model=tiny_llama(len(smol_tokenizer)), tokenizer=smol_tokenizer)
    everything, small = "infiniretri:chunk=4096,topk=100000", "infiniretri:chunk=256,topk=16,phrase=4"
    cfg = EvalConfig(model="tiny-llama", methods=("full", everything, small), tasks=("niah_single",),
                     lengths=(768,), samples=1)
    by = {r.method: r for r in evaluate(cfg, backend, tmp_path, progress=False)}
    assert by[everything].prediction == by["full"].prediction and by[everything].kept_fraction == 1.0
    r = by[small]
    assert 0 < r.kept_fraction < 0.8 and r.kv_bytes < r.dense_kv_bytes
    steps = r.metadata["retrieval"]["steps"]
    assert len(steps) >= 2 and all(s["retained"] < s["read"] for s in steps)
    with pytest.raises(ValueError, match="not an attention method"):
        from tca_attention.integration import enable

        enable(tiny("llama"), ir.InfiniRetri())


def test_eval_batch_equals_single_runs(tmp_path, smol_tokenizer, monkeypatch):
    """Retrieval is per sample; the retained prompts are then left-padded into one dense batch:
    the same answers and kept fractions as one sample at a time."""
    from test_eval_pipeline import tiny_llama

    from tca_attention.eval.methods import ModelBackend
    from tca_attention.eval.runner import EvalConfig, evaluate

    monkeypatch.setenv("TCA_CACHE_DIR", str(tmp_path / "cache"))
    backend = ModelBackend("tiny-llama", model=tiny_llama(len(smol_tokenizer)), tokenizer=smol_tokenizer)
    spec = "infiniretri:chunk=128,topk=8,phrase=4"
    runs = {}
    for bs in (1, 2):
        cfg = EvalConfig(model="tiny-llama", methods=(spec,), tasks=("niah_single",), lengths=(512,), samples=2,
                         batch_size=bs)
        runs[bs] = sorted(evaluate(cfg, backend, tmp_path / f"b{bs}", progress=False), key=lambda r: r.sample_id)
    for one, two in zip(runs[1], runs[2]):
        assert one.prediction == two.prediction and one.kept_fraction == two.kept_fraction < 1


def test_perplexity_does_not_apply_and_the_run_completes(tmp_path, smol_tokenizer, monkeypatch):
    """A perplexity sample has no question to retrieve for: the run leaves that task out for
    InfiniRetri (not an error after every other task ran), and counts nothing left to do."""
    from test_eval_pipeline import tiny_llama

    from tca_attention import registry
    from tca_attention.eval.methods import ModelBackend
    from tca_attention.eval.runner import EvalConfig, evaluate, pending

    assert registry.questions_only("infiniretri:topk=8") and not registry.questions_only("tca:tau=0.7+zerotuning")
    monkeypatch.setenv("TCA_CACHE_DIR", str(tmp_path / "cache"))
    backend = ModelBackend("tiny-llama", model=tiny_llama(len(smol_tokenizer)), tokenizer=smol_tokenizer)
    spec = "infiniretri:chunk=128,topk=8,phrase=4"
    cfg = EvalConfig(model="tiny-llama", methods=("full", spec), tasks=("niah_single", "perplexity"),
                     lengths=(512,), samples=1)
    tasks = {(r.method, r.task) for r in evaluate(cfg, backend, tmp_path, progress=False)}
    assert tasks == {("full", "niah_single"), ("full", "perplexity"), (spec, "niah_single")}
    assert pending(cfg, tmp_path) == 0
    only_ppl = EvalConfig(model="tiny-llama", methods=(spec,), tasks=("perplexity",), lengths=(512,), samples=1)
    with pytest.raises(ValueError, match="none of the tasks perplexity applies"):
        pending(only_ppl, tmp_path)
