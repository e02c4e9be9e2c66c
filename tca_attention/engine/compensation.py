"""Compensation entries (RazorAttention): one synthetic key/value per (row, KV head) standing for n
dropped tokens, their mean key and mean value counted n times (logit bias log n).

`merge` adds them to an attention result computed without them, from its log-sum-exp (plain
PyTorch, O(B x H x Q x D): the Triton decode path; the reference includes the entry inside its
softmax, which is the oracle). `fold` updates running means when more tokens are dropped.
"""
from __future__ import annotations

import torch


def merge(q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, c_keys: torch.Tensor, c_values: torch.Tensor,
          c_logw: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, Q, D); out (B, Q, H, D), lse (B, H, Q) fp32 over the other keys; c_keys/c_values
    (B, KV, D), c_logw (B, KV) (-inf: no entry). -> (out, lse) over the other keys and the entry."""
    B, H, Q, D = q.shape
    g = H // c_keys.shape[1]
    ck = c_keys.float().repeat_interleave(g, 1)  # (B, H, D)
    cv = c_values.float().repeat_interleave(g, 1)
    lc = torch.einsum("bhqd,bhd->bhq", q.float(), ck) * scaling + c_logw.float().repeat_interleave(g, 1)[..., None]
    new = torch.logaddexp(lse, lc)  # (B, H, Q)
    ok = torch.isfinite(new)
    new_safe = torch.where(ok, new, torch.zeros_like(new))
    w_old = torch.where(torch.isfinite(lse), torch.exp(lse - new_safe), torch.zeros_like(lse))
    w_c = torch.where(torch.isfinite(lc), torch.exp(lc - new_safe), torch.zeros_like(lc))
    mixed = out.float().transpose(1, 2) * w_old[..., None] + w_c[..., None] * cv[:, :, None, :]  # (B, H, Q, D)
    return mixed.transpose(1, 2).to(out.dtype), new


def fold(c_keys: torch.Tensor, c_values: torch.Tensor, count: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
         drop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Running means after dropping more tokens: c_keys/c_values (B, KV, D) the means of `count`
    (B, KV) float64 tokens; k/v (B, KV, N, D) candidates, drop (B, KV, N) bool the dropped ones.
    -> (keys, values, count) over both (accumulated in fp32, stored in c_keys' dtype)."""
    m = drop.to(torch.float32)
    n_new = drop.sum(-1).to(torch.float64)  # (B, KV)
    total = count + n_new
    denom = total.clamp_min(1).to(torch.float32)[..., None]
    old = count.to(torch.float32)[..., None]
    keys = (c_keys.float() * old + torch.einsum("bkn,bknd->bkd", m, k.float())) / denom
    values = (c_values.float() * old + torch.einsum("bkn,bknd->bkd", m, v.float())) / denom
    return keys.to(c_keys.dtype), values.to(c_values.dtype), total


def log_weight(count: torch.Tensor) -> torch.Tensor:
    """(B, KV) fp32 logit bias of entries standing for `count` tokens (-inf where none)."""
    return torch.where(count > 0, count.clamp_min(1).log(), torch.full_like(count, float("-inf"))).to(torch.float32)
