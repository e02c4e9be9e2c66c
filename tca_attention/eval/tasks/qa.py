"""Question answering over a long document: the answer is a span stated exactly once.

Short fact paragraphs about fictional organisations ("The Silver Lantern Society was founded
in 1873 by Adela Hawthorne in the town of Marrowby.") are spread through real essays; one
question asks for the founder, the year or the town of one organisation. Each fact's values
are unique in the context, so the answer span appears once.
"""
from __future__ import annotations

import random

from ..schema import Sample
from .base import TaskContext, fit_length, insert_sentences, sample_id
from .words import ADJECTIVES, FIRST_NAMES, LAST_NAMES, NOUNS, ORG_KINDS, PLACE_HEADS, PLACE_TAILS

N_FACTS = 8  # one asked about, the others distractors
ATTRIBUTES = ("founder", "year", "town")


def _unique(rng: random.Random, n: int, draw) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        x = draw(rng)
        if x not in out:
            out.append(x)
    return out


def build(ctx: TaskContext, length: int, index: int) -> Sample:
    task = "qa"
    rng = ctx.rng(task, length, index)
    hay = ctx.haystack
    orgs = _unique(rng, N_FACTS, lambda r: f"{r.choice(ADJECTIVES).title()} {r.choice(NOUNS).title()} {r.choice(ORG_KINDS)}")
    people = _unique(rng, N_FACTS, lambda r: f"{r.choice(FIRST_NAMES)} {r.choice(LAST_NAMES)}")
    years = _unique(rng, N_FACTS, lambda r: str(r.randrange(1700, 1990)))
    towns = _unique(rng, N_FACTS, lambda r: r.choice(PLACE_HEADS) + r.choice(PLACE_TAILS))
    facts = [
        f"The {o} was founded in {y} by {p} in the town of {t}."
        for o, p, y, t in zip(orgs, people, years, towns)
    ]
    depths = [round(rng.uniform(0.05, 0.95), 3) for _ in facts]
    attribute = ATTRIBUTES[index % len(ATTRIBUTES)]
    org = orgs[0]
    question, prefix, answer = {
        "founder": (f"Who founded the {org}?", f"The {org} was founded by", people[0]),
        "year": (f"In which year was the {org} founded?", f"The {org} was founded in the year", years[0]),
        "town": (f"In which town was the {org} founded?", f"The {org} was founded in the town of", towns[0]),
    }[attribute]
    start = hay.start_token(rng)

    def make(n_tokens: int) -> Sample:
        context, positions = insert_sentences(hay.slice(start, n_tokens), facts, depths)
        return Sample(
            id=sample_id(task, length, index), task=task, length=length, context=context,
            question=f"Answer the question from the text above. {question}",
            answer_prefix=prefix, answers=(answer,), max_new_tokens=24,
            metadata={"attribute": attribute, "fact": facts[0], "position": positions[0],
                      "depth": depths[0], "answer_start": positions[0] + facts[0].index(answer)},
        )

    return fit_length(make, length, ctx.fmt, guess=length - 200)
