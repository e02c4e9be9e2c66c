"""Long-text perplexity: per-token NLL of the last NLL_TOKENS tokens of a long real document.

The prompt is raw essay text (no chat template) of the target length; the score is the mean
negative log-likelihood (nats per token) of its last part, lower is better.
"""
from __future__ import annotations

from ..schema import Sample
from .base import TaskContext, fit_length, sample_id

NLL_TOKENS = 512


def build(ctx: TaskContext, length: int, index: int) -> Sample:
    task = "perplexity"
    rng = ctx.rng(task, length, index)
    start = ctx.haystack.start_token(rng)
    n_eval = min(NLL_TOKENS, length // 4)

    def make(n_tokens: int) -> Sample:
        return Sample(
            id=sample_id(task, length, index), task=task, length=length,
            context=ctx.haystack.slice(start, n_tokens), question="", answer_prefix="", answers=(),
            max_new_tokens=0, kind="nll", use_template=False,
            metadata={"nll_tokens": n_eval, "start_token": start},
        )

    return fit_length(make, length, ctx.fmt, guess=length)
