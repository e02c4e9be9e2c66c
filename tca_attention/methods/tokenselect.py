"""TokenSelect (Wu et al., EMNLP'25, "TokenSelect: Efficient Long-Context Inference and Length
Extrapolation for LLMs via Dynamic Token-Level KV Cache Selection"): token-level decode selection.

Prefill is dense and the cache keeps every token. At each decode step, per row, the first `sinks`
and the last `local` real tokens are always read; of the tokens between them (the middle), each KV
head reads the `budget` of highest soft vote: every query head of the KV head's group takes the
softmax of its q.k over the middle tokens and the probabilities are summed over the group
(vote="kv"), or over every head of the layer, one set shared by all KV heads (vote="all", the
paper's implementation). Selection cache: a row whose query (all heads of the layer, concatenated)
has cosine similarity >= threshold with the query that made its cached selection reuses that
selection (the sinks and the local window still follow the cache). docs/methods.md, "## tokenselect".
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

_STATE = "tokenselect"  # key of the per-layer selection cache in RaggedLayer.method_state
VOTES = ("kv", "all")


@dataclass(frozen=True)
class TokenSelect(ReadsFromFullCache):
    """budget: middle tokens each KV head reads per step; sinks / local: the first / last real tokens
    always read; threshold: the selection cache's cosine threshold (> 1: never reuse); vote: "kv"
    (the query heads of each KV head vote) or "all" (every head votes, one set per layer)."""

    budget: int = 2048
    sinks: int = 128
    local: int = 512
    threshold: float = 0.9
    vote: str = "kv"
    name: str = "tokenselect"
    _reads: ReadCounter = field(default_factory=ReadCounter, init=False, repr=False, compare=False)
    _reuse: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def reads_at_most(self) -> int:  # sinks + budget + local
        return self.width

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise ValueError(f"tokenselect: budget must be >= 1 token, got {self.budget}")
        if self.sinks < 0:
            raise ValueError(f"tokenselect: sinks must be >= 0, got {self.sinks}")
        if self.local < 1:
            raise ValueError(f"tokenselect: local must be >= 1 (the current token), got {self.local}")
        if not (self.threshold >= -1 and self.threshold < float("inf")):
            raise ValueError(f"tokenselect: threshold must be a finite cosine >= -1 (> 1: no reuse), got {self.threshold}")
        if self.vote not in VOTES:
            raise ValueError(f"tokenselect: vote must be one of {', '.join(VOTES)}, got {self.vote!r}")

    @property
    def width(self) -> int:
        """Most tokens a (row, KV head) reads per step."""
        return self.sinks + self.budget + self.local

    def split_heads_refusal(self) -> str | None:
        return "vote=all sums the votes of every head of a layer (use vote=kv)" if self.vote == "all" else None

    def supports_static_decode(self) -> bool:
        """Graph-safe: on a static layer the vote runs over the whole ring every step and the
        selection cache (its query, validity and mask, allocated once) is updated in place with
        torch.where; rows within the budget read everything through the same selection."""
        return True

    def select_decode(self, layer_idx: int, q: torch.Tensor, layer: "RaggedLayer") -> DecodeSelection | None:
        start, end, T = tail_rows(layer, self.name)
        # a continuation, or every cache within the budget (dynamic: a static step selects them all)
        if q.shape[2] > 1 or (not layer.is_static and self._fits(end)):
            self._reads.count_dense(q.device)
            return None
        real = real_slots(start, end, T)  # (B, T)
        n = end - start  # (B,) each row's real tokens
        rel = slot_ids(T, start.device) - start[:, None]  # rank among the row's tokens
        sink = real & (rel < self.sinks)
        local = real & (rel >= (n - self.local)[:, None])
        middle = real & ~sink & ~local
        fits = self._row_fits(n)  # rows reading everything, as alone (their selection cache untouched)
        chosen = self._chosen(q, layer, middle, fits)  # (B, KV, T)
        mask = chosen | ((sink | local | fits[:, None]) & real)[:, None, :]
        self._reads.count(mask, n)
        return selection_from_mask(mask, self.width)

    def _chosen(self, q: torch.Tensor, layer: "RaggedLayer", middle: torch.Tensor, fits: torch.Tensor) -> torch.Tensor:
        """The middle tokens each (row, KV head) reads: its cached selection where the row's query is
        similar enough to the one that made it, else a fresh vote (stored with the query). Rows that
        fit the budget neither use nor change their cache (as alone, where such a step is dense).
        A static layer votes every step and keeps its cache in place (no host read)."""
        B, KV, T = q.shape[0], layer.t_keys.shape[1], middle.shape[-1]
        qv = q[:, :, -1].float().flatten(1)  # (B, H * D) the row's query, every head
        st = layer.method_state.get(_STATE)
        if st is None:
            st = layer.method_state[_STATE] = {
                "q": torch.zeros_like(qv), "valid": torch.zeros_like(fits),
                "chosen": torch.zeros(B, KV, T, dtype=torch.bool, device=qv.device)}
        old = torch.nn.functional.pad(st["chosen"], (0, T - st["chosen"].shape[-1]))
        reuse = st["valid"] & (cosine(qv, st["q"]) >= self.threshold) & ~fits  # (B,)
        had = st["valid"] & ~fits  # rows that had a cached selection to consider
        self._reuse_counts(qv.device).add_(torch.stack([had.sum(), reuse.sum()]))
        if not layer.is_static and bool((reuse | fits).all()):  # one host read: no row votes this step
            return old
        fresh = self.vote_mask(q, layer.t_keys[:, :, :T], middle)
        vote = ~reuse & ~fits
        chosen = torch.where(vote[:, None, None], fresh, old)
        keep_in_place(st, "q", torch.where(vote[:, None], qv, st["q"]))
        keep_in_place(st, "valid", st["valid"] | vote)
        keep_in_place(st, "chosen", chosen)
        return chosen

    def _reuse_counts(self, device: torch.device) -> torch.Tensor:
        """(2,) int64 on the device, added to in place: (row, step)s with a cached selection to
        consider, and those reusing it."""
        acc = self._reuse.get("acc")
        if acc is None:
            acc = self._reuse["acc"] = torch.zeros(2, dtype=torch.long, device=device)
        elif acc.device != device:  # a later request on another device
            acc = self._reuse["acc"] = acc.to(device)
        return acc

    def vote_mask(self, q: torch.Tensor, keys: torch.Tensor, middle: torch.Tensor) -> torch.Tensor:
        """Soft voting: (B, KV, T) the `budget` middle tokens of largest summed softmax(q.k) over the
        voting heads. q.k is not scaled by 1/sqrt(d), as in the paper's implementation."""
        B, KV = keys.shape[:2]
        logits = group_logits(q, keys, 1.0).masked_fill(~middle[:, None, None, :], float("-inf"))  # (B, KV, G, T)
        score = torch.softmax(logits, dim=-1).nan_to_num_(0.0).sum(2)  # (B, KV, T) a row without middle: 0
        if self.vote == "all":
            score = score.sum(1, keepdim=True).expand(B, KV, -1)
        score = score.masked_fill(~middle[:, None, :], float("-inf"))
        return top_mask(score, self.budget)

    def report(self) -> dict:
        """decode_kept_fraction: over every decode step of every layer (steps within the budget count
        as 1), the mean over rows of the cached tokens read (the cache holds them all);
        selection_reuse: of the (row, step)s that had a cached selection to consider, the share reusing it."""
        acc = self._reuse.get("acc")
        steps, rows = acc.tolist() if acc is not None else (0, 0)
        return {"decode_kept_fraction": self._reads.fraction(), "selection_reuse": rows / steps if steps else None}


def budget_for(kept_fraction: float, prompt_tokens: int, params: Mapping[str, Any]) -> int:
    """The budget making a step read about kept_fraction of a prompt_tokens prompt (sinks and local
    included; at least 1 token): the registry's density knob."""
    sinks = int(params.get("sinks", TokenSelect.sinks))
    local = int(params.get("local", TokenSelect.local))
    return max(1, round(kept_fraction * prompt_tokens) - sinks - local)
