"""A passkey-retrieval prompt in real text: the smallest honest long-context check."""
from __future__ import annotations

import random
from dataclasses import dataclass

from .corpus import essay_text


@dataclass(frozen=True)
class PasskeyPrompt:
    text: str  # the full prompt (chat template applied when the tokenizer has one)
    answer: str
    n_tokens: int
    depth: float


def passkey_prompt(tokenizer, n_tokens: int, depth: float = 0.5, seed: int = 0, chat: bool = False) -> PasskeyPrompt:
    """A haystack of real essays of about n_tokens tokens with a 5-digit passkey at `depth`."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(seed)
    key = f"{rng.randint(10000, 99999)}"
    intro = ("There is an important piece of information hidden inside a lot of irrelevant text. "
             "Find it and memorize it. I will quiz you about it.\n\n")
    needle = f"\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
    question = "What is the pass key? The pass key is"
    ids = tokenizer(essay_text(), add_special_tokens=False)["input_ids"]
    overhead = len(tokenizer(intro + needle + "\n\n" + question, add_special_tokens=False)["input_ids"]) + 8
    budget = n_tokens - overhead
    if budget < 16:
        raise ValueError(f"n_tokens={n_tokens} is too short for a passkey prompt")
    start = rng.randint(0, max(0, len(ids) - budget - 1))
    hay = ids[start : start + budget]
    cut = int(len(hay) * depth)
    context = intro + tokenizer.decode(hay[:cut]) + needle + tokenizer.decode(hay[cut:])
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": context + "\n\nWhat is the pass key?"}],
            tokenize=False, add_generation_prompt=True,
        ) + "The pass key is"
    else:
        text = context + "\n\n" + question
    n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return PasskeyPrompt(text=text, answer=key, n_tokens=n, depth=depth)
