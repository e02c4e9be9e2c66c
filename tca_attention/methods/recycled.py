"""Recycled Attention (Xu, Goyal and Choi, 2024, "Recycled Attention: Efficient inference for
long-context language models"): full-attention decode steps alternate with steps that recycle the
last full step's attention pattern.

Prefill is dense and the cache keeps every token. Per layer and per row: a full step reads the whole
cache and records, per KV head, the `budget` tokens of largest attention (the step's softmax
probabilities summed over the KV head's query heads); the steps after it read only those tokens plus
every token added since (from the full step's own token to the current one). A row takes a full step on its
first decode step and then every `stride` steps; with `similarity` > 0 also whenever the cosine
similarity of its query (every head of the layer) to the query of its last full step falls below
`similarity` (the paper's dynamic scheduling). docs/methods.md, "## recycled".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import torch

from ..engine.plan import DecodeSelection
from .decode_tokens import (ReadCounter, ReadsFromFullCache, cosine, group_logits, keep_in_place,
                            real_slots, selection_from_mask, slot_ids, tail_rows, top_mask)

if TYPE_CHECKING:
    from ..ragged_cache import RaggedLayer

_STATE = "recycled"  # key of the per-layer recycled pattern in RaggedLayer.method_state


@dataclass(frozen=True)
class RecycledAttention(ReadsFromFullCache):
    """budget: tokens (K) each (row, KV head) keeps from a full step's attention; stride: a full step
    every `stride` decode steps (1: always full); similarity: also a full step when the query's
    cosine similarity to the last full step's query is below it (0: fixed schedule only)."""

    budget: int = 2048
    stride: int = 10
    similarity: float = 0.0
    name: str = "recycled"
    _reads: ReadCounter = field(default_factory=ReadCounter, init=False, repr=False, compare=False)

    @property
    def reads_at_most(self) -> int:  # K tokens of a recycled step (a cache within K is read whole)
        return self.budget

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise ValueError(f"recycled: budget must be >= 1 token, got {self.budget}")
        if self.stride < 1:
            raise ValueError(f"recycled: stride must be >= 1 decode step, got {self.stride}")
        if not 0 <= self.similarity <= 1:
            raise ValueError(f"recycled: similarity must lie in [0, 1] (0: fixed schedule), got {self.similarity}")

    def split_heads_refusal(self) -> str | None:
        return ("similarity > 0 compares the whole layer's query (use similarity=0)" if self.similarity > 0
                else None)

    def supports_static_decode(self) -> bool:
        """Graph-safe: on a static layer the per-row schedule (steps since the full step, validity,
        pattern, query, base slot) lives on the device, allocated once and updated in place with
        torch.where; the full step's pattern is scored every step (whether a row takes a full step
        is a tensor value) and kept only for the rows that do."""
        return True

    def select_decode(self, layer_idx: int, q: torch.Tensor, layer: "RaggedLayer") -> DecodeSelection | None:
        start, end, T = tail_rows(layer, self.name)
        static = layer.is_static
        if q.shape[2] > 1 or (not static and self._fits(end)):  # a continuation, or every cache within K:
            # dense, schedules restart (a static step reads a cache within K through the selection)
            layer.method_state.pop(_STATE, None)
            self._reads.count_dense(q.device)
            return None
        qv = q[:, :, -1].float().flatten(1)  # (B, H * D)
        st = layer.method_state.get(_STATE)
        if st is None:
            st = layer.method_state[_STATE] = self._empty(q.shape[0], layer.t_keys.shape[1], qv, T if static else 0)
        st["since"] += 1
        n = end - start  # (B,) each row's real tokens
        fits = self._row_fits(n)  # rows reading everything, as alone (their schedule restarts)
        full = self._full_rows(st, qv, fits)
        real = real_slots(start, end, T)
        any_full = static or bool(full.any())  # dynamic: one host read, does any row take a full step?
        if any_full:
            self._record(st, full, self.pattern(q, layer, real), qv, end)
        st["valid"] &= ~fits
        if not static and bool((full | fits).all()):
            self._reads.count_dense(q.device)
            return None
        recent = slot_ids(T, q.device) >= st["base"][:, None]  # (B, T) added since
        mask = torch.nn.functional.pad(st["top"], (0, T - st["top"].shape[-1])) | recent[:, None, :]
        mask = torch.where((full | fits)[:, None, None], real[:, None, :], mask) & real[:, None, :]
        self._reads.count(mask, n)
        # a row's recycled reads: at most K + stride tokens; a full row next to it lists its whole cache
        return selection_from_mask(mask, T if any_full else self.budget + self.stride)

    def _full_rows(self, st: dict, qv: torch.Tensor, fits: torch.Tensor) -> torch.Tensor:
        """(B,) the rows taking a full step now: no pattern yet, `stride` steps since their last full
        step, or (similarity > 0) a query drifted from that step's; never a row within K."""
        full = ~st["valid"] | (st["since"] >= self.stride)
        if self.similarity > 0:
            full |= cosine(qv, st["q"]) < self.similarity
        return full & ~fits

    def pattern(self, q: torch.Tensor, layer: "RaggedLayer", real: torch.Tensor) -> torch.Tensor:
        """(B, KV, T): the `budget` real tokens of largest attention of this (full) step, the
        probabilities summed over each KV head's query heads. select_decode is not handed the layer's
        scaling: the probabilities use 1 / sqrt(head_dim) (docs/methods.md)."""
        logits = group_logits(q, layer.t_keys[:, :, : real.shape[-1]], q.shape[-1] ** -0.5)
        logits = logits.masked_fill(~real[:, None, None, :], float("-inf"))
        score = torch.softmax(logits, dim=-1).sum(2).masked_fill(~real[:, None, :], float("-inf"))
        return top_mask(score, self.budget)

    @staticmethod
    def _empty(B: int, KV: int, qv: torch.Tensor, T: int) -> dict:
        """Per-row schedule state of a layer: no row has a pattern yet (T: the pattern's slots)."""
        dev = qv.device
        return {"top": torch.zeros(B, KV, T, dtype=torch.bool, device=dev), "q": torch.zeros_like(qv),
                "base": torch.zeros(B, dtype=torch.long, device=dev), "since": torch.zeros(B, dtype=torch.long, device=dev),
                "valid": torch.zeros(B, dtype=torch.bool, device=dev)}

    @staticmethod
    def _record(st: dict, full: torch.Tensor, top: torch.Tensor, qv: torch.Tensor, end: torch.Tensor | int) -> None:
        """The rows taking a full step now get this step's pattern, query and base (its own token, slot
        end - 1); the others keep theirs. In place where the shapes allow (a static layer's state
        keeps its address: a replayed CUDA graph reads and writes it)."""
        old = torch.nn.functional.pad(st["top"], (0, top.shape[-1] - st["top"].shape[-1]))
        keep_in_place(st, "top", torch.where(full[:, None, None], top, old))
        st["q"].copy_(torch.where(full[:, None], qv, st["q"]))
        st["base"].copy_(torch.where(full, end - 1, st["base"]))
        st["since"].masked_fill_(full, 0)
        st["valid"] |= full

    def report(self) -> dict:
        """decode_kept_fraction: over every decode step of every layer (full steps and steps within
        the budget count as 1), the mean over rows of the cached tokens read (the cache holds all)."""
        return {"decode_kept_fraction": self._reads.fraction()}


def budget_for(kept_fraction: float, prompt_tokens: int, params: Mapping[str, Any]) -> int:
    """K making a recycled step read about kept_fraction of a prompt_tokens prompt (>= 1); full steps
    read everything (docs/methods.md)."""
    return max(1, round(kept_fraction * prompt_tokens))
