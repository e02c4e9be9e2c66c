"""The log-Gaussian candidate ladder of Phase 1 (calibration)."""
from __future__ import annotations

import math

import torch


def keep_counts(block_size: int) -> list[int]:
    """Allowed keep counts per block, largest first: [b, b/2, ..., 1]."""
    return [block_size >> i for i in range(int(math.log2(block_size)) + 1)]


def candidate_ladder(block_size: int, sigma: float = 1.0) -> torch.Tensor:
    """Candidates as rows of p over keep_counts(b) (largest first), cheapest first.

    p_k = phi(log2 k) / sum phi, phi(x) = exp(-(x - mu)^2 / (2 sigma^2)),
    mu = 0, 0.5, ..., (2 log2 b - 1) / 2: 14 candidates at b = 128. Shape (M, |K|), float64.
    """
    ks = torch.tensor(keep_counts(block_size), dtype=torch.float64)
    x = torch.log2(ks)
    n_mu = 2 * int(math.log2(block_size))
    mus = torch.arange(n_mu, dtype=torch.float64) * 0.5
    phi = torch.exp(-((x[None, :] - mus[:, None]) ** 2) / (2 * sigma**2))
    p = phi / phi.sum(dim=1, keepdim=True)
    order = torch.argsort(expected_keep(p, block_size), stable=True)
    return p[order]


def expected_keep(p: torch.Tensor, block_size: int) -> torch.Tensor:
    """E[k] = sum_k k p_k for each candidate row (..., |K|) -> (...)."""
    ks = torch.tensor(keep_counts(block_size), dtype=p.dtype, device=p.device)
    return (p * ks).sum(-1)


def decode_keep(p: torch.Tensor, block_size: int) -> int:
    """Tokens kept when decode compresses one block: floor(sum_k k p_k)."""
    return int(math.floor(float(expected_keep(p, block_size)) + 1e-9))
