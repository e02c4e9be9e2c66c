"""Executors of a SubsetPlan: compress q/k/v to each head's token subset, attend densely and
causally among it, decompress the output back to the full sequence (zeros elsewhere).

subset_prefill_ref: plain PyTorch, one (row, plan head) at a time in fp32 with an explicit mask;
the CPU oracle and the statement of the semantics (plan.SubsetPlan).
subset_prefill_gather: the fast path on any device: one gather of the subsets into dense
(B, H, M, D) tensors, one causal SDPA call over them (the dense kernel the device has: flash or
cuDNN on a GPU), one scatter back. Subsets are ascending, so causality in compressed order is
causality in positions, and padding entries (after every listed one) are never seen by a listed
query; their outputs are dropped by the scatter.
Key logit bias (key_bias=, plan.KeyBias): added to the listed keys' logits; the gather path then runs
SDPA with an additive mask over the subset, `_CHUNK` compressed queries at a time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .plan import KeyBias, SubsetPlan
from .reference import _masked_attention

_CHUNK = 1024  # compressed queries per biased SDPA call: its mask is (B, H, _CHUNK, M)


def subset_prefill_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: SubsetPlan, scaling: float,
                       key_bias: KeyBias | None = None) -> torch.Tensor:
    """q (B, H, L, D), k/v (B, KV, L, D) -> out (B, L, H, D) in q's dtype (fp32 math)."""
    B, H, L, D = q.shape
    KV = k.shape[1]
    plan.validate(H, KV, L)
    if key_bias is not None:
        key_bias.validate(B, H)
    Hp = plan.idx.shape[1]
    hg, per_kv = H // Hp, Hp // KV  # query heads per plan head; plan heads per KV head
    out = torch.zeros(B, H, L, D, dtype=torch.float32, device=q.device)
    for b in range(B):
        for h in range(Hp):
            s = plan.idx[b, h, : int(plan.length[b, h])]  # (m,) positions
            if s.numel() == 0:
                continue
            mask = s[None, :] <= s[:, None]  # (m, m) causal among the subset
            qh = q[b, h * hg : (h + 1) * hg][:, s].float()  # (hg, m, D)
            kh, vh = k[b, h // per_kv][s].float(), v[b, h // per_kv][s].float()  # (m, D)
            bias = None if key_bias is None else key_bias.lookup(b, slice(h * hg, (h + 1) * hg), s)
            out[b, h * hg : (h + 1) * hg][:, s] = _masked_attention(qh, kh, vh, mask, scaling, bias)
    return out.transpose(1, 2).to(q.dtype)


def subset_prefill_gather(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: SubsetPlan, scaling: float,
                          key_bias: KeyBias | None = None) -> torch.Tensor:
    """q (B, H, L, D), k/v (B, KV, L, D) -> out (B, L, H, D) in q's dtype; no host sync."""
    B, H, L, D = q.shape
    KV = k.shape[1]
    idx = plan.idx.clamp(max=L - 1)  # (B, Hp, M) padding entries read the last token (never seen)
    Hp, M = idx.shape[1:]
    hg = H // Hp
    qi = idx.repeat_interleave(hg, dim=1) if hg > 1 else idx  # (B, H, M)
    qc = q.gather(2, qi[..., None].expand(B, H, M, D))  # (B, H, M, D)
    if Hp == KV:  # one subset per KV head: k/v compressed once, shared by the group (GQA)
        kc = k.gather(2, idx[..., None].expand(B, KV, M, D))
        vc = v.gather(2, idx[..., None].expand(B, KV, M, D))
        o = _sdpa(qc, kc, vc, scaling, key_bias, qi, L)
    else:  # one subset per query head: each reads its own subset of its KV head's keys
        b = torch.arange(B, device=q.device)[:, None, None]
        kvh = (torch.arange(H, device=q.device) // (H // KV))[None, :, None]
        kc, vc = k[b, kvh, idx], v[b, kvh, idx]  # (B, H, M, D)
        o = _sdpa(qc, kc, vc, scaling, key_bias, qi, L)
    used = torch.arange(M, device=q.device) < plan.length.repeat_interleave(hg, dim=1)[..., None]  # (B, H, M)
    slot = torch.where(used, qi, L)  # padding entries -> a dump slot
    out = q.new_zeros(B, H, L + 1, D).scatter_(2, slot[..., None].expand(B, H, M, D), o.to(q.dtype))
    return out[:, :, :L].transpose(1, 2)


def _sdpa(qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, scaling: float, key_bias: KeyBias | None,
          qi: torch.Tensor, L: int) -> torch.Tensor:
    """Causal SDPA among the compressed subsets (qc (B, H, M, D), kc/vc (B, H or KV, M, D)); with a
    key bias, an additive mask of the biases of each head's compressed keys (positions qi (B, H, M))."""
    gqa = qc.shape[1] != kc.shape[1]
    if key_bias is None:
        return F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=scaling, enable_gqa=gqa)
    M = qc.shape[2]
    kb = key_bias.rows(L).to(qc.device).gather(2, qi)[:, :, None, :]  # (B, H, 1, M) per compressed key
    ar = torch.arange(M, device=qc.device)
    out = torch.empty_like(qc)
    for s0 in range(0, M, _CHUNK):
        causal = ar[None, :] <= ar[s0 : s0 + _CHUNK, None]  # (C, M)
        mask = torch.where(causal, kb, float("-inf")).to(qc.dtype)  # (B, H, C, M)
        out[:, :, s0 : s0 + _CHUNK] = F.scaled_dot_product_attention(
            qc[:, :, s0 : s0 + _CHUNK], kc, vc, attn_mask=mask, scale=scaling, enable_gqa=gqa)
    return out
