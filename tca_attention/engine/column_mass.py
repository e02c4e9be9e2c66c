"""Column mass: the attention probability each key receives, summed over queries and query heads.

For row b, KV head h and key s:
    mass[b, h, s] = sum over the query heads of h and over queries j of weight[b, j] x P_j(s),
where P_j is query j's softmax (logits q_j . k x scaling) over the keys it sees under the layer's
mask: a TokenPlan's (the kept global keys plus the causal band, engine/reference.py), or, with no
plan (or an attend_all plan), dense causal attention over the real keys (key_start[b] <= s <= j).
A query that sees no key (left padding) contributes nothing. The plan's head_keep is ignored (the
probabilities of every head); a plan with compensation entries is not supported (the entry is
not a key). SpAtten's cumulative token importance is this, summed over KV heads.

`column_mass_ref` is the plain-PyTorch statement (fp32, chunked over queries); the Triton version is
engine/triton_column_mass.py, dispatched by engine/dispatch.column_mass.
"""
from __future__ import annotations

import torch

from .plan import TokenPlan, band_start

# Attention probabilities computed at once (per chunk of queries), fp32.
SCORE_ELEMENTS = 1 << 27


def check_plan(plan: TokenPlan | None) -> TokenPlan | None:
    """The plan whose mask applies (None: dense causal); a compensating plan is refused."""
    if plan is None or plan.attend_all:
        return None
    if plan.compensate is not None and bool(plan.compensate.any()):
        raise NotImplementedError("column mass under a plan with compensation entries (RazorAttention)")
    return plan


def kept_keys(plan: TokenPlan, L: int) -> torch.Tensor:
    """(B, KV, L) bool: the kept global keys of each (row, KV head), those before key_start dropped."""
    B, KV, M = plan.kept_idx.shape
    dev = plan.kept_idx.device
    used = torch.arange(M, device=dev) < plan.kept_len.to(dev).long()[..., None]
    slot = torch.where(used, plan.kept_idx.clamp(0, L), L)  # L: a dump slot
    keep = torch.zeros(B, KV, L + 1, dtype=torch.bool, device=dev).scatter_(2, slot, True)[..., :L]
    return keep & (torch.arange(L, device=dev) >= plan.key_start.to(dev)[:, None, None])


def visible(j: torch.Tensor, L: int, key_start: torch.Tensor, plan: TokenPlan | None,
            keep: torch.Tensor | None) -> torch.Tensor:
    """(B, KV or 1, C, L) bool: which keys queries j (C,) see (keep: kept_keys(plan) when planned)."""
    pos = torch.arange(L, device=j.device)
    vis = (pos[None, None, :] >= key_start[:, None, None]) & (pos[None, None, :] <= j[None, :, None])  # (B, C, L)
    vis = vis[:, None]
    if plan is None:
        return vis
    B, KV = keep.shape[:2]
    w = plan.window_of(B, KV, j.device)[..., None]  # (B, KV, 1)
    ls = plan.local_starts().to(j.device)[:, None, None]  # (B, 1, 1)
    lo = band_start(j[None, None, :], w, ls)  # (B, KV, C)
    return vis & (keep[:, :, None, :] | (pos >= lo[..., None]))


def column_mass_ref(q: torch.Tensor, k: torch.Tensor, scaling: float, key_start: torch.Tensor,
                    weight: torch.Tensor, plan: TokenPlan | None = None) -> torch.Tensor:
    """q (B, H, L, D), k (B, KV, L, D), key_start (B,), weight (B, L) per query -> (B, KV, L) fp32."""
    B, H, L, D = q.shape
    KV = k.shape[1]
    g = H // KV
    plan = check_plan(plan)
    ks = key_start.to(device=q.device, dtype=torch.long)
    keep = kept_keys(plan, L).to(q.device) if plan is not None else None
    w = weight.to(device=q.device, dtype=torch.float32)
    out = torch.zeros(B, KV, L, dtype=torch.float32, device=q.device)
    kf = k.float().transpose(-1, -2)  # (B, KV, D, L)
    C = max(1, SCORE_ELEMENTS // max(1, B * H * L))
    for c0 in range(0, L, C):
        j = torch.arange(c0, min(L, c0 + C), device=q.device)
        qc = q[:, :, c0:c0 + C].float().reshape(B, KV, g * j.numel(), D)
        s = torch.matmul(qc, kf).view(B, KV, g, j.numel(), L) * scaling
        s.masked_fill_(~visible(j, L, ks, plan, keep)[:, :, None], float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num_(0.0)  # a query that sees no key: zeros
        out += torch.einsum("bkgcl,bc->bkl", p, w[:, c0:c0 + C])
    return out
