"""Task registry: every long-context task of the suite, one generator per name."""
from __future__ import annotations

from ..registry import Registry
from ..schema import Sample
from . import aggregation, niah, perplexity, qa, variable_tracking
from .base import TaskContext, TaskSpec

TASKS: Registry[TaskSpec] = Registry("task")

for _spec in (
    TaskSpec("niah_single", "niah", "contains", "one needle at a chosen depth", niah.single),
    TaskSpec("niah_multikey", "niah", "contains", "one needle among distractor keys", niah.multikey),
    TaskSpec("niah_multivalue", "niah", "recall", "several values for one key; report all", niah.multivalue),
    TaskSpec("niah_multiquery", "niah", "recall", "several keys asked at once", niah.multiquery),
    TaskSpec("variable_tracking", "aggregation", "recall", "all names bound to a value through chains", variable_tracking.build),
    TaskSpec("common_words", "aggregation", "recall", "the 10 most common words of a long list", aggregation.common_words),
    TaskSpec("frequent_words", "aggregation", "recall", "the 3 most frequent coded words (Zipf counts)", aggregation.frequent_words),
    TaskSpec("qa", "qa", "contains", "a span stated once in a long document", qa.build),
    TaskSpec("perplexity", "perplexity", "nll", "mean NLL of the last tokens of a long essay text", perplexity.build),
):
    TASKS.add(_spec.name, _spec)


def generate(ctx: TaskContext, task: str, length: int, index: int) -> Sample:
    """The sample `index` of `task` at `length` tokens (deterministic in ctx.seed)."""
    return TASKS.get(task).build(ctx, length, index)


def generate_all(ctx: TaskContext, tasks: list[str], lengths: list[int], n: int) -> list[Sample]:
    return [generate(ctx, t, L, i) for L in lengths for t in tasks for i in range(n)]


__all__ = ["TASKS", "TaskContext", "TaskSpec", "generate", "generate_all"]
