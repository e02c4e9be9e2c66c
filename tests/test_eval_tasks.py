"""Task generators with the real SmolLM2 tokenizer: answers where stated, lengths on target,
determinism in the seed."""
from __future__ import annotations

from collections import Counter

import pytest

from tca_attention.eval.prompt import PromptFormat
from tca_attention.eval.tasks import TASKS, TaskContext, generate
from tca_attention.eval.tasks import aggregation, niah, variable_tracking
from tca_attention.eval.tasks.base import insert_sentences

LENGTHS = (1024, 4096, 8192)


@pytest.fixture(scope="module")
def ctx(smol_tokenizer) -> TaskContext:
    return TaskContext(PromptFormat(smol_tokenizer), seed=0)


@pytest.mark.parametrize("task", TASKS.names())
def test_lengths_hit_the_target_within_one_percent(ctx: TaskContext, task: str) -> None:
    for length in LENGTHS:
        for index in range(2):
            s = generate(ctx, task, length, index)
            n = ctx.fmt.count(s)
            assert abs(n - length) <= 0.01 * length, (task, length, index, n)
            assert s.length == length and s.task == task and s.id == f"{task}-{length}-{index:04d}"


def test_raw_prompts_fit_too(smol_tokenizer) -> None:
    raw = TaskContext(PromptFormat(smol_tokenizer, use_chat_template=False), seed=0)
    for task in ("niah_single", "common_words"):
        s = generate(raw, task, 4096, 0)
        text = raw.fmt.render(s)
        assert "<|im_start|>" not in text and text.endswith(s.answer_prefix)
        assert abs(raw.fmt.count(s) - 4096) <= 41


@pytest.mark.parametrize("task", TASKS.names())
def test_same_seed_same_sample_other_seed_other_sample(ctx: TaskContext, smol_tokenizer, task: str) -> None:
    a = generate(ctx, task, 2048, 3)
    fresh = TaskContext(PromptFormat(smol_tokenizer), seed=0)
    assert generate(fresh, task, 2048, 3) == a
    other = TaskContext(PromptFormat(smol_tokenizer), seed=1)
    b = generate(other, task, 2048, 3)
    assert (b.context, b.answers) != (a.context, a.answers)
    assert generate(ctx, task, 2048, 4).context != a.context


def test_prompts_use_the_chat_template(ctx: TaskContext) -> None:
    s = generate(ctx, "niah_single", 1024, 0)
    text = ctx.fmt.render(s)
    assert text.startswith("<|im_start|>system") and "<|im_start|>assistant\n" in text
    assert text.endswith(s.answer_prefix)
    ppl = generate(ctx, "perplexity", 1024, 0)
    assert ctx.fmt.render(ppl) == ppl.context  # raw text, no template


@pytest.mark.parametrize("task", ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"])
def test_needles_are_exactly_where_stated(ctx: TaskContext, task: str) -> None:
    for length in (2048, 8192):
        for index in range(5):
            s = generate(ctx, task, length, index)
            meta = s.metadata
            for sentence, pos, depth in zip(meta["needles"], meta["positions"], meta["depths"]):
                assert s.context[pos : pos + len(sentence)] == sentence
                assert s.context.count(sentence) == 1
                assert abs(pos / len(s.context) - depth) < 0.03, (task, depth, pos / len(s.context))
            for answer in s.answers:
                assert s.context.count(answer) == 1
                assert any(answer in n for n in meta["needles"])
            key = meta.get("key") or meta["keys"][0]
            assert key in s.question and key in s.answer_prefix
    singles = [generate(ctx, "niah_single", 2048, i).metadata["depth"] for i in range(len(niah.DEPTHS))]
    assert singles == list(niah.DEPTHS)


def test_variable_tracking_chain_resolves_to_the_answers(ctx: TaskContext) -> None:
    s = generate(ctx, "variable_tracking", 4096, 0)
    meta = s.metadata
    assert len(s.answers) == variable_tracking.N_HOPS + 1
    # follow the assignments in the order they appear in the context
    order = sorted(zip(meta["positions"], meta["statements"]))
    bound: dict[str, str] = {}
    for pos, stmt in order:
        assert s.context[pos : pos + len(stmt)] == stmt
        name, rhs = stmt[4:-1].split(" = ")
        bound[name] = bound[rhs[4:]] if rhs.startswith("VAR ") else rhs
    assert sorted(n for n, v in bound.items() if v == meta["value"]) == sorted(s.answers)


def test_common_words_are_the_most_common(ctx: TaskContext) -> None:
    s = generate(ctx, "common_words", 4096, 1)
    entries = [line.split(". ", 1)[1] for line in s.context.splitlines()[1:]]
    counts = Counter(entries)
    top = {w for w, _ in counts.most_common(aggregation.N_COMMON)}
    assert top == set(s.answers)
    assert min(counts[w] for w in s.answers) > max(c for w, c in counts.items() if w not in s.answers)


def test_frequent_words_are_the_most_frequent(ctx: TaskContext) -> None:
    s = generate(ctx, "frequent_words", 4096, 2)
    counts = Counter(s.context.splitlines()[1].split())
    ranked = [w for w, _ in counts.most_common(aggregation.N_FREQUENT + 1)]
    assert ranked[: aggregation.N_FREQUENT] == list(s.answers)
    c = [counts[w] for w in ranked]
    assert c[0] > c[1] > c[2] > c[3]


def test_qa_answer_is_a_span_stated_once(ctx: TaskContext) -> None:
    for index in range(6):
        s = generate(ctx, "qa", 4096, index)
        (answer,) = s.answers
        start = s.metadata["answer_start"]
        assert s.context[start : start + len(answer)] == answer
        assert s.context.count(answer) == 1
        org = s.metadata["fact"].split(" was founded")[0].removeprefix("The ")
        assert org in s.question


def test_perplexity_sample_is_raw_text(ctx: TaskContext) -> None:
    s = generate(ctx, "perplexity", 4096, 0)
    assert s.kind == "nll" and not s.use_template and s.max_new_tokens == 0
    assert s.metadata["nll_tokens"] == 512 and s.context in ctx.haystack.text


def test_insert_sentences_positions_and_order() -> None:
    text = "One. Two. Three. Four. Five. Six."
    out, pos = insert_sentences(text, ["B!", "A!", "C!"], [0.5, 0.0, 1.0])
    assert out.startswith("A! One.") and out.endswith("Six. C!")
    for s, p in zip(["B!", "A!", "C!"], pos):
        assert out[p : p + len(s)] == s
    assert out.replace("A! ", "").replace(" C!", "").replace("B! ", "") == text
