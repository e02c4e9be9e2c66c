"""Selection primitives of Phase 2, shared by calibration, methods and tests.

All functions are batched over leading dims (B, KV) and work on CPU and GPU alike.
"""
from __future__ import annotations

import torch


def last_query_importance(
    q_last: torch.Tensor, k: torch.Tensor, key_valid: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Eq. 5 with GQA averaging: mean over the group of softmax(q_last K^T * scaling).

    q_last (B, H, D), k (B, KV, L, D), key_valid (B, L) bool or None -> s (B, KV, L), float32.
    """
    B, H, D = q_last.shape
    KV = k.shape[1]
    g = H // KV
    q = q_last.view(B, KV, g, D).float()
    logits = torch.einsum("bkgd,bkld->bkgl", q, k.float()) * scaling  # (B, KV, g, L)
    if key_valid is not None:
        logits = logits.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1).mean(dim=2)


def window_rows(q_win: torch.Tensor, k: torch.Tensor, key_valid: torch.Tensor, scaling: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The causal softmax rows of the last r queries (option last_q=r).

    q_win (B, H, r, D) the queries at positions L - r .. L - 1; k (B, KV, L, D); key_valid (B, L)
    bool. Query L - r + i sees the valid keys <= L - r + i. -> p (B, KV, g, r, L) fp32 (zero rows
    for queries on padding), real (B, r) bool: which queries are real tokens.
    """
    B, H, r, D = q_win.shape
    KV, L = k.shape[1], k.shape[2]
    q = q_win.reshape(B, KV, H // KV, r, D).float()
    logits = torch.einsum("bkgrd,bkld->bkgrl", q, k.float()) * scaling  # (B, KV, g, r, L)
    pos = torch.arange(L, device=k.device)
    causal = pos[None, :] <= (L - r + torch.arange(r, device=k.device))[:, None]  # (r, L)
    seen = causal[None] & key_valid[:, None, :]  # (B, r, L)
    p = torch.softmax(logits.masked_fill(~seen[:, None, None], float("-inf")), dim=-1)
    real = key_valid[:, L - r:]  # (B, r) a query is real iff its own position is a real key
    return torch.where(real[:, None, None, :, None], p, torch.zeros_like(p)), real  # padding queries: no NaN


def pool_rows(p: torch.Tensor, real: torch.Tensor, per_head: bool = False) -> torch.Tensor:
    """Mean of window_rows over the real queries (and over the group's query heads unless per_head).
    p (B, KV, g, r, L), real (B, r) -> (B, KV, L), or (B, KV, g, L) with per_head."""
    s = p.sum(3) / real.sum(-1).clamp_min(1)[:, None, None, None].float()  # (B, KV, g, L)
    return s if per_head else s.mean(2)


def window_importance(
    q_win: torch.Tensor, k: torch.Tensor, key_valid: torch.Tensor, scaling: float, per_head: bool = False
) -> torch.Tensor:
    """Eq. 5 pooled over the last r queries (option last_q=r): the mean over the r queries (and,
    unless per_head, over the query heads of a KV head) of their causal softmax rows (window_rows).
    -> s (B, KV, L) fp32, or (B, KV, g, L) with per_head. With r = 1 and not per_head this is
    last_query_importance, bit for bit.
    """
    if q_win.shape[2] == 1 and not per_head:
        return last_query_importance(q_win[:, :, 0], k, key_valid, scaling)
    return pool_rows(*window_rows(q_win, k, key_valid, scaling), per_head=per_head)


def window_retained(p: torch.Tensor, real: torch.Tensor, kept: torch.Tensor, band_lo: torch.Tensor) -> torch.Tensor:
    """Retained mass of the last r queries: the mean over the real ones (and the query heads) of
    the mass each row puts on what it attends, the kept keys or its own band [band_lo, itself].

    p, real: window_rows; kept (B, KV, L) bool; band_lo (B, r) first key of each query's band
    (engine.plan.band_start). -> (B, KV)."""
    L = p.shape[-1]
    pos = torch.arange(L, device=p.device)
    seen = kept[:, :, None, None, :] | (pos >= band_lo[..., None])[:, None, None]  # (B, KV, 1|g, r, L)
    mass = (p * seen).sum(-1)  # (B, KV, g, r), rows are 0 past their query
    return (mass.sum(-1) / real.sum(-1).clamp_min(1)[:, None, None].float()).mean(-1)


def block_redundancy(s_blocks: torch.Tensor, alpha: float, mass_norm: str = "sum") -> torch.Tensor:
    """Eq. 6: h_j = (1 - alpha) * m_j + alpha * (1 - sum s^2 / (sum s)^2).

    m_j = sum s over the block ("sum"), or that over the largest block mass ("max").
    s_blocks (..., n, b) -> h (..., n). A block with no mass gets concentration 0.
    """
    mass = s_blocks.sum(-1)
    sq = (s_blocks * s_blocks).sum(-1)
    conc = torch.where(mass > 0, 1.0 - sq / mass.clamp_min(1e-30) ** 2, torch.zeros_like(mass))
    m = mass / mass.amax(-1, keepdim=True).clamp_min(1e-30) if mass_norm == "max" else mass
    return (1.0 - alpha) * m + alpha * conc


def ladder_cumsum(p: torch.Tensor) -> torch.Tensor:
    """Cumulative keep distribution in float64, (..., |K|) -> (..., |K|). Computed once (on the CPU)
    and reused, so that the bucket bounds of every block count are the same on every device."""
    return torch.cumsum(p.double(), dim=-1)


def bucket_ends(cum_p: torch.Tensor, n_blocks: int | torch.Tensor) -> torch.Tensor:
    """Eq. 7 bucket bounds for n blocks: rank r is in bucket i iff ends[i-1] <= r < ends[i].

    cum_p (..., |K|) float64 from ladder_cumsum; n_blocks an int or an integer tensor broadcastable
    to cum_p's leading dims with a trailing 1 (e.g. (B, 1, 1) against (KV, |K|)). Only elementwise
    IEEE operations on cum_p (a product and a rounding), so the bounds are bit-identical on the CPU
    and the GPU and for an int n or a tensor holding n. -> ends (..., |K|) int64, ends[..., -1] == n.
    """
    n = n_blocks if isinstance(n_blocks, int) else n_blocks.to(device=cum_p.device, dtype=torch.long)
    cum = torch.round(cum_p * n).long()
    last = torch.as_tensor(n, device=cum_p.device).expand(cum.shape[:-1] + (1,))
    cum = torch.cat([cum[..., :-1], last], dim=-1)
    cum = torch.minimum(cum.clamp_min(0), torch.as_tensor(n, device=cum_p.device))
    return torch.cummax(cum, dim=-1).values


def bucket_sizes(p: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Eq. 7 counts: blocks per keep count (largest first), cumulative rounding, sum == n.

    p (..., |K|) -> counts (..., |K|) int64.
    """
    cum = bucket_ends(ladder_cumsum(p), n_blocks)
    prev = torch.nn.functional.pad(cum[..., :-1], (1, 0))
    return cum - prev


def _keep_of_bucket(ends: torch.Tensor, ranks: torch.Tensor, block_size: int) -> torch.Tensor:
    """Keep count of each rank given bucket bounds. ends (..., |K|), ranks (n,) -> (..., n)."""
    nk = ends.shape[-1]
    bucket = (ends[..., None, :] <= ranks[:, None]).sum(-1).clamp_max(nk - 1)  # buckets ended at or before r
    return torch.bitwise_right_shift(torch.full_like(bucket, block_size), bucket)  # b >> i (no host copy)


def keep_per_rank(p: torch.Tensor, n_blocks: int, block_size: int) -> torch.Tensor:
    """Keep count of the block at each rank (rank 0 = highest h). p (..., |K|) -> (..., n)."""
    ends = bucket_ends(ladder_cumsum(p), n_blocks)
    return _keep_of_bucket(ends, torch.arange(n_blocks, device=p.device), block_size)


def keep_per_rank_rows(cum_p: torch.Tensor, n_rows: torch.Tensor, n_max: int, block_size: int) -> torch.Tensor:
    """keep_per_rank for each row's own block count, on the device, without a host sync.

    cum_p (KV, |K|) float64 (ladder_cumsum), n_rows (B,) blocks of each row (<= n_max)
    -> (B, KV, n_max) int64: row b's entries equal keep_per_rank(p, n_rows[b], b) (bit for bit,
    see bucket_ends), then 0 for ranks >= n_rows[b].
    """
    n = n_rows.to(device=cum_p.device, dtype=torch.long)
    ends = bucket_ends(cum_p[None], n[:, None, None])  # (B, KV, |K|)
    ranks = torch.arange(n_max, device=cum_p.device)
    keep = _keep_of_bucket(ends, ranks, block_size)  # (B, KV, n_max)
    return torch.where(ranks < n[:, None, None], keep, torch.zeros_like(keep))


def keep_per_block(h: torch.Tensor, keep_by_rank: torch.Tensor) -> torch.Tensor:
    """Give the block of rank r the keep count keep_by_rank[r]. h, keep_by_rank (..., n) -> (..., n)."""
    order = torch.argsort(h, dim=-1, descending=True, stable=True)
    return torch.empty_like(keep_by_rank).scatter_(-1, order, keep_by_rank)


def within_block_rank(s_blocks: torch.Tensor) -> torch.Tensor:
    """Rank of each token inside its block by s, 0 = most important. (..., n, b) -> (..., n, b)."""
    order = torch.argsort(s_blocks, dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ar = torch.arange(s_blocks.shape[-1], device=s_blocks.device).expand_as(order)
    return ranks.scatter_(-1, order, ar)


def span_scores(s: torch.Tensor, span: int) -> torch.Tensor:
    """Option span=k: the in-block ranking score of each token, its importance plus the largest
    importance within k // 2 positions on either side (a stride-1 max-pool of width k along the
    last dim, like SnapKV's clustering), so a strongly attended token pulls its neighbours in
    with it and a multi-token value (digits, a name) is kept whole at the same budget; ties
    inside a plateau go to the token's own importance. span=1: s itself. (..., L) -> (..., L)."""
    if span <= 1:
        return s
    shape = s.shape
    flat = s.reshape(-1, 1, shape[-1])
    pooled = torch.nn.functional.max_pool1d(flat, span, stride=1, padding=span // 2)
    return (flat + pooled).view(shape)


def topk_within_blocks(s_blocks: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Eq. 8: keep the top keep[j] tokens of each block by s. (..., n, b), (..., n) -> bool mask."""
    return within_block_rank(s_blocks) < keep[..., None]
