"""Plain-PyTorch executors: the CPU path, the test oracle and the statement of the semantics.

Prefill: query j of row r attends to the kept global keys before its band, plus its band (causal
window, per KV head when the plan has head_window, extended to the row's local start for queries in
the row's local region). Keys are gathered per
head; no L x L mask is built (memory is O(chunk x (kept + window))).
Decode: queries attend to every valid cached key at or before their position (of the tail, only
the selected pages' keys when a DecodeSelection is given).
Key logit bias (KeyBias, every executor's key_bias=): added to the logits of the listed keys a query
sees, before the softmax. `dense_biased` is the dense path with a bias (SDPA with an additive mask).
"""
from __future__ import annotations

import torch

from .plan import DecodeSelection, KeyBias, RaggedCacheView, TokenPlan, band_start


def _softmax_out(logits: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked (-inf) logits (..., Q, N) fp32, v (..., N, D) -> out (..., Q, D), lse (..., Q).

    Fully masked rows give zeros (and lse = -inf), never NaN.
    """
    lse = torch.logsumexp(logits, dim=-1)
    p = torch.exp(logits - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
    return p @ v.float(), lse


def _masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scaling: float,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scaling (+ bias), masked) v for q (g, C, D), k/v (N, D), mask (C, N) or (g, C, N),
    bias (g, N) per head and key (the key logit bias); empty rows -> 0."""
    logits = torch.matmul(q, k.T).mul_(scaling)  # (g, C, N)
    if bias is not None:
        logits += bias[:, None, :]
    logits.masked_fill_(~mask, float("-inf"))
    o = torch.matmul(torch.softmax(logits, dim=-1), v)
    return o.masked_fill_(~mask.any(-1).expand(o.shape[:-1])[..., None], 0.0)


def sparse_prefill_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: TokenPlan, scaling: float, chunk: int = 512,
    key_bias: KeyBias | None = None,
) -> torch.Tensor:
    """q (B, H, L, D), k/v (B, KV, L, D) -> out (B, L, H, D) in q's dtype."""
    B, H, L, D = q.shape
    if key_bias is not None:
        key_bias.validate(B, H)
    KV = k.shape[1]
    g = H // KV
    out = torch.zeros(B, H, L, D, dtype=torch.float32, device=q.device)
    ar = torch.arange(L, device=q.device)
    local_starts = plan.local_starts().tolist()
    windows = plan.window_of(B, KV).tolist()  # (B, KV) per-head windows (all plan.window by default)
    for b in range(B):
        ks = int(plan.key_start[b])
        ls = local_starts[b]
        for h in range(KV):
            kept = plan.kept_idx[b, h, : int(plan.kept_len[b, h])]
            kept = kept[kept >= ks]
            qh = q[b, h * g : (h + 1) * g].float()  # (g, L, D)
            kh, vh = k[b, h].float(), v[b, h].float()  # (L, D)
            kk, vk = kh[kept], vh[kept]  # (m, D)
            for s in range(0, L, chunk):
                e = min(L, s + chunk)
                j = ar[s:e]
                lo = band_start(j, windows[b][h], ls)  # (C,)
                band_lo = max(int(lo.min()), ks, 0)
                kb = ar[band_lo:e]
                band_mask = (kb[None, :] >= lo[:, None]) & (kb[None, :] <= j[:, None]) & (kb[None, :] >= ks)
                n_far = int(torch.searchsorted(kept, lo.max()).item()) if kept.numel() else 0
                far_mask = kept[None, :n_far] < lo[:, None]
                mask = torch.cat([far_mask, band_mask], dim=1)  # (C, n_far + band)
                keys = torch.cat([kk[:n_far], kh[band_lo:e]], dim=0)
                vals = torch.cat([vk[:n_far], vh[band_lo:e]], dim=0)
                bias = None if key_bias is None else key_bias.lookup(
                    b, slice(h * g, (h + 1) * g), torch.cat([kept[:n_far], ar[band_lo:e]]))
                out[b, h * g : (h + 1) * g, s:e] = _masked_attention(qh[:, s:e], keys, vals, mask, scaling, bias)
    return out.transpose(1, 2).to(q.dtype)


