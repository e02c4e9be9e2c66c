"""Plain-PyTorch executor of a BlockPlan: the CPU path, the test oracle and the statement of the semantics.

Query t of row b (query block i = (t - key_start[b]) // block_q) attends to key s iff
key_start[b] <= s <= t and s lies in a key block listed for i ((s - key_start[b]) // block_k in
indices[b, h, indptr[b, h, i]:indptr[b, h, i + 1]]) or s is one of extra_cols[b, h, i] (the union:
a key in both counts once). Padding queries (t < key_start[b]) and queries that see no key output
zeros. Per (row, plan head) the listed blocks are scattered into an (NQ, NKB) table and the mask of
a chunk of queries is read from it: memory O(chunk x L).
"""
from __future__ import annotations

import torch

from .plan import BlockPlan
from .reference import _masked_attention


def block_sparse_prefill_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan, scaling: float, chunk: int = 512
) -> torch.Tensor:
    """q (B, H, L, D), k/v (B, KV, L, D) -> out (B, L, H, D) in q's dtype (fp32 math)."""
    B, H, L, D = q.shape
    KV = k.shape[1]
    plan.validate(H, KV, L)
    Hp = plan.indptr.shape[1]
    hg = H // Hp  # query heads per plan head (1, or g when the plan is per KV head)
    per_kv = Hp // KV  # plan heads per KV head
    NQ = plan.n_qblocks
    nkb = -(-L // plan.block_k)  # >= every row's key block count
    out = torch.zeros(B, H, L, D, dtype=torch.float32, device=q.device)
    ar = torch.arange(L, device=q.device)
    blk, listed = plan._entry_blocks()  # (B, Hp, NNZ)
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
            for s in range(ks, L, chunk):
                t = ar[s : min(L, s + chunk)]  # (C,) query positions
                qblk = (t - ks) // plan.block_q
                mask = table[qblk][:, kblk]  # (C, L - ks)
                if plan.extra_cols is not None:
                    cols = plan.extra_cols[b, h, qblk]  # (C, n_cols)
                    ok = cols >= ks
                    extra = torch.zeros(t.numel(), L - ks + 1, dtype=torch.bool, device=q.device)
                    extra.scatter_(1, torch.where(ok, cols - ks, L - ks), ok)  # unused slots -> dropped column
                    mask |= extra[:, :-1]
                mask &= keys[None, :] <= t[:, None]
                qh = q[b, h * hg : (h + 1) * hg, s : s + t.numel()].float()  # (hg, C, D)
                out[b, h * hg : (h + 1) * hg, s : s + t.numel()] = _masked_attention(qh, kh, vh, mask, scaling)
    return out.transpose(1, 2).to(q.dtype)
