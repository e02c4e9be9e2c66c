"""TCA Phase 2 (online selection) for one layer: its geometry (SelectionSpec), the plain-PyTorch
reference, and the dispatch to the fused Triton kernel (triton_select.py)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from ...engine.dispatch import Backend, resolve
from ...engine.plan import band_start, pack_mask, rows_blocks
from . import selection as sel


@dataclass(frozen=True)
class SelectionSpec:
    """TCA Phase 2 for one layer: which blocks each row ranks and how many tokens each rank keeps.

    Row r's global blocks are [key_start[r] + j b, key_start[r] + (j + 1) b) for j < n_r, b =
    block_size (blocks count from the row's first real token, so a left-padded row selects exactly
    what it selects alone); n_blocks: n_r as an int (every row) or a (B,) tensor (<= n_max);
    keep_rank (KV, n_max) or (B, KV, n_max): the keep count of the block at each rank of the row's
    own block count (selection.keep_per_rank(p, n_r, b), or keep_per_rank_rows; ranks >= n_r are
    ignored); alpha, mass_norm ("sum" or "max"): Eq. 6's block score; max_kept: the width of
    kept_idx, >= every head's kept count (the Triton path needs it: no host sync; the reference
    uses the largest kept count when it is None); span (odd, >= 1): tokens rank inside their
    block by selection.span_scores(s, span) (option span; 1: by s, the paper's rule), blocks by
    Eq. 6 of s either way.
    """

    key_start: torch.Tensor  # (B,) int64
    keep_rank: torch.Tensor
    n_blocks: int | torch.Tensor
    block_size: int
    alpha: float
    mass_norm: str
    max_kept: int | None = None
    span: int = 1

    @property
    def n_max(self) -> int:
        return self.keep_rank.shape[-1]

    def rows_blocks(self, batch: int, device: torch.device) -> torch.Tensor:
        """(B,) int64 global block count of each row."""
        return rows_blocks(self.n_blocks, batch, device)


# (s (B, KV, L) fp32, h (B, KV, n_max) the block scores exactly as the selection ranks them,
#  spec) -> keep_rank (B, KV, n_max): keep counts chosen from the request itself (adaptive.py)
KeepChooser = Callable[[torch.Tensor, torch.Tensor, "SelectionSpec"], torch.Tensor]


# the fused last_q / union selection computes logits as dots of 16+ rows by a block of keys
WINDOW_MIN_BLOCK = 16


def row_blocks(s: torch.Tensor, spec: SelectionSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's global blocks of s (B, KV, L): -> sb (B, KV, n_max, b) (0 past the row's n_r
    blocks), pos (B, n_max*b) absolute position of each slot, in_glob (B, n_max*b), n_r (B,)."""
    B, KV, L = s.shape
    n_max, block_size = spec.n_max, spec.block_size
    dev = s.device
    nr = spec.rows_blocks(B, dev)
    ar = torch.arange(n_max * block_size, device=dev)
    pos = spec.key_start.to(dev).long()[:, None] + ar  # (B, n_max * b) absolute position of each block slot
    in_glob = ar[None, :] < (nr * block_size)[:, None]  # (B, n_max * b)
    sb = torch.gather(s, 2, pos.clamp(max=L - 1)[:, None, :].expand(B, KV, -1))
    sb = torch.where(in_glob[:, None, :], sb, torch.zeros_like(sb)).view(B, KV, n_max, block_size)
    return sb, pos, in_glob, nr


def block_scores(sb: torch.Tensor, spec: SelectionSpec, nr: torch.Tensor) -> torch.Tensor:
    """Eq. 6 of each row's blocks sb (B, KV, n_max, b) -> h (B, KV, n_max), -inf past n_r."""
    h = sel.block_redundancy(sb, spec.alpha, spec.mass_norm)  # blocks past n_r: no mass, no effect on "max"
    blk_ok = torch.arange(spec.n_max, device=sb.device)[None, :] < nr[:, None]  # (B, n_max)
    return h.masked_fill(~blk_ok[:, None, :], float("-inf"))  # ranked after the row's own blocks


def select_mask_ref(s: torch.Tensor, spec: SelectionSpec, choose: KeepChooser | None = None) -> torch.Tensor:
    """TCA Phase 2 steps 4-6 on importance s (B, KV, L) fp32 -> selection mask (B, KV, L) bool.

    Geometry and keep counts: SelectionSpec (max_kept unused), or the keep counts `choose`
    returns. Blocks are ranked among the row's own blocks only, so a row selects exactly what it
    selects alone (shifted by its padding).
    """
    B, KV, L = s.shape
    n_max, block_size = spec.n_max, spec.block_size
    sb, pos, in_glob, nr = row_blocks(s, spec)
    h = block_scores(sb, spec, nr)
    keep_rank = spec.keep_rank if choose is None else choose(s, h, spec)
    keep = sel.keep_per_block(h, keep_rank.to(s.device).expand(B, KV, n_max))
    if spec.span > 1:  # rank inside blocks by the span scores; blocks stay ranked by s
        sb = row_blocks(sel.span_scores(s, spec.span), spec)[0]
    chosen = sel.topk_within_blocks(sb, keep).view(B, KV, -1) & in_glob[:, None, :]
    mask = torch.zeros(B, KV, L + n_max * block_size, dtype=torch.bool, device=s.device)
    mask.scatter_(2, pos[:, None, :].expand(B, KV, -1), chosen)  # positions are distinct per row
    return mask[..., :L]


def union_mask_ref(s_heads: torch.Tensor, spec: SelectionSpec) -> torch.Tensor:
    """Option gqa="union": every query head selects with its own importance s_heads (B, KV, g, L)
    and the keep counts of its KV head; the KV head keeps the union. -> (B, KV, L) bool."""
    B, KV, g, L = s_heads.shape
    kr = spec.keep_rank
    kr = kr.repeat_interleave(g, dim=-2)  # (KV*g, n) or (B, KV*g, n): each query head its KV head's counts
    per_head = select_mask_ref(s_heads.reshape(B, KV * g, L), replace(spec, keep_rank=kr))
    return per_head.view(B, KV, g, L).any(2)


def retained_mass(s: torch.Tensor, mask: torch.Tensor, local_start: torch.Tensor) -> torch.Tensor:
    """Importance s (B, KV, L) on the kept keys: mask (B, KV, L) plus every key at or after the
    row's local start (B,). -> (B, KV): the selection queries' retained attention mass."""
    local = torch.arange(s.shape[-1], device=s.device)[None, :] >= local_start.to(s.device)[:, None]  # (B, L)
    return (s * mask).sum(-1) + (s * local[:, None, :]).sum(-1)


def select_from_importance_ref(
    s: torch.Tensor, spec: SelectionSpec, choose: KeepChooser | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TCA Phase 2 steps 4-7 on importance s (B, KV, L) fp32 (geometry: SelectionSpec).

    -> kept_idx (B, KV, M) absolute positions ascending, padded with L (M = spec.max_kept, or the
       largest kept count); kept_len (B, KV) int32; retained (B, KV) last-query mass on the kept
       global + local keys.
    """
    mask = select_mask_ref(s, spec, choose)
    kept_idx, kept_len = pack_to_width(mask, spec.max_kept)
    return kept_idx, kept_len, retained_mass(s, mask, local_starts(spec, s.shape[0], s.device))


def pack_to_width(mask: torch.Tensor, max_kept: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """pack_mask of a selection mask (B, KV, L), padded with L to max_kept columns when given
    (ValueError if a head keeps more)."""
    L = mask.shape[-1]
    kept_idx, kept_len = pack_mask(mask)  # padded with L
    if max_kept is not None:
        M = kept_idx.shape[-1]
        if M > max_kept:
            raise ValueError(f"a head keeps {M} tokens, more than max_kept={max_kept}")
        kept_idx = torch.nn.functional.pad(kept_idx, (0, max_kept - M), value=L)
    return kept_idx, kept_len


def local_starts(spec: SelectionSpec, batch: int, device: torch.device) -> torch.Tensor:
    """(B,) int64 first key of each row's local region: key_start + n_r * b."""
    return spec.key_start.to(device).long() + spec.rows_blocks(batch, device) * spec.block_size


def select_and_pack_ref(
    q_last: torch.Tensor, k: torch.Tensor, spec: SelectionSpec, scaling: float, choose: KeepChooser | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """TCA Phase 2 selection (no sink tokens) of q_last (B, H, D) over k (B, KV, L, D), the blocks
    and keep counts of spec (or those `choose` picks from the importance).

    -> kept_idx (B, KV, M), kept_len (B, KV) int32, retained (B, KV), s (B, KV, L) fp32.
    """
    L = k.shape[2]
    valid = torch.arange(L, device=k.device)[None, :] >= spec.key_start.to(k.device)[:, None]
    s = sel.last_query_importance(q_last, k, valid, scaling)
    return (*select_from_importance_ref(s, spec, choose), s)


def window_mask_ref(
    q_win: torch.Tensor, k: torch.Tensor, spec: SelectionSpec, scaling: float, union: bool = False,
    choose: KeepChooser | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Options last_q = r and gqa="union" (docs/method.md): the selection from the importance of
    the last r queries q_win (B, H, r, D) (positions L - r .. L - 1, each seeing the valid keys up
    to itself), pooled over the r queries and, unless union, over the group's query heads; with
    union every query head selects with its own importance and its KV head's keep counts and the
    KV head keeps the union. -> mask (B, KV, L) bool, s (B, KV, L) fp32 (the pooled importance,
    with union the mean over the group), rows: selection.window_rows for r > 1, else None."""
    if union and choose is not None:
        raise ValueError("keep counts chosen per request (floor) and gqa='union' do not combine")
    L = k.shape[2]
    valid = torch.arange(L, device=k.device)[None, :] >= spec.key_start.to(k.device)[:, None]
    rows = sel.window_rows(q_win, k, valid, scaling) if q_win.shape[2] > 1 else None  # (B, KV, g, r, L)
    s_heads = (sel.pool_rows(*rows, per_head=union) if rows is not None
               else sel.window_importance(q_win, k, valid, scaling, per_head=union))
    if union:  # (B, KV, g, L): each query head selects, the KV head keeps the union
        return union_mask_ref(s_heads, spec), s_heads.mean(2), rows
    return select_mask_ref(s_heads, spec, choose), s_heads, rows


def window_retained_ref(s: torch.Tensor, mask: torch.Tensor, rows, local_start: torch.Tensor, window: int
                        ) -> torch.Tensor:
    """Retained mass (B, KV) of window_mask_ref's selection `mask` (B, KV, L) (+ whatever else the
    plan keeps); local_start (B,). r = 1: the last query's (its band is the local region); r > 1:
    each pooled query also attends its own band, which may reach before the local region."""
    if rows is None:
        return retained_mass(s, mask, local_start)
    L, r = s.shape[-1], rows[0].shape[3]
    j = torch.arange(L - r, L, device=s.device)
    return sel.window_retained(*rows, mask, band_start(j[None, :], window, local_start.to(s.device)[:, None]))


def select_and_pack_window_ref(
    q_win: torch.Tensor, k: torch.Tensor, spec: SelectionSpec, scaling: float, window: int, union: bool = False,
    choose: KeepChooser | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """TCA Phase 2 selection (no sink tokens) with options last_q = r = q_win.shape[2] and gqa
    ("union" if union) of the last r queries q_win (B, H, r, D) over k (B, KV, L, D) (see
    window_mask_ref); window: the local window w (the pooled queries' bands).
    -> kept_idx (B, KV, M), kept_len (B, KV) int32, retained (B, KV), s (B, KV, L) fp32."""
    mask, s, rows = window_mask_ref(q_win, k, spec, scaling, union, choose)
    kept_idx, kept_len = pack_to_width(mask, spec.max_kept)
    retained = window_retained_ref(s, mask, rows, local_starts(spec, s.shape[0], s.device), window)
    return kept_idx, kept_len, retained, s


def select_and_pack_window(
    q_win: torch.Tensor, k: torch.Tensor, spec: SelectionSpec, scaling: float, window: int, union: bool = False,
    backend: Backend = "auto", choose: KeepChooser | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """select_and_pack_window_ref on the chosen backend (the Triton path never syncs: it needs
    spec.max_kept, with union a bound of the union). r = 1 without union: select_and_pack."""
    if q_win.shape[2] == 1 and not union:
        return select_and_pack(q_win[:, :, 0], k, spec, scaling, backend, choose)
    if backend == "auto" and spec.block_size < WINDOW_MIN_BLOCK:  # the fused kernels' dot tiles
        backend = "reference"
    if resolve(backend, k.device) == "triton":
        from .triton_select import select_and_pack_window_triton

        return select_and_pack_window_triton(q_win, k, spec, scaling, window, union, choose)
    return select_and_pack_window_ref(q_win, k, spec, scaling, window, union, choose)


def select_and_pack(
    q_last: torch.Tensor, k: torch.Tensor, spec: SelectionSpec, scaling: float, backend: Backend = "auto",
    choose: KeepChooser | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """TCA Phase 2 selection of q_last (B, H, D) over k (B, KV, L, D); see select_and_pack_ref.
    The Triton path never syncs (it needs spec.max_kept)."""
    if resolve(backend, k.device) == "triton":
        from .triton_select import select_and_pack_triton

        return select_and_pack_triton(q_last, k, spec, scaling, choose)
    return select_and_pack_ref(q_last, k, spec, scaling, choose)
