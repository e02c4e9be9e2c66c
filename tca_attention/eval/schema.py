"""Normalised records of the suite: one Sample schema for every task, one result record."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Mapping

Kind = Literal["generate", "nll"]


@dataclass(frozen=True)
class Sample:
    """One evaluation item, independent of model and method.

    context: the long text. question: asked after it. answer_prefix: the start of the
    assistant's reply (forced, then the model continues). answers: the gold strings the scorer
    looks for. max_new_tokens: greedy decoding budget. kind "nll" samples are scored by the
    negative log-likelihood of the last `metadata["nll_tokens"]` tokens of the context
    (question and answers are empty). length: the target prompt length in tokens;
    metadata: task-specific facts (needle depth, positions, ...), JSON-serialisable.
    """

    id: str
    task: str
    length: int
    context: str
    question: str
    answer_prefix: str
    answers: tuple[str, ...]
    max_new_tokens: int
    kind: Kind = "generate"
    use_template: bool = True
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("generate", "nll"):
            raise ValueError(f"kind must be 'generate' or 'nll', got {self.kind!r}")
        if self.kind == "generate" and not self.answers:
            raise ValueError(f"sample {self.id}: a generation sample needs answers")
        if self.max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")


@dataclass(frozen=True)
class Result:
    """What one method produced on one sample (one line of the per-sample JSONL)."""

    sample_id: str
    task: str
    length: int
    method: str
    model: str
    score: float
    scorer: str
    prediction: str
    answers: tuple[str, ...]
    prompt_tokens: int
    kept_fraction: float
    kv_bytes: int
    dense_kv_bytes: int
    seconds: float
    nll: float | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return (self.method, self.sample_id)

    def to_json(self) -> str:
        d = asdict(self)
        d["answers"] = list(self.answers)
        d["metadata"] = dict(self.metadata)
        return json.dumps(d, sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> "Result":
        d = json.loads(line)
        d["answers"] = tuple(d["answers"])
        return cls(**d)
