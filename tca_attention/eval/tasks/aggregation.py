"""Aggregation across the whole context: common-words and frequent-words extraction.

common_words: a numbered list of real English words (from the essays); ten words appear many
times, every other word a few times; report the ten most common.
frequent_words: a text of made-up "coded" words whose counts fall off as 1/rank (Zipf,
exponent ALPHA); report the three most frequent. Counts are deterministic, not sampled, so the
ranking of the answers is strict.
"""
from __future__ import annotations

import math
import random
import re
from functools import lru_cache

from ..schema import Sample
from .base import TaskContext, fit_length, sample_id

N_COMMON = 10
COMMON_SHARE = 0.25  # of list entries taken by the common words
N_FREQUENT = 3
ALPHA = 1.0


@lru_cache(maxsize=4)
def essay_vocabulary(text: str) -> tuple[str, ...]:
    """Distinct lowercase alphabetic words of 4 to 10 letters, sorted."""
    return tuple(sorted(set(w for w in re.findall(r"(?<![A-Za-z'])[a-z]{4,10}(?![A-Za-z'])", text))))


def common_counts(entries: int, vocab_size: int) -> tuple[int, int, int]:
    """(times each common word appears, times each rare word appears, number of rare words)."""
    rare_total = entries - max(N_COMMON, int(entries * COMMON_SHARE))
    per_rare = max(2, math.ceil(rare_total / max(1, vocab_size - N_COMMON)))
    n_rare = max(1, rare_total // per_rare)
    per_common = max(per_rare + 2, (entries - n_rare * per_rare) // N_COMMON)
    return per_common, per_rare, n_rare


def common_words(ctx: TaskContext, length: int, index: int) -> Sample:
    task = "common_words"
    seed_rng = ctx.rng(task, length, index)
    vocab = list(essay_vocabulary(ctx.haystack.text))
    seed_rng.shuffle(vocab)
    shuffle_seed = seed_rng.randrange(2**32)
    common = vocab[:N_COMMON]
    header = (
        "Below is a numbered list of words. Some of the words appear many times in the list, "
        "the others only a few times.\n"
    )

    def make(entries: int) -> Sample:
        per_common, per_rare, n_rare = common_counts(entries, len(vocab))
        rare = vocab[N_COMMON : N_COMMON + n_rare]
        words = [w for w in common for _ in range(per_common)] + [w for w in rare for _ in range(per_rare)]
        random.Random(shuffle_seed).shuffle(words)
        context = header + "\n".join(f"{i + 1}. {w}" for i, w in enumerate(words))
        return Sample(
            id=sample_id(task, length, index), task=task, length=length, context=context,
            question="What are the 10 most common words in the list above?",
            answer_prefix="The 10 words that appear most often in the list are:",
            answers=tuple(common), max_new_tokens=96,
            metadata={"per_common": per_common, "per_rare": per_rare, "n_rare": n_rare},
        )

    return fit_length(make, length, ctx.fmt, guess=length // 4)


def coded_word(rng: random.Random) -> str:
    cons, vows = "bcdfghjklmnprstvwz", "aeiou"
    return "".join(rng.choice(cons) + rng.choice(vows) for _ in range(rng.randint(2, 3)))


def zipf_counts(top: int) -> list[int]:
    """Counts floor(top / rank**ALPHA) for ranks until they reach 1."""
    counts: list[int] = []
    rank = 1
    while True:
        c = int(top / rank**ALPHA)
        if c < 1:
            break
        counts.append(c)
        rank += 1
    return counts


def frequent_words(ctx: TaskContext, length: int, index: int) -> Sample:
    task = "frequent_words"
    rng = ctx.rng(task, length, index)
    # Distinct coded words; the Zipf ranks use at most one per background token.
    vocab: list[str] = []
    seen: set[str] = set()
    while len(vocab) < length // 2 + 16:
        w = coded_word(rng)
        if w not in seen:
            seen.add(w)
            vocab.append(w)
    shuffle_seed = rng.randrange(2**32)
    header = "Read the following coded text and track how often each coded word appears.\n"

    def make(top: int) -> Sample:
        counts = zipf_counts(top)
        if len(counts) > len(vocab):
            raise ValueError(f"frequent_words: vocabulary too small for length {length}")
        words = [vocab[r] for r, c in enumerate(counts) for _ in range(c)]
        random.Random(shuffle_seed).shuffle(words)
        context = header + " ".join(words)
        return Sample(
            id=sample_id(task, length, index), task=task, length=length, context=context,
            question="What are the three most frequently used coded words in the text above?",
            answer_prefix="The three most frequently used coded words in the text above are:",
            answers=tuple(vocab[:N_FREQUENT]), max_new_tokens=40,
            metadata={"counts_top4": counts[:4]},
        )

    return fit_length(make, length, ctx.fmt, guess=max(4, length // 20))
