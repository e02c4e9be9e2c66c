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


def bucket_sizes(p: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Eq. 7 counts: blocks per keep count (largest first), cumulative rounding, sum == n.

    p (..., |K|) -> counts (..., |K|) int64.
    """
    cum = torch.round(torch.cumsum(p.double(), dim=-1) * n_blocks).long()
    cum[..., -1] = n_blocks
    cum = torch.cummax(cum.clamp(0, n_blocks), dim=-1).values
    prev = torch.nn.functional.pad(cum[..., :-1], (1, 0))
    return cum - prev


def keep_per_rank(p: torch.Tensor, n_blocks: int, block_size: int) -> torch.Tensor:
    """Keep count of the block at each rank (rank 0 = highest h). p (..., |K|) -> (..., n)."""
    ks = torch.tensor([block_size >> i for i in range(p.shape[-1])], device=p.device)
    sizes = bucket_sizes(p, n_blocks)  # (..., |K|)
    ends = torch.cumsum(sizes, dim=-1)  # rank r is in bucket i iff ends[i-1] <= r < ends[i]
    ranks = torch.arange(n_blocks, device=p.device)
    bucket = torch.searchsorted(ends.contiguous(), ranks.expand(*ends.shape[:-1], n_blocks).contiguous(), right=True)
    return ks[bucket.clamp_max(len(ks) - 1)]


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


def topk_within_blocks(s_blocks: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Eq. 8: keep the top keep[j] tokens of each block by s. (..., n, b), (..., n) -> bool mask."""
    return within_block_rank(s_blocks) < keep[..., None]


def pack_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending indices of True entries, padded: (..., N) bool -> idx (..., M) int64, len (...) int32.

    Padding entries hold N (one past the end) so they sort last and are easy to spot.
    """
    N = mask.shape[-1]
    lengths = mask.sum(-1)
    M = int(lengths.max()) if mask.numel() else 0
    ar = torch.arange(N, device=mask.device)
    key = torch.where(mask, ar, ar + N)
    idx = torch.sort(key, dim=-1).values[..., :M]
    idx = torch.where(idx >= N, torch.full_like(idx, N), idx)
    return idx, lengths.to(torch.int32)
