"""Needle prompts: real text with a random needle sentence (secret words and a number) at some
depth, a question, and the needle again as the teacher-forced answer. Head-split scores retrieval
on them; DuoAttention optimises its gates on them (its synthetic passkey data)."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch

QUESTION = "\n\nQuestion: What are the secret words and the secret number hidden in the text above?\nAnswer:"
_WORDS = ("anchor", "bishop", "candle", "dolphin", "ember", "falcon", "glacier", "harbor", "igloo", "jasmine",
          "kettle", "lantern", "meadow", "nickel", "orchid", "pepper", "quartz", "raven", "saddle", "tulip",
          "umbrella", "velvet", "walnut", "yogurt", "zeppelin", "biscuit", "copper", "dagger", "feather", "granite",
          "hammock", "ivory", "jigsaw", "kayak", "lobster", "marble", "noodle", "oyster", "pillow", "ribbon")


@dataclass(frozen=True)
class NeedlePrompt:
    ids: list[int]
    needle: tuple[int, int]  # [start, end) of the needle in ids
    answer: tuple[int, int]  # [start, end) of the teacher-forced answer (the needle's tokens again)


def _ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.as_tensor(ids).flatten().tolist() if isinstance(ids, torch.Tensor) else [int(i) for i in ids]


def needle_prompt(tokenizer, hay: Sequence[int], length: int, depth: float, rng: random.Random) -> NeedlePrompt:
    """length tokens: haystack with a random needle sentence at `depth` (moved back to the end of
    a sentence when one ends within 64 tokens), the question, and the needle as the answer."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    w = rng.sample(_WORDS, 3)
    sentence = f" The secret words are {w[0]}, {w[1]} and {w[2]}, and the secret number is {rng.randint(10**6, 10**7 - 1)}."
    needle, question = _ids(tokenizer, sentence), _ids(tokenizer, QUESTION)
    budget = length - 2 * len(needle) - len(question)
    if budget < 16:
        raise ValueError(f"length {length} is too short for a needle prompt")
    if len(hay) < budget:
        raise ValueError(f"the haystack has {len(hay)} tokens; {budget} are needed")
    start = rng.randint(0, len(hay) - budget)
    h = list(hay[start : start + budget])
    cut = round(depth * budget)
    for back in range(min(64, cut)):  # after a sentence's end, when one is near
        if tokenizer.decode([h[cut - back - 1]]).rstrip(" ").endswith((".", "\n")):
            cut -= back
            break
    ids = h[:cut] + needle + h[cut:] + question + needle
    return NeedlePrompt(ids, (cut, cut + len(needle)), (len(ids) - len(needle), len(ids)))