def ragged_decode_ref(
    q: torch.Tensor, cache: RaggedCacheView, scaling: float, selection: DecodeSelection | None = None,
    key_bias: KeyBias | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (B, H, Q, D) over a ragged global part plus a dense tail (layout and
    visibility: RaggedCacheView; selection: only the listed tail pages, see DecodeSelection).
    -> out (B, Q, H, D) in q's dtype, lse (B, H, Q) fp32.
    """
    c = cache
    B, H, Q, D = q.shape
    KV, T = c.t_keys.shape[1:3]
    g = H // KV
    if key_bias is not None:
        key_bias.validate(B, H)
    if selection is not None:
        selection.validate(c)
        tail_sel = selection.tail_mask(T)  # (B, KV, T)
    out = torch.empty(B, H, Q, D, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, H, Q, dtype=torch.float32, device=q.device)
    for b in range(B):
        for h in range(KV):
            s, e = int(c.g_offsets[b * KV + h]), int(c.g_offsets[b * KV + h + 1])
            keys = torch.cat([c.g_keys[s:e], c.t_keys[b, h]], dim=0).float()
            vals = torch.cat([c.g_values[s:e], c.t_values[b, h]], dim=0).float()
            pos = torch.cat([c.g_pos[s:e], c.t_pos[b]], dim=0)
            visible = (pos[None, :] >= 0) & (pos[None, :] <= c.q_pos[b][:, None])  # (Q, N)
            if selection is not None:
                visible[:, e - s :] &= tail_sel[b, h]
            logits = (q[b, h * g : (h + 1) * g].float() @ keys.T) * scaling  # (g, Q, N)
            if key_bias is not None:
                logits = logits + key_bias.lookup(b, slice(h * g, (h + 1) * g), pos)[:, None, :]
            logits = logits.masked_fill(~visible, float("-inf"))
            if c.c_keys is not None:  # the compensation entry: one more key, biased by log(count)
                lc = (q[b, h * g : (h + 1) * g].float() @ c.c_keys[b, h].float()) * scaling + c.c_logw[b, h].float()
                logits = torch.cat([logits, lc[..., None]], -1)  # (g, Q, N + 1)
                vals = torch.cat([vals, c.c_values[b, h].float()[None]], 0)
            o, l = _softmax_out(logits, vals)
            out[b, h * g : (h + 1) * g] = o
            lse[b, h * g : (h + 1) * g] = l
    return out.transpose(1, 2).to(q.dtype), lse


def dense_causal_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, key_start: torch.Tensor | None = None
) -> torch.Tensor:
    """Dense causal GQA attention in fp32 (test oracle). -> (B, L, H, D)."""
    B, H, L, D = q.shape
    g = H // k.shape[1]
    kk = k.float().repeat_interleave(g, dim=1)
    vv = v.float().repeat_interleave(g, dim=1)
    logits = (q.float() @ kk.transpose(-1, -2)) * scaling
    ar = torch.arange(L, device=q.device)
    mask = ar[None, :] <= ar[:, None]
    if key_start is not None:
        mask = mask[None] & (ar[None, None, :] >= key_start[:, None, None])
        mask = mask[:, None]
    logits = logits.masked_fill(~mask, float("-inf"))
    return _softmax_out(logits, vv)[0].transpose(1, 2).to(q.dtype)


def dense_biased(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, key_bias: KeyBias,
    key_start: torch.Tensor | None = None, chunk: int = 1024,
) -> torch.Tensor:
    """Dense causal GQA prefill with a key logit bias: PyTorch SDPA with an additive float mask (0 on
    visible keys plus the bias, -inf elsewhere), `chunk` queries at a time (the mask of a chunk is
    (B, H, chunk, L) floats). The dense path of a biased method (plans that are None). q (B, H, L, D),
    k/v (B, KV, L, D), key_start (B,) leading padding -> (B, L, H, D) in q's dtype; padding queries 0."""
    B, H, L, D = q.shape
    ks = torch.zeros(B, dtype=torch.long, device=q.device) if key_start is None else key_start.long()
    rows = key_bias.rows(L).to(q.device)[:, :, None, :]  # (B, H, 1, L)
    ar = torch.arange(L, device=q.device)
    out = torch.empty(B, H, L, D, dtype=q.dtype, device=q.device)
    for s in range(0, L, chunk):
        j = ar[s : s + chunk]
        vis = (ar[None, None, :] <= j[None, :, None]) & (ar[None, None, :] >= ks[:, None, None])  # (B, C, L)
        empty = ~vis.any(-1)  # padding queries: let them see everything, zero them after
        vis = vis | empty[..., None]
        mask = torch.where(vis[:, None], rows, float("-inf")).to(q.dtype)  # (B, H, C, L)
        o = torch.nn.functional.scaled_dot_product_attention(q[:, :, s : s + chunk], k, v, attn_mask=mask,
                                                             scale=scaling, enable_gqa=True)
        out[:, :, s : s + chunk] = o.masked_fill(empty[:, None, :, None], 0.0)
    return out.transpose(1, 2)
