"""Variable tracking: chains of assignments hidden in essays; report every name bound to a value.

A chain is "VAR A = 12345." then "VAR B = VAR A.", "VAR C = VAR B.", ... Statements of a chain
appear in order at seeded depths; distractor chains carry other values.
"""
from __future__ import annotations

import random
import string

from ..schema import Sample
from .base import TaskContext, fit_length, insert_sentences, sample_id

N_HOPS = 4  # a chain binds N_HOPS + 1 names
N_CHAINS = 2  # the target chain and one distractor chain


def _names(rng: random.Random, n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in out:
            out.append(name)
    return out


def build(ctx: TaskContext, length: int, index: int) -> Sample:
    task = "variable_tracking"
    rng = ctx.rng(task, length, index)
    names = _names(rng, N_CHAINS * (N_HOPS + 1))
    values: list[str] = []
    while len(values) < N_CHAINS:
        v = str(rng.randrange(10_000, 100_000))
        if v not in values:
            values.append(v)
    statements: list[str] = []
    depths: list[float] = []
    chains: list[list[str]] = []
    for c in range(N_CHAINS):
        chain = names[c * (N_HOPS + 1) : (c + 1) * (N_HOPS + 1)]
        chains.append(chain)
        ds = sorted(round(rng.uniform(0.02, 0.98), 3) for _ in chain)
        for j, name in enumerate(chain):
            rhs = values[c] if j == 0 else f"VAR {chain[j - 1]}"
            statements.append(f"VAR {name} = {rhs}.")
            depths.append(ds[j])
    start = ctx.haystack.start_token(rng)
    question = (
        f"Find all variables that are assigned the value {values[0]} in the text above, "
        "directly or through other variables."
    )
    prefix = (
        f"According to the chains of variable assignments in the text above, {N_HOPS + 1} "
        f"variables are assigned the value {values[0]}, they are:"
    )

    def make(n_tokens: int) -> Sample:
        context, positions = insert_sentences(ctx.haystack.slice(start, n_tokens), statements, depths)
        return Sample(
            id=sample_id(task, length, index), task=task, length=length, context=context,
            question=question, answer_prefix=prefix, answers=tuple(chains[0]), max_new_tokens=40,
            metadata={"statements": statements, "positions": positions, "depths": depths,
                      "value": values[0], "chains": chains},
        )

    return fit_length(make, length, ctx.fmt, guess=length - 150)
