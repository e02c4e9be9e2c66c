"""The per-request quality certificate of a token plan: retained mass -> output-error bound.

The bound is TCA-Attention's (arXiv 2512.09238, Sec. "Theoretical analysis", as read in
docs/method.md "Quality certificate"): for query i with attention row a_i over all keys and
gamma_i = the full-attention mass on the dropped keys, the sparse output (softmax renormalised
over the kept keys) satisfies

    ||Att_i - Att~_i||_1 <= 2 gamma_i ||V||_inf,

||.||_1 over the head dimension, ||V||_inf the induced infinity norm of V (L, D): the largest
row sum max_k ||v_k||_1. (Proof: Att_i - Att~_i = sum_k (a_ik - a~_ik) v_k, and
||a_i - a~_i||_1 = 2 gamma_i exactly when a~_i is a_i renormalised over the kept keys.)

TokenPlan.retained is 1 - gamma averaged over the queries a method selects with (TCA: the last
query of each query head of the KV head, pooled as its selection pools them); by linearity the
bound then holds for the mean over those queries of ||Att_i - Att~_i||_1. Everything here stays
on the device (no host sync): the session reads the numbers only when a report is asked for.
"""
from __future__ import annotations

import torch


def value_norm(v: torch.Tensor, key_start: torch.Tensor) -> torch.Tensor:
    """||V||_inf per (row, KV head): the largest L1 norm of a real (non-padding) value row.

    v (B, KV, L, D), key_start (B,) -> (B, KV) float32."""
    L = v.shape[2]
    valid = torch.arange(L, device=v.device)[None, :] >= key_start.to(v.device)[:, None]  # (B, L)
    # (B, KV, L), no fp32 copy of v; a float64 v (which cannot narrow in the norm) is normed in float64
    rows = torch.linalg.vector_norm(v, 1, dim=-1, dtype=torch.promote_types(v.dtype, torch.float32)).float()
    return torch.where(valid[:, None, :], rows, torch.zeros_like(rows)).amax(-1)


def error_bound(retained: torch.Tensor, v: torch.Tensor, key_start: torch.Tensor) -> torch.Tensor:
    """2 (1 - retained) ||V||_inf per (row, KV head): the bound on the mean over the selection
    queries of ||Att_i - Att~_i||_1 (float rounding can push retained a hair above 1: clamped).

    retained (B, KV), v (B, KV, L, D), key_start (B,) -> (B, KV) float32."""
    gamma = (1.0 - retained.float()).clamp_min(0.0)
    return 2.0 * gamma * value_norm(v, key_start)
