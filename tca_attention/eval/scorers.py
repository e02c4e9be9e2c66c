"""Scorers: prediction text and gold answers -> score in [0, 1] (RULER-style string match).

Matching is case-insensitive on whitespace-normalised text, and an answer only counts where it
stands as a whole word or number: "123456" is not found in "1234567".

- exact:    the prediction (its first line, trailing punctuation stripped) equals an answer.
- contains: every answer occurs in the prediction (1 or 0); extra text is allowed.
- any:      at least one answer occurs (1 or 0).
- recall:   the fraction of the answers that occur (partial credit).
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

from .registry import Registry

Scorer = Callable[[str, Sequence[str]], float]
SCORERS: Registry[Scorer] = Registry("scorer")


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


def occurs(answer: str, prediction: str) -> bool:
    """Whether `answer` occurs in `prediction` as a whole word/number (case-insensitive)."""
    a, p = normalize(answer), normalize(prediction)
    if not a:
        return False
    pattern = r"(?<![0-9a-z])" + re.escape(a) + r"(?![0-9a-z])"
    return re.search(pattern, p) is not None


@SCORERS.register("exact")
def exact(prediction: str, answers: Sequence[str]) -> float:
    lines = prediction.strip().splitlines()
    first = normalize(lines[0]).strip(" .,;:!\"'") if lines else ""
    return float(any(first == normalize(a) for a in answers))


@SCORERS.register("contains")
def contains(prediction: str, answers: Sequence[str]) -> float:
    return float(bool(answers) and all(occurs(a, prediction) for a in answers))


@SCORERS.register("any")
def any_of(prediction: str, answers: Sequence[str]) -> float:
    return float(any(occurs(a, prediction) for a in answers))


@SCORERS.register("recall")
def recall(prediction: str, answers: Sequence[str]) -> float:
    if not answers:
        return 0.0
    return sum(occurs(a, prediction) for a in answers) / len(answers)


def score(name: str, prediction: str, answers: Sequence[str]) -> float:
    return SCORERS.get(name)(prediction, answers)
