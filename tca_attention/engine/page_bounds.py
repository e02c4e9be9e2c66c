"""Quest's page scoring (Tang et al., 2024): per-page key bounds and an upper bound of q.k per page.

Generic plain-torch functions for methods that pick, at each decode step, which tail pages of a
RaggedCacheView to attend to (DecodeSelection: page p = tail slots [p * page_size, (p + 1) *
page_size)). The bounds cover the tail's capacity, NP = cdiv(T, page_size) pages; only slots
below the fill are folded in (pages past it hold zeros, and top_pages never picks them). Update,
scoring and choice take their shapes from host ints: no host syncs (CUDA-graph friendly).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def page_bounds(t_keys: torch.Tensor, fill: int, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise min and max of the keys t_keys (B, KV, T, D) over each page's slots below fill
    (a partial last page uses only its filled slots). -> kmin, kmax (B, KV, cdiv(T, page_size), D)
    in the keys' dtype. Slots below fill with invalid positions (e.g. left padding) are included:
    they can only loosen the bound."""
    B, KV, T, D = t_keys.shape
    n_pages = -(-T // page_size)
    kmin = t_keys.new_zeros(B, KV, n_pages, D)
    kmax = t_keys.new_zeros(B, KV, n_pages, D)
    update_page_bounds(kmin, kmax, t_keys, 0, fill, page_size)
    return kmin, kmax


def update_page_bounds(
    kmin: torch.Tensor, kmax: torch.Tensor, t_keys: torch.Tensor, first_slot: int, n_new: int, page_size: int
) -> None:
    """Fold the newly filled slots [first_slot, first_slot + n_new) of t_keys (B, KV, T, D) into
    kmin/kmax (B, KV, NP, D) in place (decode: one slot per step). Slots before first_slot must be
    folded in already; a page that starts at or after first_slot is overwritten."""
    T = t_keys.shape[2]
    if first_slot < 0 or first_slot + n_new > T:
        raise ValueError(f"slots [{first_slot}, {first_slot + n_new}) are outside the tail's {T} slots")
    if n_new <= 0:
        return
    B, KV, _, D = t_keys.shape
    p0, p1 = first_slot // page_size, -(-(first_slot + n_new) // page_size)  # pages touched [p0, p1)
    off = first_slot - p0 * page_size  # old slots of page p0
    new = t_keys[:, :, first_slot : first_slot + n_new]  # (B, KV, n_new, D)
    pad = (0, 0, off, (p1 - p0) * page_size - off - n_new)  # to whole pages; the padding never wins
    lo = F.pad(new, pad, value=float("inf")).view(B, KV, p1 - p0, page_size, D).amin(3)
    hi = F.pad(new, pad, value=float("-inf")).view(B, KV, p1 - p0, page_size, D).amax(3)
    if off:  # page p0 keeps its earlier slots
        lo[:, :, 0] = torch.minimum(lo[:, :, 0], kmin[:, :, p0])
        hi[:, :, 0] = torch.maximum(hi[:, :, 0], kmax[:, :, p0])
    kmin[:, :, p0:p1] = lo
    kmax[:, :, p0:p1] = hi


def fold_slot(kmin: torch.Tensor, kmax: torch.Tensor, t_keys: torch.Tensor, slot: torch.Tensor,
              offset: torch.Tensor, page_size: int) -> None:
    """Fold the one new slot `slot` (a device index (1,)) of t_keys (B, KV, T, D) into kmin/kmax
    (B, KV, NP, D) in place, row r's pages counted from slot offset[r] (page p = slots offset[r] +
    [p * page_size, (p + 1) * page_size)): a slot opening its page overwrites the page's bounds.
    Device indices only: no host sync, fixed shapes (a static, graph-captured decode step)."""
    B, KV, _, D = t_keys.shape
    rel = slot - offset  # (B,)
    page = torch.div(rel, page_size, rounding_mode="floor").view(B, 1, 1, 1).expand(B, KV, 1, D)
    opens = (torch.remainder(rel, page_size) == 0).view(B, 1, 1, 1)
    key = t_keys.index_select(2, slot)  # (B, KV, 1, D)
    kmin.scatter_(2, page, torch.where(opens, key, torch.minimum(kmin.gather(2, page), key)))
    kmax.scatter_(2, page, torch.where(opens, key, torch.maximum(kmax.gather(2, page), key)))


def page_upper_bound(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Quest's upper bound of q.k over each page's keys: sum_d max(q_d kmin_d, q_d kmax_d).

    q (B, H, Q, D) (the step's queries, as ragged_decode takes them), kmin/kmax (B, KV, NP, D)
    -> (B, KV, NP) fp32. Quest bounds per query head; we select per KV head, so the g heads (and Q
    queries) of a group share its pages. A group's bound is the max of its rows' bounds, not the
    sum: a page that one head may attend to strongly keeps that head's bound (Quest's guarantee
    for each head), while a sum could rank it below pages every head likes a little.
    """
    B, H, Q, D = q.shape
    KV = kmin.shape[1]
    qg = q.float().reshape(B, KV, H // KV * Q, D)  # (B, KV, g*Q, D): a group's heads are consecutive
    # max(q_d kmin_d, q_d kmax_d) = max(q_d, 0) kmax_d + min(q_d, 0) kmin_d
    bound = qg.clamp_min(0) @ kmax.float().transpose(-1, -2) + qg.clamp_max(0) @ kmin.float().transpose(-1, -2)
    return bound.amax(2)  # (B, KV, NP)


def top_pages(
    bound: torch.Tensor, k: int, fill: int, page_size: int, always: tuple[int, int] = (0, 1)
) -> torch.Tensor:
    """The k pages of largest bound (B, KV, NP) per (row, KV head) among the filled ones (pages
    [0, cdiv(fill, page_size))), always including the first always[0] (sink) pages and the last
    always[1] >= 1 filled pages (the current page). -> pages (B, KV, k) int32 for DecodeSelection:
    ascending, padded with -1 when fewer than k pages are filled."""
    first, last = always
    if last < 1 or first < 0 or first + last > k:
        raise ValueError(f"always={always} must keep the last page (>= 1) and fit in k={k} pages")
    n = -(-fill // page_size)  # filled pages
    if n > bound.shape[-1]:
        raise ValueError(f"fill {fill} needs {n} pages, the bound has {bound.shape[-1]}")
    score = bound[..., :n].float().clone()
    score[..., :first] = float("inf")
    score[..., max(n - last, 0) :] = float("inf")
    m = min(k, n)
    pages = score.topk(m, dim=-1).indices.sort(-1).values.to(torch.int32)  # (B, KV, m)
    return F.pad(pages, (0, k - m), value=-1)
