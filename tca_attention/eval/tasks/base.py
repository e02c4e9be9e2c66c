"""Shared machinery of task generators: seeded RNG, the essay haystack, length fitting."""
from __future__ import annotations

import bisect
import hashlib
import logging
import random
import weakref
from dataclasses import dataclass
from typing import Callable, Sequence

from ..prompt import PromptFormat
from ..schema import Sample

log = logging.getLogger(__name__)

# A generated prompt must hit the target within this fraction (the acceptance bound is 1%).
LENGTH_TOLERANCE = 0.005


def rng_for(seed: int, *parts: object) -> random.Random:
    """A Random seeded from (seed, parts) through sha256: stable across runs and processes."""
    digest = hashlib.sha256(repr((seed,) + parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def sample_id(task: str, length: int, index: int) -> str:
    return f"{task}-{length}-{index:04d}"


class Haystack:
    """The essay corpus, tokenized once, sliced into background text by token counts."""

    def __init__(self, fmt: PromptFormat, text: str | None = None) -> None:
        if text is None:
            from ...data.corpus import essay_text

            text = essay_text()
        # Two copies so a slice may wrap around the end of the corpus.
        self.text = text + "\n\n" + text
        enc = fmt.tokenizer(self.text, add_special_tokens=False, return_offsets_mapping=True)
        self.offsets: list[tuple[int, int]] = [tuple(o) for o in enc["offset_mapping"]]
        self.n_tokens = len(self.offsets) // 2
        self._starts = [o[0] for o in self.offsets]

    def start_token(self, rng: random.Random) -> int:
        """A seeded start at the beginning of a sentence or paragraph."""
        tok = rng.randrange(self.n_tokens)
        char = self.offsets[tok][0]
        cut = min((i for i in (self.text.find(". ", char), self.text.find("\n", char)) if i >= 0), default=char)
        return min(bisect.bisect_left(self._starts, cut + 1), len(self.offsets) - 1)

    def slice(self, start: int, n_tokens: int) -> str:
        if n_tokens <= 0:
            return ""
        end = start + n_tokens - 1
        if end >= len(self.offsets):
            raise ValueError(f"the corpus is too short for {n_tokens} tokens of background")
        return self.text[self.offsets[start][0] : self.offsets[end][1]].strip()


def insert_sentences(text: str, sentences: Sequence[str], depths: Sequence[float]) -> tuple[str, list[int]]:
    """Insert each sentence at the sentence boundary nearest its depth (fraction of text).

    Returns the new text and the character offset of every inserted sentence in it (in the
    order given). Depths are fractions of the background's characters.
    """
    if len(sentences) != len(depths):
        raise ValueError("one depth per sentence")
    order = sorted(range(len(sentences)), key=lambda i: depths[i])
    pieces: list[str] = []
    positions = [0] * len(sentences)
    prev, out_len = 0, 0
    for i in order:
        cut = _boundary(text, depths[i])
        pieces.append(text[prev:cut])
        out_len += cut - prev
        before = "" if cut == 0 or text[cut - 1].isspace() else " "
        after = "" if cut == len(text) or text[cut].isspace() else " "
        positions[i] = out_len + len(before)
        piece = before + sentences[i] + after
        pieces.append(piece)
        out_len += len(piece)
        prev = cut
    pieces.append(text[prev:])
    return "".join(pieces), positions


def _boundary(text: str, depth: float) -> int:
    """Char index after the end of the sentence nearest depth * len(text)."""
    if depth <= 0.0 or not text:
        return 0
    if depth >= 1.0:
        return len(text)
    target = int(depth * len(text))
    best, best_dist = len(text), len(text)
    for sep in (". ", ".\n", "? ", "! ", "\n\n"):
        for pos in (text.rfind(sep, 0, target), text.find(sep, target)):
            if pos >= 0 and abs(pos + len(sep) - target) < best_dist:
                best, best_dist = pos + len(sep), abs(pos + len(sep) - target)
    return best


def fit_length(build: Callable[[int], Sample], target: int, fmt: PromptFormat, guess: int) -> Sample:
    """Find the size whose sample renders to `target` tokens (secant search on integers).

    `build(size)` must be deterministic and roughly monotone in size.
    """
    tol = max(1, int(target * LENGTH_TOLERANCE))
    pts: list[tuple[int, int]] = []
    best: tuple[int, Sample] | None = None
    size = max(1, guess)
    for _ in range(12):
        sample = build(size)
        n = fmt.count(sample)
        if best is None or abs(n - target) < best[0]:
            best = (abs(n - target), sample)
        if abs(n - target) <= tol:
            return sample
        pts.append((size, n))
        if len(pts) >= 2 and pts[-1][1] != pts[-2][1]:
            (s0, n0), (s1, n1) = pts[-2], pts[-1]
            slope = (n1 - n0) / (s1 - s0) if s1 != s0 else 1.0
            slope = slope if slope > 0 else 1.0
        else:
            slope = n / size if size else 1.0
        new = max(1, int(round(size + (target - n) / slope)))
        size = new if new != size else size + (1 if n < target else -1)
    assert best is not None
    log.warning("length fit for %s missed the target %d by %d tokens", best[1].id, target, best[0])
    return best[1]


_ESSAY_HAYSTACKS: "weakref.WeakKeyDictionary[object, Haystack]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: its generator, scorer and a one-line description."""

    name: str
    family: str
    scorer: str
    description: str
    build: Callable[["TaskContext", int, int], Sample]


class TaskContext:
    """What generators need: the prompt format (tokenizer), the seed and the haystack."""

    def __init__(self, fmt: PromptFormat, seed: int = 0, corpus_text: str | None = None) -> None:
        self.fmt = fmt
        self.seed = seed
        self._corpus_text = corpus_text
        self._haystack: Haystack | None = None

    @property
    def haystack(self) -> Haystack:
        if self._haystack is None:
            if self._corpus_text is None:  # the default corpus: tokenized once per tokenizer
                cached = _ESSAY_HAYSTACKS.get(self.fmt.tokenizer)
                if cached is None:
                    cached = _ESSAY_HAYSTACKS[self.fmt.tokenizer] = Haystack(self.fmt)
                self._haystack = cached
            else:
                self._haystack = Haystack(self.fmt, self._corpus_text)
        return self._haystack

    def rng(self, task: str, length: int, index: int) -> random.Random:
        return rng_for(self.seed, task, length, index)
