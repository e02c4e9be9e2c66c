"""Needle-in-a-haystack family: single, multi-key, multi-value and multi-query needles.

Needles are sentences "The special magic number for <key> is <value>." placed at sentence
boundaries of real essays. The single-needle task cycles through DEPTHS (sample index modulo
the number of depths), which the needle heatmap plots against length.
"""
from __future__ import annotations

import random

from ..schema import Sample
from .base import TaskContext, fit_length, insert_sentences, sample_id
from .words import ADJECTIVES, NOUNS

DEPTHS: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
N_DISTRACTORS = 3  # multi-key: other keys with their own numbers
N_VALUES = 4  # multi-value: numbers for the one key
N_QUERIES = 4  # multi-query: keys asked for at once


def needle(key: str, value: str) -> str:
    return f"The special magic number for {key} is {value}."


def draw_keys(rng: random.Random, n: int) -> list[str]:
    keys: list[str] = []
    while len(keys) < n:
        k = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if k not in keys:
            keys.append(k)
    return keys


def draw_values(rng: random.Random, n: int) -> list[str]:
    values: list[str] = []
    while len(values) < n:
        v = str(rng.randrange(1_000_000, 10_000_000))
        if v not in values:
            values.append(v)
    return values


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _build(
    ctx: TaskContext,
    task: str,
    length: int,
    index: int,
    needles: list[str],
    depths: list[float],
    question: str,
    answer_prefix: str,
    answers: list[str],
    max_new_tokens: int,
    extra: dict,
    start: int,
) -> Sample:
    hay = ctx.haystack

    def build(n_tokens: int) -> Sample:
        context, positions = insert_sentences(hay.slice(start, n_tokens), needles, depths)
        meta = {"depths": depths, "needles": needles, "positions": positions, **extra}
        return Sample(
            id=sample_id(task, length, index), task=task, length=length, context=context,
            question=question, answer_prefix=answer_prefix, answers=tuple(answers),
            max_new_tokens=max_new_tokens, metadata=meta,
        )

    return fit_length(build, length, ctx.fmt, guess=length - 100)


def single(ctx: TaskContext, length: int, index: int) -> Sample:
    task = "niah_single"
    rng = ctx.rng(task, length, index)
    (key,), (value,) = draw_keys(rng, 1), draw_values(rng, 1)
    depth = DEPTHS[index % len(DEPTHS)]
    return _build(
        ctx, task, length, index, [needle(key, value)], [depth],
        f"What is the special magic number for {key} mentioned in the text above?",
        f"The special magic number for {key} mentioned in the text above is",
        [value], 24, {"depth": depth, "key": key}, ctx.haystack.start_token(rng),
    )


def multikey(ctx: TaskContext, length: int, index: int) -> Sample:
    task = "niah_multikey"
    rng = ctx.rng(task, length, index)
    keys, values = draw_keys(rng, 1 + N_DISTRACTORS), draw_values(rng, 1 + N_DISTRACTORS)
    depths = [round(rng.uniform(0.05, 0.95), 3) for _ in keys]
    return _build(
        ctx, task, length, index, [needle(k, v) for k, v in zip(keys, values)], depths,
        f"What is the special magic number for {keys[0]} mentioned in the text above?",
        f"The special magic number for {keys[0]} mentioned in the text above is",
        [values[0]], 24, {"depth": depths[0], "key": keys[0]}, ctx.haystack.start_token(rng),
    )


def multivalue(ctx: TaskContext, length: int, index: int) -> Sample:
    task = "niah_multivalue"
    rng = ctx.rng(task, length, index)
    (key,), values = draw_keys(rng, 1), draw_values(rng, N_VALUES)
    depths = [round(rng.uniform(0.05, 0.95), 3) for _ in values]
    return _build(
        ctx, task, length, index, [needle(key, v) for v in values], depths,
        f"What are all the special magic numbers for {key} mentioned in the text above?",
        f"The special magic numbers for {key} mentioned in the text above are",
        values, 64, {"key": key}, ctx.haystack.start_token(rng),
    )


def multiquery(ctx: TaskContext, length: int, index: int) -> Sample:
    task = "niah_multiquery"
    rng = ctx.rng(task, length, index)
    keys, values = draw_keys(rng, N_QUERIES), draw_values(rng, N_QUERIES)
    depths = [round(rng.uniform(0.05, 0.95), 3) for _ in keys]
    return _build(
        ctx, task, length, index, [needle(k, v) for k, v in zip(keys, values)], depths,
        f"What are the special magic numbers for {_join(keys)} mentioned in the text above?",
        f"The special magic numbers for {_join(keys)} mentioned in the text above are",
        values, 64, {"keys": keys}, ctx.haystack.start_token(rng),
    )
