"""LongHeads (Lu et al., 2024, "LongHeads: Multi-Head Attention is Secretly a Long Context
Processor"): every query head attends to a few context chunks of its own choice, so that each head
stays within the length it was trained on while the heads together cover the whole context.

The prompt is cut into chunks of `chunk_size` tokens (counted from each row's first real token).
Per query head h and chunk c, a chunk representation is built from the chunk's keys by attention
pooling: the chunk's mean query u = mean_t q_t pools its keys, rep = softmax(u . K_c^T * scaling) K_c.
Query chunk i scores key chunk j by (mean query of chunk i) . rep_j, i.e. the mean over the chunk's
queries of q_t . rep_j. Chunk i attends to the first chunk, the previous chunk and itself (the
local tokens), plus the best-scoring other causal chunks, `chunks` chunks in all (ties: lower
chunk first); a chunk with at most `chunks` causal chunks keeps them all.

On the engine: a BlockPlan per query head with block_q = block_k = chunk_size, executed by the
shared block-sparse kernel. Decode is dense (the cache keeps everything). One host sync per layer
in a padded batch (the smallest key_start, the plan's NQ); list lengths are known on the host.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ..engine.plan import BlockPlan
from .base import Method, check_key_block, pack_lists, real_tokens, row_aligned

# Pooling logits (H, chunks, chunk_size) and chunk scores (H, query chunks, NC) of a row computed at
# once: 64M elements a row at most (fp32, and fp64 / int64 for the ranking).
_POOL_ELEMENTS = 1 << 26


def chunk_representations(
    q: torch.Tensor, k: torch.Tensor, key_start: torch.Tensor, scaling: float, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean query and pooled-key representation of every chunk, per query head, rows aligned to
    key_start. q (B, H, L, D), k (B, KV, L, D) -> (qbar, rep), each (B, H, NC, D) fp32,
    NC = ceil(L / chunk_size). Chunks past a row's prompt are zero; a partial last chunk uses its
    real tokens only."""
    B, H, L, D = q.shape
    KV = k.shape[1]
    g, cs = H // KV, chunk_size
    nc = -(-L // cs)
    real = real_tokens(L, key_start, nc * cs).view(B, nc, cs)  # (B, NC, cs)
    n = real.sum(-1).clamp_min(1)  # (B, NC)
    qa = row_aligned(q, key_start, nc * cs).view(B, H, nc, cs, D)
    qbar = qa.sum(3, dtype=torch.float32) / n[:, None, :, None]  # (B, H, NC, D), padding is zero
    ka = row_aligned(k, key_start, nc * cs).view(B, KV, nc, cs, D).float()
    rep = torch.zeros(B, H, nc, D, dtype=torch.float32, device=q.device)
    step = max(1, _POOL_ELEMENTS // max(H * cs, 1))  # per row: the same chunks alone and in a batch
    for c0 in range(0, nc, step):
        c1 = min(nc, c0 + step)
        u = qbar[:, :, c0:c1].view(B, KV, g, c1 - c0, D)
        kc = ka[:, :, c0:c1]  # (B, KV, c, cs, D)
        logits = torch.einsum("bkgcd,bkcsd->bkgcs", u, kc) * scaling
        logits = logits.masked_fill(~real[:, None, None, c0:c1], float("-inf"))
        p = torch.softmax(logits, dim=-1).nan_to_num_(0.0)  # chunks past the prompt: all -inf
        rep[:, :, c0:c1] = torch.einsum("bkgcs,bkcsd->bkgcd", p, kc).reshape(B, H, c1 - c0, D)
    return qbar, rep


def select_chunks(scores: torch.Tensor, chunks: int, first: int = 0) -> torch.Tensor:
    """scores (..., nb, NC) of query chunks first + [0, nb) for key chunk j -> keep (..., nb, NC) bool.

    Kept for query chunk i: chunks 0, i - 1 and i (forced), then the other causal chunks in
    descending score (ties: lower j first) until `chunks` are kept; all causal chunks when there
    are at most `chunks`."""
    nb, nc = scores.shape[-2:]
    dev = scores.device
    i = first + torch.arange(nb, device=dev)[:, None]
    j = torch.arange(nc, device=dev)[None, :]
    causal = j <= i
    forced = causal & ((j == 0) | (j >= i - 1))
    cand = causal & ~forced
    n_take = (chunks - forced.sum(-1, keepdim=True)).clamp_min(0)  # (NC, 1)
    ranked = torch.where(cand, scores.double(), float("-inf"))
    order = ranked.sort(dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, j.expand_as(order).contiguous())
    return forced | (cand & (rank < n_take))


@dataclass(frozen=True)
class LongHeads(Method):
    chunks: int = 16
    chunk_size: int = 256
    name: str = "longheads"
    window: int = field(default=1, init=False, repr=False)  # the cache's; unused (decode keeps everything)

    def __post_init__(self) -> None:
        cs = self.chunk_size
        check_key_block("LongHeads", cs, "chunk_size")
        if not isinstance(self.chunks, int) or isinstance(self.chunks, bool) or self.chunks < 3:
            raise ValueError(f"LongHeads needs chunks >= 3 (the first, the previous and the current chunk are "
                             f"always kept), got {self.chunks!r}")

    @property
    def block_size(self) -> int:  # the cache's compression block: decode never compresses
        return self.chunk_size

    def decode_keep(self, layer_idx: int, num_kv_heads: int) -> torch.Tensor:
        return torch.full((num_kv_heads,), self.chunk_size, dtype=torch.long)

    def plan(self, layer_idx, q, k, key_start, scaling, *, backend="auto", padded=True) -> BlockPlan | None:
        """A BlockPlan per query head, or None when every causal chunk is forced (at most 3 chunks)."""
        B, H, L, _ = q.shape
        cs = self.chunk_size
        nc = -(-L // cs)  # chunks of a row without padding: the most any row has
        if nc <= 3:
            return None
        ks = key_start.to(device=q.device, dtype=torch.long)
        qbar, rep = chunk_representations(q, k, ks, scaling, cs)
        keep = torch.empty(B, H, nc, nc, dtype=torch.bool, device=q.device)
        step = max(1, _POOL_ELEMENTS // max(H * nc, 1))
        for c0 in range(0, nc, step):  # query chunks [c0, c1): scores (B, H, c1 - c0, NC) fp32
            c1 = min(nc, c0 + step)
            keep[:, :, c0:c1] = select_chunks(qbar[:, :, c0:c1] @ rep.transpose(-1, -2), self.chunks, c0)
        row_chunks = -(-(L - ks) // cs)  # (B,)
        keep &= (torch.arange(nc, device=q.device)[None, :] < row_chunks[:, None])[:, None, :, None]
        nnz = sum(min(i + 1, self.chunks) for i in range(nc))  # the longest list: a row without padding
        indptr, indices = pack_lists(keep, nnz)
        n_q = -(-(L - int(ks.min())) // cs) if padded else nc
        return BlockPlan(cs, cs, ks, indptr[..., : n_q + 1].contiguous(), indices)


def attended_fraction(seq_len: int, chunks: int, chunk_size: int) -> float:
    """The attended fraction of causal (query, key) pairs of an unpadded seq_len prompt (what the
    plan's kept_fraction reports): query chunk i sees min(i + 1, chunks) whole chunks, its own causally."""
    L, cs = seq_len, chunk_size
    nc = -(-L // cs)
    if nc <= 3:
        return 1.0
    pairs = 0
    for i in range(nc):
        nq = min(cs, L - i * cs)
        pairs += nq * (nq + 1) // 2 + min(i, chunks - 1) * nq * cs
    return pairs / (L * (L + 1) / 2)


def chunks_for(kept_fraction: float, seq_len: int, params: Mapping[str, Any]) -> int:
    """The number of chunks attending closest to kept_fraction of the causal pairs of a seq_len
    prompt (the registry's density knob; at least 3). The fraction never decreases with the count."""
    cs = int(params.get("chunk_size", LongHeads.chunk_size))
    nc = max(3, -(-seq_len // cs))

    def frac(n: int) -> float:
        return attended_fraction(seq_len, n, cs)

    lo, hi = 3, nc
    while lo < hi:
        mid = (lo + hi) // 2
        if frac(mid) >= kept_fraction:
            hi = mid
        else:
            lo = mid + 1
    return min({lo, max(3, lo - 1)}, key=lambda n: (abs(frac(n) - kept_fraction), n))
