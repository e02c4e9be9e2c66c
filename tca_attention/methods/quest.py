"""Quest (Tang et al., ICML'24): query-aware page selection at decode time.

Prefill is dense and the cache keeps every token. Per KV page (page_size tokens) the layer keeps
the elementwise min and max of the keys; at each decode step the step's query upper-bounds q.k on
every page (engine/page_bounds.py) and attends only to the pages of largest bound within a token
budget, the current page always included. The first `skip_layers` layers stay dense.

Pages are counted from each row's first real token, so a left-padded row reads the same pages of
its own tokens as it does alone (docs/methods.md, "## quest"): bounds are stored per row-aligned
page, ranked in a frame where every row's current page is the last one, and handed to the kernel
as tail pages of the largest power of two dividing every row's padding (page_size without padding).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import torch

from ..engine.page_bounds import fold_slot, page_bounds, page_upper_bound, top_pages, update_page_bounds
from ..engine.plan import DecodeSelection
from .base import Method
from .decode_tokens import ReadCounter

if TYPE_CHECKING:
    from ..ragged_cache import RaggedLayer

_STATE = "quest"  # key of this method's entry in RaggedLayer.method_state


@dataclass(frozen=True)
class Quest(Method):
    """budget: tokens each KV head attends to per decode step (budget // page_size pages, the
    current page included); page_size: tokens per page (a power of two); skip_layers: the first
    layers (model layer indices) that stay dense."""

    budget: int = 1024
    page_size: int = 16
    skip_layers: int = 2
    name: str = "quest"
    # decode steps seen and the sum of their read fractions (on the device: read by report() only)
    _reads: ReadCounter = field(default_factory=ReadCounter, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ps = self.page_size
        if not isinstance(ps, int) or ps < 1 or ps & (ps - 1):
            raise ValueError(f"quest: page_size must be a power of two >= 1, got {ps!r}")
        if self.budget < 2 * ps:
            raise ValueError(f"quest: budget must cover at least 2 pages ({2 * ps} tokens), got {self.budget}")
        if self.skip_layers < 0:
            raise ValueError(f"quest: skip_layers must be >= 0, got {self.skip_layers}")

    # the ragged cache's geometry: with no prefill plan and whole blocks kept, it never compresses
    @property
    def block_size(self) -> int:
        return self.page_size

    @property
    def window(self) -> int:
        return self.page_size

    @property
    def pages(self) -> int:
        """Pages each KV head reads per decode step (the current page included)."""
        return self.budget // self.page_size

    def plan(self, layer_idx, q, k, key_start, scaling, *, backend="auto", padded=True) -> None:
        return None  # dense prefill; the cache keeps everything

    def decode_keep(self, layer_idx: int, num_kv_heads: int) -> torch.Tensor:
        return torch.full((num_kv_heads,), self.block_size, dtype=torch.long)  # decode never evicts

    # -- decode ---------------------------------------------------------------------------------
    def _fits(self, fill: int) -> bool:
        """Every row's cache (fill tail slots, at most fill real tokens) fits the budget: read it all."""
        return fill <= self.pages * self.page_size

    def supports_static_decode(self) -> bool:
        """Graph-safe: on a static layer the bounds fold the step's slot at a device index and the
        pages are ranked over the whole ring (fixed shapes); a cache within the budget is read
        whole through the same selection (every page chosen), without a host branch."""
        return True

    def select_decode(self, layer_idx: int, q: torch.Tensor, layer: "RaggedLayer") -> DecodeSelection | None:
        static, ps, k = layer.is_static, self.page_size, self.pages
        if layer_idx < self.skip_layers or (not static and self._fits(layer.t_fill)):
            self._reads.count_dense(q.device)
            return None
        state = layer.method_state.get(_STATE)
        if state is None:  # the first decode step (eager on a static layer: one host read)
            state = layer.method_state[_STATE] = _PageState.build(layer, ps)
        else:
            state.update(layer)
        if q.shape[2] > 1:  # a multi-token continuation runs dense, as in Quest (bounds stay current)
            self._reads.count_dense(q.device)
            return None
        # end: one past the last filled slot; n: pages of the ranking frame (>= every row's own count)
        end, n = (layer.next_pos, state.kmin.shape[2]) if static else (layer.t_fill, -(-layer.t_fill // ps))
        first, last = state.first_page, torch.div(end - 1 - state.offset, ps, rounding_mode="floor")  # (B,) stored
        d = (n - 1) - last  # (B,) right shift placing each row's current page at n - 1
        bound = page_upper_bound(q, state.kmin[:, :, :n], state.kmax[:, :, :n])  # (B, KV, n)
        j = torch.arange(n, device=bound.device)[None, :] - d[:, None]  # (B, n) stored page of each slot
        real = (j >= first[:, None])[:, None, :]  # (B, 1, n)
        shifted = bound.gather(2, j.clamp_min(0)[:, None, :].expand_as(bound))
        shifted = torch.where(real, shifted, torch.full_like(shifted, float("-inf")))  # no page there
        chosen = top_pages(shifted, k, n * ps, ps, always=(0, 1)).long() - d[:, None, None]  # (B, KV, k) stored
        ok = chosen >= first[:, None, None]  # -1 entries and the -inf (non-existent) picks fail
        self._count_read(ok.sum(-1), first, last, end, state)
        return state.selection(chosen - first[:, None, None], ok, end, layer.t_keys.shape[2])

    # -- report ---------------------------------------------------------------------------------
    def _count_read(self, n_chosen: torch.Tensor, first: torch.Tensor, last: torch.Tensor,
                    end: torch.Tensor | int, state: "_PageState") -> None:
        """Add the step's mean over rows of attended / cached real tokens (every page but the
        current one is whole; every KV head of a row reads the same number of pages)."""
        cached = end - state.start  # (B,)
        current = cached - (last - first) * self.page_size  # tokens of the current page
        read = (n_chosen[:, 0] - 1) * self.page_size + current
        self._reads.add((read.double() / cached.double()).mean())

    def report(self) -> dict:
        """decode_kept_fraction: over every decode step of every layer this method has run (skipped
        layers and steps that fit the budget count as 1), the mean over batch rows of the cached
        tokens attended to; None before any decode step."""
        return {"decode_kept_fraction": self._reads.fraction()}


class _PageState:
    """One layer's page bounds for one request, per row-aligned page.

    Row r's first tail slot s_r (its padding before it) has offset o_r = s_r mod page_size; its
    bounds are stored in the tail frame shifted by o_r (stored page p = tail slots
    [o_r + p * page_size, + page_size)), so that its first real page, p = s_r // page_size, starts at
    its first real token. Rows of equal offset, consecutive in the batch, share one
    update_page_bounds call (one call without padding).
    """

    def __init__(self, layer: "RaggedLayer", page_size: int, start: torch.Tensor, runs: list[tuple[int, int, int]],
                 granule: int) -> None:
        self.page_size, self.start, self.runs, self.granule = page_size, start, runs, granule
        self.offset = start % page_size  # (B,)
        self.first_page = torch.div(start, page_size, rounding_mode="floor")  # (B,)
        self.t_pos0, self.fill = layer.t_pos0, 0
        B, KV, T, D = layer.t_keys.shape
        self.kmin = self.kmax = layer.t_keys.new_zeros(0)
        if layer.is_static:  # the whole ring's pages, allocated once: later steps fold in place
            self.kmin, self.kmax = layer.t_keys.new_zeros(2, B, KV, -(-T // page_size), D).unbind(0)
        else:
            self._grow(layer.t_fill, (B, KV, D))

    @classmethod
    def build(cls, layer: "RaggedLayer", page_size: int) -> "_PageState":
        """Bounds over everything the layer's tail holds (the one host read of the rows' padding;
        on a static layer at its first decode step, which runs eagerly)."""
        start = (layer.t_first - layer.t_pos0).long()  # (B,) each row's first tail slot
        starts = [int(s) for s in start.tolist()]
        runs: list[tuple[int, int, int]] = []
        for r, s in enumerate(starts):
            o = s % page_size
            if runs and runs[-1][2] == o:
                runs[-1] = (runs[-1][0], r + 1, o)
            else:
                runs.append((r, r + 1, o))
        granule = page_size
        while any(s % granule for s in starts):
            granule //= 2
        state = cls(layer, page_size, start, runs, granule)
        fill = layer.seen - layer.t_pos0 if layer.is_static else layer.t_fill  # host counts at this step
        for r0, r1, o in runs:
            kmin, kmax = page_bounds(layer.t_keys[r0:r1, :, o:fill], fill - o, page_size)
            state.kmin[r0:r1, :, : kmin.shape[2]] = kmin
            state.kmax[r0:r1, :, : kmax.shape[2]] = kmax
        state.fill = fill
        return state

    def _grow(self, fill: int, shape: tuple[int, int, int]) -> None:
        need = -(-fill // self.page_size)
        if self.kmin.numel() and self.kmin.shape[2] >= need:
            return
        B, KV, D = shape
        cap = need + need // 4 + 8  # room for the next steps: a copy every few pages, not every page
        kmin, kmax = self.kmin.new_zeros(2, B, KV, cap, D).unbind(0)
        if self.kmin.numel():
            old = self.kmin.shape[2]
            kmin[:, :, :old], kmax[:, :, :old] = self.kmin, self.kmax
        self.kmin, self.kmax = kmin, kmax

    def update(self, layer: "RaggedLayer") -> None:
        """Fold the slots appended since the last step (one per decode step) into the bounds; on a
        static layer the step's one slot, at its device position (no host count changes)."""
        if layer.is_static:
            fold_slot(self.kmin, self.kmax, layer.t_keys, layer.next_pos - 1 - layer.t_pos0, self.offset,
                      self.page_size)
            return
        if layer.t_pos0 != self.t_pos0 or layer.t_fill < self.fill:
            raise RuntimeError("quest: the cache dropped tokens; Quest needs the whole cache (decode_keep = block)")
        fill, new = layer.t_fill, layer.t_fill - self.fill
        if new <= 0:
            return
        self._grow(fill, (layer.t_keys.shape[0], layer.t_keys.shape[1], layer.t_keys.shape[3]))
        for r0, r1, o in self.runs:
            update_page_bounds(self.kmin[r0:r1], self.kmax[r0:r1], layer.t_keys[r0:r1, :, o:fill], self.fill - o, new,
                               self.page_size)
        self.fill = fill

    def selection(self, pages: torch.Tensor, ok: torch.Tensor, end: torch.Tensor | int, T: int) -> DecodeSelection:
        """Row-aligned pages (B, KV, k) (page j of row r: tail slots [s_r + j * page_size, + page_size);
        `ok` marks the valid ones) as a DecodeSelection of tail pages of `granule` slots, valid
        ids ascending first, then -1. end: one past the last filled slot; T: the tail's slots."""
        g, m = self.granule, self.page_size // self.granule
        B, KV, k = pages.shape
        ids = (self.start[:, None, None, None] + pages[..., None] * self.page_size) // g
        ids = ids + torch.arange(m, device=ids.device)  # (B, KV, k, m): the page's granules
        ok = ok[..., None] & (ids * g < end)  # the current page's granules past the fill do not exist
        big = -(-T // g)  # above every granule id: sorts last
        ids = torch.where(ok, ids, big).view(B, KV, k * m).sort(-1).values
        return DecodeSelection(g, torch.where(ids == big, -1, ids).to(torch.int32))


def budget_for(kept_fraction: float, prompt_tokens: int, params: Mapping[str, Any]) -> int:
    """The budget (a multiple of page_size, at least 2 pages) reading closest to kept_fraction of a
    prompt_tokens prompt at each decode step of a selecting layer (the registry's density knob)."""
    ps = int(params.get("page_size", Quest.page_size))
    return max(2, round(kept_fraction * prompt_tokens / ps)) * ps
