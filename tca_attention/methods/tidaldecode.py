"""TidalDecode (Yang et al., ICLR'25, "TidalDecode: Fast and Accurate LLM Decoding with Position
Persistent Sparse Attention"): a few token-selection layers choose the tokens every other layer reads.

Prefill is dense and the cache keeps every token. At each decode step, layers before `select_layer`
read their whole cache; `select_layer` (and `reselect_layer`, the periodic re-selection layer) read
their whole cache too and choose, per (row, KV head), the current token plus the budget - 1 earlier
tokens of largest q.k (the max over the KV head's query heads); every later layer reads exactly those
positions (position-persistent), until the re-selection layer replaces them. docs/methods.md,
"## tidaldecode".

The selection layer of a step is the first full-attention layer at or after `select_layer` (in a
hybrid model `select_layer` may be a sliding-window layer), the re-selection layer the first at or
after `reselect_layer`. The chosen positions are per-step state shared across layers, kept on the
method: written by the step's selection layer (layers run in order, so it precedes the layers that
read it); a layer finding no selection of this step (same batch, cache length and fill) selects;
every prefill (plan()) clears it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import torch

from ..engine.plan import DecodeSelection
from .decode_tokens import (ReadCounter, ReadsFromFullCache, current_slot, group_logits, keep_in_place,
                            real_slots, selection_from_mask, tail_rows, top_mask)

if TYPE_CHECKING:
    from ..ragged_cache import RaggedLayer


@dataclass(frozen=True)
class TidalDecode(ReadsFromFullCache):
    """budget: tokens each (row, KV head) reads at a sparse layer (the current one included);
    select_layer: the token-selection layer (model layer index; earlier layers are dense);
    reselect_layer: the re-selection layer (-1: none)."""

    budget: int = 2048
    select_layer: int = 2
    reselect_layer: int = 12
    name: str = "tidaldecode"
    _reads: ReadCounter = field(default_factory=ReadCounter, init=False, repr=False, compare=False)
    _state: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def reads_at_most(self) -> int:  # the selected tokens
        return self.budget

    def __post_init__(self) -> None:
        if self.budget < 2:
            raise ValueError(f"tidaldecode: budget must be >= 2 tokens (the current one and one more), got {self.budget}")
        if self.select_layer < 0:
            raise ValueError(f"tidaldecode: select_layer must be >= 0, got {self.select_layer}")
        if self.reselect_layer != -1 and self.reselect_layer <= self.select_layer:
            raise ValueError(f"tidaldecode: reselect_layer must be -1 (none) or above select_layer "
                             f"({self.select_layer}), got {self.reselect_layer}")

    def plan(self, layer_idx, q, k, key_start, scaling, *, backend="auto", padded=True) -> None:
        self._state.clear()  # a new prefill: no selection of an earlier request survives it
        return None  # dense prefill; the cache keeps everything

    def supports_static_decode(self) -> bool:
        """Graph-safe: which layer selects is decided on the host from host values that repeat in
        every step (layer indices, the cache's host step count, shapes), so the graph records the
        same roles each step; the chosen mask lives in one device buffer per request, written in
        place by the selection layers and read by the later layers."""
        return True

    def select_decode(self, layer_idx: int, q: torch.Tensor, layer: "RaggedLayer") -> DecodeSelection | None:
        start, end, T = tail_rows(layer, self.name)
        if q.shape[2] > 1 or (not layer.is_static and self._fits(end)) or layer_idx < self.select_layer:
            if q.shape[2] > 1:
                self._state.clear()
            self._reads.count_dense(q.device)
            return None
        st = self._state
        current = st.get("seen") == layer.seen and st.get("fill") == T and st.get("batch") == q.shape[0]
        reselect = 0 <= self.reselect_layer <= layer_idx and st.get("layer", -1) < self.reselect_layer
        if not current or reselect:  # the step's (re-)selection layer: full attention, choose the tokens
            mask = self.choose(q, layer, start, end, T)
            if "mask" in st:
                keep_in_place(st, "mask", mask)
            else:
                st["mask"] = mask
            st.update(seen=layer.seen, fill=T, batch=q.shape[0], layer=layer_idx)
            self._reads.count_dense(q.device)
            return None
        mask = st["mask"]
        self._reads.count(mask, end - start)
        return selection_from_mask(mask, self.budget)

    def choose(self, q: torch.Tensor, layer: "RaggedLayer", start: torch.Tensor, end: torch.Tensor | int,
               T: int) -> torch.Tensor:
        """(B, KV, T): the current token (slot end - 1) and the budget - 1 earlier real tokens of
        largest q.k (max over the KV head's query heads)."""
        now = current_slot(end, T, q.device)  # (1, T)
        earlier = real_slots(start, end, T) & ~now
        score = group_logits(q, layer.t_keys[:, :, :T], 1.0).amax(2)  # (B, KV, T)
        score = score.masked_fill(~earlier[:, None, :], float("-inf"))
        return top_mask(score, self.budget - 1) | now[:, None, :]

    def report(self) -> dict:
        """decode_kept_fraction: over every decode step of every layer (dense and selection layers,
        and steps within the budget, count as 1), the mean over rows of the cached tokens read."""
        return {"decode_kept_fraction": self._reads.fraction()}


def budget_for(kept_fraction: float, prompt_tokens: int, params: Mapping[str, Any]) -> int:
    """The budget making a sparse layer read about kept_fraction of a prompt_tokens prompt (>= 2)."""
    return max(2, round(kept_fraction * prompt_tokens))
