"""Adaptive mode (option floor=f): per request and per KV head, the cheapest candidate of the
calibration ladder whose selection keeps a retained mass >= f for this prompt, else dense.

The calibrated budget is a per-head average over one calibration text; a given prompt may need
more (the head's mass is spread out: the budget grows) or less (the mass is concentrated: it
shrinks). The retained mass of every candidate follows from one importance vector without
running the selection once per candidate: the blocks are ranked by h once (the ranking does not
depend on the candidate), and the mass the top t tokens of a block keep is a cumulative sum of
its sorted importances, so candidate c keeps sum over ranks r of top[r, keep_c(r)]. All on the
device, no host sync; the chosen counts then go through the normal selection (Triton or reference).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import selection as sel
from .select import SelectionSpec, row_blocks


@dataclass(frozen=True)
class FloorChooser:
    """A select.KeepChooser: keep counts per rank of the cheapest ladder candidate reaching
    `floor`, per (row, KV head); all-b (dense) where none does.

    cum_ladder (M, |K|) float64: selection.ladder_cumsum of the candidate ladder, cheapest first,
    on the device the selection runs on.
    """

    cum_ladder: torch.Tensor
    floor: float

    def candidate_mass(self, s: torch.Tensor, h: torch.Tensor, spec: SelectionSpec) -> torch.Tensor:
        """Retained mass of every candidate: (B, KV, M), and its keep counts per rank (B, M, n_max)."""
        B, KV, L = s.shape
        n_max, b = spec.n_max, spec.block_size
        sb, _, _, nr = row_blocks(s, spec)  # (B, KV, n_max, b)
        order = torch.argsort(h, dim=-1, descending=True, stable=True)  # block of each rank, as the selection
        top = torch.sort(sb, dim=-1, descending=True).values.cumsum(-1)
        top = torch.nn.functional.pad(top, (1, 0))  # (B, KV, n_max, b + 1): mass of the top t tokens
        top = torch.gather(top, 2, order[..., None].expand(-1, -1, -1, b + 1))  # by rank
        kr = sel.keep_per_rank_rows(self.cum_ladder, nr, n_max, b)  # (B, M, n_max), 0 past n_r
        M = kr.shape[1]
        idx = kr[:, None, :, :, None].expand(B, KV, M, n_max, 1)
        kept = torch.gather(top[:, :, None].expand(B, KV, M, n_max, b + 1), -1, idx)[..., 0].sum(-1)  # (B, KV, M)
        local_start = spec.key_start.to(s.device).long() + nr * b
        local = torch.arange(L, device=s.device)[None, :] >= local_start[:, None]  # (B, L)
        return kept + (s * local[:, None, :]).sum(-1)[..., None], kr

    def __call__(self, s: torch.Tensor, h: torch.Tensor, spec: SelectionSpec) -> torch.Tensor:
        B, KV, _ = s.shape
        mass, kr = self.candidate_mass(s, h, spec)
        ok = mass >= self.floor  # (B, KV, M)
        first = ok.int().argmax(-1)  # the cheapest candidate reaching the floor (0 when none)
        M, n_max = kr.shape[1], spec.n_max
        chosen = torch.gather(kr[:, None].expand(B, KV, M, n_max), 2, first[..., None, None].expand(B, KV, 1, n_max))[:, :, 0]
        nr = spec.rows_blocks(B, s.device)
        dense = torch.where(torch.arange(n_max, device=s.device)[None, :] < nr[:, None], spec.block_size, 0)  # (B, n_max)
        return torch.where(ok.any(-1)[..., None], chosen, dense[:, None, :]).to(torch.int32)
