"""Plain-PyTorch executor of a BlockPlan: the CPU path, the test oracle and the statement of the semantics.

Query t of row b (query block i = (t - key_start[b]) // block_q) attends to key s iff
key_start[b] <= s <= t and s lies in a key block listed for i ((s - key_start[b]) // block_k in
indices[b, h, indptr[b, h, i]:indptr[b, h, i + 1]]) or s is one of extra_cols[b, h, i] (the union:
a key in both counts once). Padding queries (t < key_start[b]) and queries that see no key output
zeros. Per (row, plan head) the listed blocks are scattered into an (NQ, NKB) table and the mask of
a chunk of queries is read from it: memory O(chunk x L).

In-loop skipping (plan.skip_threshold, BLASST): per query row, a listed key block whose largest
visible logit (log2 domain, as the kernel) is below the largest logit of the listed blocks before
it plus log2(lambda) is dropped from the row's mask (see BlockPlan); the dropped (query, key) pairs
are counted per query head into plan.skip_dropped.
Key logit bias (key_bias=, KeyBias): added to the listed keys' logits before the softmax (and before
the skipping decision, as in the kernel).
"""
from __future__ import annotations

import math

import torch

from .plan import BlockPlan, KeyBias
from .reference import _masked_attention

_LOG2E = 1.4426950408889634  # the kernel's log2 domain: logits2 = q.k x scaling x log2(e)


def _dropped(q: torch.Tensor, k: torch.Tensor, listed: torch.Tensor, kblk: torch.Tensor, nkb: int,
             scaling: float, log2_lam: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Keys each row drops by in-loop skipping: q (g, C, D), k (N, D), listed (C, N) the visible keys of
    listed blocks, kblk (N,) key block of each key. -> (g, C, N) bool (True on every key of a dropped block)."""
    g, C, _ = q.shape
    s = torch.matmul(q, k.T).mul_(scaling * _LOG2E)  # (g, C, N)
    if bias is not None:
        s += bias[:, None, :] * _LOG2E
    s.masked_fill_(~listed, float("-inf"))
    bmax = torch.full((g, C, nkb), float("-inf"), device=q.device)
    bmax.scatter_reduce_(2, kblk.expand(g, C, -1), s, "amax")  # (g, C, NKB) a row's max per key block
    before = torch.cat([bmax.new_full((g, C, 1), float("-inf")), bmax.cummax(-1).values[..., :-1]], dim=-1)
    drop = bmax < before + log2_lam  # -inf + anything stays -inf: the first block is never dropped
    return drop.gather(2, kblk.expand(g, C, -1)) & listed


def block_sparse_prefill_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan, scaling: float, chunk: int = 512,
    key_bias: KeyBias | None = None,
) -> torch.Tensor:
    """q (B, H, L, D), k/v (B, KV, L, D) -> out (B, L, H, D) in q's dtype (fp32 math)."""
    B, H, L, D = q.shape
    KV = k.shape[1]
    plan.validate(H, KV, L)
    if key_bias is not None:
        key_bias.validate(B, H)
    Hp = plan.indptr.shape[1]
    hg = H // Hp  # query heads per plan head (1, or g when the plan is per KV head)
    per_kv = Hp // KV  # plan heads per KV head
    NQ = plan.n_qblocks
    nkb = -(-L // plan.block_k)  # >= every row's key block count
    out = torch.zeros(B, H, L, D, dtype=torch.float32, device=q.device)
    ar = torch.arange(L, device=q.device)
    blk, listed = plan._entry_blocks()  # (B, Hp, NNZ)
    skip = plan.skip_threshold is not None
    if skip:
        lams = plan.skip_threshold.tolist()
        plan.skip_dropped.zero_()
    for b in range(B):
        ks = int(plan.key_start[b])
        if ks >= L:
            continue
        keys = ar[ks:]  # the row's real keys
        kblk = (keys - ks) // plan.block_k
        for h in range(Hp):
            table = torch.zeros(NQ, nkb, dtype=torch.bool, device=q.device)  # (query block, key block) listed
            sel = listed[b, h]
            table[blk[b, h, sel], plan.indices[b, h, sel].long()] = True
            kh = k[b, h // per_kv, ks:].float()  # (L - ks, D)
            vh = v[b, h // per_kv, ks:].float()
            bias = None if key_bias is None else key_bias.lookup(b, slice(h * hg, (h + 1) * hg), keys)  # (hg, N)
            for s in range(ks, L, chunk):
                t = ar[s : min(L, s + chunk)]  # (C,) query positions
                qblk = (t - ks) // plan.block_q
                in_block = table[qblk][:, kblk]  # (C, L - ks) keys of listed blocks
                causal = keys[None, :] <= t[:, None]
                mask = in_block & causal
                qh = q[b, h * hg : (h + 1) * hg, s : s + t.numel()].float()  # (hg, C, D)
                if skip and lams[b] > 0:
                    drop = _dropped(qh, kh, mask, kblk, nkb, scaling, math.log2(lams[b]), bias)  # (hg, C, N)
                    plan.skip_dropped[b, h * hg : (h + 1) * hg] += drop.sum((1, 2))
                    mask = mask & ~drop
                if plan.extra_cols is not None:
                    cols = plan.extra_cols[b, h, qblk]  # (C, n_cols)
                    ok = cols >= ks
                    extra = torch.zeros(t.numel(), L - ks + 1, dtype=torch.bool, device=q.device)
                    extra.scatter_(1, torch.where(ok, cols - ks, L - ks), ok)  # unused slots -> dropped column
                    mask = mask | (extra[:, :-1] & ~in_block & causal)  # a key of a listed block counts once
                out[b, h * hg : (h + 1) * hg, s : s + t.numel()] = _masked_attention(qh, kh, vh, mask, scaling, bias)
    return out.transpose(1, 2).to(q.dtype)
