"""Per-head kinds: head-level methods as plans, not special cases.

A layer's KV heads each get a kind:
  "dense"      keeps the whole global region at prefill and every token in decode (full attention
               and the full cache: DuoAttention's retrieval heads);
  "streaming"  keeps only the row's first `sinks` tokens of the global region and drops every
               block decode compresses (attention sinks + the recent window).
The local region (the causal window of `window` to `window + block_size` recent tokens) is the
engine's and shared by every head of a layer, so a streaming head is exactly StreamingLLM and a
dense head exactly full attention. `kinds_plan` turns one layer's kinds into a TokenPlan (None
when every head is dense: SDPA and a cache that keeps everything), `kinds_decode_keep` into the
per-head decode counts. The head-level methods (head-split, duo, razor) also share here which heads
are retrieval heads (`top_heads`), the density solve (`retrieval_fraction_for`), and
(`RetrievalSplit`) the method that runs a ranking of heads as retrieval / streaming heads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch

from ..engine.plan import TokenPlan, pack_mask
from .base import Method, global_region, local_geometry, row_geometry, sink_mask
from .state import per_head

Kind = Literal["dense", "streaming"]
KINDS: tuple[str, ...] = ("dense", "streaming")


def _check(kinds: Sequence[str]) -> None:
    bad = sorted(set(kinds) - set(KINDS))
    if bad:
        raise ValueError(f"unknown head kind(s) {bad}; known: {', '.join(KINDS)}")


def kinds_decode_keep(kinds: Sequence[Kind], block_size: int) -> torch.Tensor:
    """(KV,) int64 tokens each head keeps of a block decode compresses: all (dense) or none."""
    _check(kinds)
    return torch.tensor([block_size if k == "dense" else 0 for k in kinds], dtype=torch.long)


def kinds_plan(
    kinds: Sequence[Kind], k: torch.Tensor, key_start: torch.Tensor, *, sinks: int, window: int, block_size: int,
    padded: bool = True,
) -> TokenPlan | None:
    """The TokenPlan of one layer whose KV head h is of kind kinds[h]; k (B, KV, L, D).

    None when every head is dense, or when even a row without padding stays dense (L <= window +
    block_size). padded=False promises key_start == 0 (row geometry and kept sizes on the host).
    """
    _check(kinds)
    B, KV, L, _ = k.shape
    if len(kinds) != KV:
        raise ValueError(f"{len(kinds)} head kinds for {KV} KV heads")
    geo = local_geometry(L, block_size, window)
    if geo is None or all(kind == "dense" for kind in kinds):
        return None
    _, local_start = geo
    _, row_ls = row_geometry(L, key_start, block_size, window) if padded else (None, None)
    ls = row_ls if row_ls is not None else torch.full_like(key_start, local_start)
    region = global_region(L, key_start, ls)  # (B, L) each row's [key_start, ls)
    sink = sink_mask(L, key_start, sinks) & region  # (B, L)
    dense = torch.tensor([kind == "dense" for kind in kinds], device=k.device)  # (KV,)
    mask = torch.where(dense[None, :, None], region[:, None, :], sink[:, None, :])  # (B, KV, L)
    kept_idx, kept_len = pack_mask(mask)
    total = None
    if row_ls is None:  # no padding: every row keeps the same, known on the host
        n_dense = sum(kind == "dense" for kind in kinds)
        total = B * (n_dense * local_start + (KV - n_dense) * min(sinks, local_start))
    return TokenPlan(kept_idx, kept_len, local_start, window, block_size, key_start,
                     kinds_decode_keep(kinds, block_size), kept_total=total, row_local_start=row_ls)


# -- head-level methods' shared parts: which heads are retrieval heads, and the density solve -----
Scores = Sequence[Sequence[float] | None]


def top_heads(scores: Scores, fraction: float, tiebreak: Scores | None = None) -> tuple[tuple[bool, ...] | None, ...]:
    """Per layer, which heads are among the round(fraction * N) best of the N scored heads (None
    rows: layers left alone). Higher score first; equal scores by higher tiebreak (if given), then
    lower layer and head."""
    heads = [(i, h, s) for i, row in enumerate(scores) if row is not None for h, s in enumerate(row)]
    tb = (lambda i, h: tiebreak[i][h]) if tiebreak is not None else (lambda i, h: 0.0)
    ranked = sorted(heads, key=lambda x: (-x[2], -tb(x[0], x[1]), x[0], x[1]))
    chosen = {(i, h) for i, h, _ in ranked[: math.floor(fraction * len(ranked) + 0.5)]}
    return tuple(None if row is None else tuple((i, h) in chosen for h in range(len(row)))
                 for i, row in enumerate(scores))


def as_kinds(retrieval: Sequence[Sequence[bool] | None]) -> tuple[tuple[Kind, ...] | None, ...]:
    """Retrieval flags per layer -> kinds per layer (retrieval: dense, the others streaming)."""
    return tuple(None if row is None else tuple("dense" if r else "streaming" for r in row) for row in retrieval)


def retrieval_fraction_for(kept_fraction: float, seq_len: int, sinks: int, window: int, block_size: int) -> float:
    """The fraction of retrieval (dense) heads keeping about kept_fraction of a seq_len prompt when
    the other heads are streaming heads holding `sinks` tokens of the global region (exact, as the
    engine lays it out): kept = rf + (1 - rf) s / L, so rf = (f - s/L) / (1 - s/L) in [0, 1]; 0 when
    streaming heads keep the whole prompt anyway. Callers round rf * (KV heads)."""
    geo = local_geometry(seq_len, block_size, window)
    if geo is None:
        return 0.0
    s = (min(sinks, geo[1]) + seq_len - geo[1]) / seq_len
    return round(min(1.0, max(0.0, (kept_fraction - s) / (1.0 - s))), 4)


@dataclass(frozen=True)
class RetrievalSplit(Method):
    """Retrieval heads (the best-ranked retrieval_fraction of KV heads) keep everything; the others
    sinks + the recent window. A subclass names its ranking state (`ranking()`: an object with
    retrieval_heads(fraction) and check_model(model)): head-split's scores, DuoAttention's gates."""

    retrieval_fraction: float = field(default=0.5, kw_only=True)
    sinks: int = field(default=64, kw_only=True)
    window: int = field(default=256, kw_only=True)
    block_size: int = field(default=64, kw_only=True)
    report_sums = ("retrieval_heads", "kv_heads")
    # derived from the ranking over the whole model; a tensor-parallel rank runs its own heads' kinds
    _kinds: tuple = per_head("kv", default=(), init=False, repr=False, compare=False)

    def ranking(self) -> Any:
        raise NotImplementedError

    def __post_init__(self) -> None:
        if not 0.0 <= self.retrieval_fraction <= 1.0:
            raise ValueError(f"retrieval_fraction must be in [0, 1], got {self.retrieval_fraction}")
        if self.sinks < 0 or self.window < 1 or self.block_size < 1:
            raise ValueError(f"{self.name} needs sinks >= 0, window >= 1, block_size >= 1")
        object.__setattr__(self, "_kinds", as_kinds(self.ranking().retrieval_heads(self.retrieval_fraction)))

    def kinds(self, layer_idx: int) -> tuple[Kind, ...] | None:
        """The kind of each KV head of a layer (None: a layer the split leaves alone)."""
        return self._kinds[layer_idx]

    def check_model(self, model) -> None:
        self.ranking().check_model(model)

    def decode_keep(self, layer_idx: int, num_kv_heads: int) -> torch.Tensor:
        return kinds_decode_keep(self.kinds(layer_idx) or ("dense",) * num_kv_heads, self.block_size)

    def plan(self, layer_idx, q, k, key_start, scaling, *, backend="auto", padded=True):
        kinds = self.kinds(layer_idx)
        if kinds is None:
            return None
        return kinds_plan(kinds, k, key_start, sinks=self.sinks, window=self.window, block_size=self.block_size,
                          padded=padded)

    def report(self) -> dict:
        rows = [r for r in self._kinds if r is not None]
        return {"retrieval_heads": sum(k == "dense" for r in rows for k in r), "kv_heads": sum(map(len, rows))}
