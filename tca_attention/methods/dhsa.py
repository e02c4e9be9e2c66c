"""DHSA (Xiong et al., 2025, "Long-Context Modeling with Dynamic Hierarchical Sparse Attention for
On-Device LLMs"): chunk-level similarity upsampled to a token-level top-k per query block.

1. Dynamic chunking: the row's keys (all KV heads concatenated) are cut where they change. A
   position p is a candidate boundary with score 1 - cos(mean of keys [p - w + 1, p], mean of keys
   [p + 1, p + w]) (w = `boundary_window`); a candidate is kept if it is the first maximum within
   `nms` positions either side, and of those the best ceil(n / chunk_len) - 1 become boundaries
   (ties: earlier position). A new chunk starts after each boundary.
2. Chunk representations, length-normalised: key chunk c is sqrt(|c|) x the mean of its keys
   (averaged over KV heads); query block i (fixed `block_size`) is sqrt(n_i) x the mean of its
   queries (averaged over query heads). Chunk similarity: their dot product.
3. Upsampling to tokens: every key token scores its chunk's similarity. Query block i always
   attends to key block 0 (global tokens) and to itself (local tokens); of the other causal keys
   (between them) it keeps the `budget` - (its forced tokens) best by score (ties: earlier key),
   so each query block attends `budget` keys at most. One selection per row, shared by every head.
   The query blocks holding the last `dense_tail` tokens (the instruction, in the paper's code)
   attend to every earlier key.

On the engine: a BlockPlan per KV head (the same lists for each) with block_q = block_k =
block_size: the forced (and dense-tail) blocks are listed blocks, the selected tokens the plan's
extra key columns.
Decode is dense (the cache keeps everything). One host sync per layer in a padded batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from ..engine.plan import BlockPlan
from .base import ONE_PROCESS, HeadGroup, Method, check_key_block, pack_lists, real_tokens, row_aligned

# Row-aligned keys (KV, positions, D) of a row scored for boundaries at once, fp32: 64 MiB a temporary.
_BOUNDARY_ELEMENTS = 1 << 24
# Elements of a (query blocks x keys) selection mask built at once: 32M (a few int64 temporaries: ~1 GiB).
_SELECT_ELEMENTS = 1 << 25


def boundary_scores(k: torch.Tensor, key_start: torch.Tensor, window: int, length: int,
                    heads: HeadGroup = ONE_PROCESS) -> torch.Tensor:
    """Dissimilarity of the key windows either side of each row-aligned position p:
    1 - cos(mean k[p - w + 1 .. p], mean k[p + 1 .. p + w]) over all KV heads' keys concatenated
    (k holds this process's KV heads; the dot product and the norms are summed over every head's).
    k (B, KV, L, D) -> (B, length) fp32, -inf where a window would leave the row's real tokens.
    Computed a slice of positions at a time (at most _BOUNDARY_ELEMENTS fp32 keys of a row per slice)."""
    B, KV, L, D = k.shape
    w = window
    out = torch.full((B, length), float("-inf"), device=k.device)
    n_pos = length - 2 * w + 1  # window pairs: left [s, s + w), right [s + w, s + 2w), p = s + w - 1
    if n_pos <= 0:
        return out
    ka = row_aligned(k, key_start, length)  # (B, KV, length, D)
    step = max(1, _BOUNDARY_ELEMENTS // max(KV * D, 1))  # per row: the same slices alone and in a batch
    for s0 in range(0, n_pos, step):
        n = min(n_pos, s0 + step) - s0
        x = ka[:, :, s0 : s0 + n + 2 * w - 1].float()
        m = sum(x[:, :, d : d + n + w] for d in range(w)) / w  # m[t]: mean of keys s0 + t .. s0 + t + w - 1
        left, right = m[:, :, :n], m[:, :, w : w + n]
        # (B, n) each over every KV head's dims
        dot, lsq, rsq = heads.sum(torch.stack([(left * right).sum((1, 3)), left.square().sum((1, 3)),
                                               right.square().sum((1, 3))]))
        norms = lsq.sqrt() * rsq.sqrt()
        out[:, s0 + w - 1 : s0 + w - 1 + n] = 1 - dot / norms.clamp_min(1e-12)
    n_real = (L - key_start.long())[:, None]  # (B, 1)
    p = torch.arange(length, device=k.device)[None, :]
    return out.masked_fill(p + w >= n_real, float("-inf"))  # the right window must be real


def chunk_starts(scores: torch.Tensor, n_real: torch.Tensor, nms: int, chunk_len: int) -> torch.Tensor:
    """Boundaries from boundary scores (B, length) -> (B, length) bool, True where a chunk starts
    (position 0 and the position after each boundary). A boundary is a candidate that is the first
    maximum within nms positions either side; of those, the ceil(n / chunk_len) - 1 best per row
    (n its real tokens; ties: earlier)."""
    B, length = scores.shape
    ninf = float("-inf")
    s = scores[:, None]  # (B, 1, length)
    peak = F.max_pool1d(F.pad(s, (nms, nms), value=ninf), 2 * nms + 1, stride=1)[:, 0]  # max of [p - nms, p + nms]
    left = F.max_pool1d(F.pad(s, (nms, 0), value=ninf), nms, stride=1)[:, 0, :length]  # max of [p - nms, p - 1]
    ok = (scores == peak) & (scores > left) & (scores > ninf)
    ranked = torch.where(ok, scores, ninf)
    order = ranked.sort(dim=-1, descending=True, stable=True).indices
    pos = torch.arange(length, device=scores.device)
    rank = torch.empty_like(order).scatter_(-1, order, pos.expand(B, length).contiguous())
    n_bound = (-(-n_real.long() // chunk_len) - 1).clamp_min(0)[:, None]  # (B, 1)
    bound = ok & (rank < n_bound)
    starts = torch.zeros(B, length, dtype=torch.bool, device=scores.device)
    starts[:, 0] = True
    starts[:, 1:] = bound[:, :-1]
    return starts


def _candidate_mask(
    sim: torch.Tensor, chunk_id: torch.Tensor, c_start: torch.Tensor, c_end: torch.Tensor,
    remaining: torch.Tensor, block: int, i0: int,
) -> torch.Tensor:
    """Selected keys of query blocks i0 + [0, nb) among their candidates [block, i * block).

    sim (B, nb, NC) chunk similarity of each query block; chunk_id (B, length) chunk of each key;
    c_start/c_end (B, NC) chunk ranges (row-aligned); remaining (B, nb) keys left in the budget.
    Chunks are taken in descending similarity (ties: earlier chunk), the last one partly (its
    earliest candidates): exactly a stable token-level top-k of the upsampled scores.
    -> (B, nb, length) bool."""
    B, nb, NC = sim.shape
    length = chunk_id.shape[1]
    dev = sim.device
    lo = block
    hi = (i0 + torch.arange(nb, device=dev)) * block  # (nb,) candidates are [lo, hi)
    cs = c_start.clamp_min(lo)[:, None, :]  # (B, 1, NC)
    cnt = (torch.minimum(c_end[:, None, :], hi[None, :, None]) - cs).clamp_min(0)  # (B, nb, NC) candidates per chunk
    order = sim.double().sort(dim=-1, descending=True, stable=True).indices
    ranked_cnt = cnt.gather(-1, order)
    before_sorted = ranked_cnt.cumsum(-1) - ranked_cnt
    before = torch.empty_like(before_sorted).scatter_(-1, order, before_sorted)  # (B, nb, NC)
    t = torch.arange(length, device=dev)
    cid = chunk_id[:, None, :].expand(B, nb, length)
    offset = t[None, None, :] - cs.squeeze(1).gather(-1, chunk_id)[:, None, :]  # rank of t inside its chunk's candidates
    cand = (t[None, None, :] >= lo) & (t[None, None, :] < hi[None, :, None])
    return cand & (before.gather(-1, cid) + offset < remaining[..., None])


@dataclass(frozen=True)
class DHSA(Method):
    budget: int = 2048
    block_size: int = 128
    chunk_len: int = 16
    boundary_window: int = 4
    nms: int = 8
    dense_tail: int = 64
    name: str = "dhsa"
    combines_heads = True  # chunks cut on every KV head's keys; representations averaged over every head
    window: int = field(default=1, init=False, repr=False)  # the cache's; unused (decode keeps everything)

    def __post_init__(self) -> None:
        b = self.block_size
        check_key_block("DHSA", b)
        if not isinstance(self.budget, int) or self.budget < 2 * b:
            raise ValueError(f"DHSA needs budget >= 2 x block_size = {2 * b} tokens (key block 0 and the "
                             f"query's own block are always attended), got {self.budget!r}")
        for name, low in (("chunk_len", 1), ("boundary_window", 1), ("nms", 1), ("dense_tail", 0)):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < low:
                raise ValueError(f"DHSA needs {name} an int >= {low}, got {getattr(self, name)!r}")

    def decode_keep(self, layer_idx: int, num_kv_heads: int) -> torch.Tensor:
        return torch.full((num_kv_heads,), self.block_size, dtype=torch.long)

    def chunks(self, k: torch.Tensor, key_start: torch.Tensor, length: int,
               heads: HeadGroup = ONE_PROCESS) -> torch.Tensor:
        """(B, length) int64 chunk id of every row-aligned position (positions past a row's
        prompt continue its last chunk)."""
        n = k.shape[2] - key_start.long()
        scores = boundary_scores(k, key_start, self.boundary_window, length, heads)
        return chunk_starts(scores, n, self.nms, self.chunk_len).long().cumsum(-1) - 1

    def plan(self, layer_idx, q, k, key_start, scaling, *, backend="auto", padded=True,
             heads: HeadGroup = ONE_PROCESS) -> BlockPlan | None:
        """A BlockPlan per KV head (shared lists), or None when every causal block is forced (L <= 2 blocks).
        Chunks and representations read every head of the layer (heads: this process's are a share)."""
        B, H, L, D = q.shape
        KV = k.shape[1]
        bs = self.block_size
        nq = -(-L // bs)
        if nq <= 2:
            return None
        dev = q.device
        ks = key_start.to(device=dev, dtype=torch.long)
        length = nq * bs
        real = real_tokens(L, ks, length)  # (B, length)
        n_real = L - ks
        # chunks and their length-normalised representations
        chunk_id = self.chunks(k, ks, length, heads)  # (B, length)
        NC = -(-L // self.chunk_len)  # the most chunks a row can have
        # means over every head: sums over this process's heads, summed over the processes
        kmean = heads.sum(row_aligned(k, ks, length).sum(1, dtype=torch.float32)) / (KV * heads.world)  # (B, length, D)
        ones = real.float()
        ksum = torch.zeros(B, NC, D, device=dev).scatter_add_(1, chunk_id[..., None].expand(B, length, D), kmean)
        klen = torch.zeros(B, NC, device=dev).scatter_add_(1, chunk_id, ones)
        kbar = ksum / klen.clamp_min(1).sqrt()[..., None]  # sqrt(|c|) x mean = sum / sqrt(|c|)
        pos = torch.arange(length, device=dev).expand(B, length)
        big = torch.full((B, NC), length, device=dev, dtype=torch.long)
        c_start = big.scatter_reduce(1, chunk_id, torch.where(real, pos, length), "amin")
        c_end = torch.zeros(B, NC, device=dev, dtype=torch.long).scatter_reduce(
            1, chunk_id, torch.where(real, pos + 1, 0), "amax")
        qmean = (heads.sum(row_aligned(q, ks, length).sum(1, dtype=torch.float32)) / (H * heads.world)).view(B, nq, bs, D)
        qlen = real.view(B, nq, bs).sum(-1)  # (B, NQ) real queries of each block
        qbar = qmean.sum(2) / qlen.clamp_min(1).sqrt()[..., None]  # (B, NQ, D)
        sim = qbar @ kbar.transpose(1, 2)  # (B, NQ, NC)
        # the budget left after the forced blocks: key block 0 and the query block itself
        i = torch.arange(nq, device=dev)
        forced = torch.where(i[None, :] == 0, qlen, bs + qlen)  # (B, NQ)
        remaining = (self.budget - forced).clamp_min(0)
        C = max(1, min(self.budget - bs - 1, length - 2 * bs))  # candidates of a block lie in [bs, (NQ - 1) bs)
        extra = torch.full((B, nq, C), -1, dtype=torch.long, device=dev)
        step = max(1, _SELECT_ELEMENTS // max(B * length, 1))
        for i0 in range(0, nq, step):
            i1 = min(nq, i0 + step)
            sel = _candidate_mask(sim[:, i0:i1], chunk_id, c_start, c_end, remaining[:, i0:i1], bs, i0)
            slot = torch.where(sel, sel.long().cumsum(-1) - 1, C)  # (B, nb, length)
            cols = torch.full((B, i1 - i0, C + 1), -1, dtype=torch.long, device=dev)
            cols.scatter_(2, slot, torch.where(sel, pos[:, None, :] + ks[:, None, None], -1))
            extra[:, i0:i1] = cols[..., :C]
        # listed blocks: 0 and the diagonal (block 0 alone for query block 0), every causal block for
        # the dense tail; real query blocks only
        row_blocks = -(-n_real // bs)  # (B,)
        live = i[None, :] < row_blocks[:, None]  # (B, NQ)
        tail = live & (i[None, :] >= _tail_start(n_real, self.dense_tail, bs)[:, None])  # (B, NQ)
        j = i[None, None, :]
        keep = (j == 0) | (j == i[None, :, None]) | (tail[..., None] & (j <= i[None, :, None]))
        keep &= live[..., None]  # (B, NQ, NQ)
        # the most listed blocks of any row: not always the longest row's (padding can move a row's
        # dense tail one block earlier, e.g. 83 real tokens list 18 blocks, 96 list 15)
        starts = sorted(set(ks.tolist())) if padded else [0]  # the host sync of a padded batch
        entries = max(_list_entries(L - s, self.dense_tail, bs) for s in starts)
        indptr, indices = pack_lists(keep[:, None], entries)
        n_q = -(-(L - starts[0]) // bs)
        extra = extra.masked_fill(~live[..., None] | tail[..., None], -1)[:, None, :n_q].expand(B, KV, n_q, C)
        return BlockPlan(bs, bs, ks, indptr[..., : n_q + 1].expand(B, KV, n_q + 1),
                         indices.expand(B, KV, indices.shape[-1]), extra)


def _tail_start(n_real, dense_tail: int, block_size: int):
    """The first query block of a row of n_real tokens that overlaps its last dense_tail tokens
    (int or (B,) tensor; n_real // block_size + 1, past every block, when dense_tail is 0)."""
    if dense_tail == 0:
        return n_real // block_size + 1
    return (n_real - dense_tail).clamp_min(0) // block_size if torch.is_tensor(n_real) \
        else max(0, n_real - dense_tail) // block_size


def _list_entries(seq_len: int, dense_tail: int, block_size: int) -> int:
    """Listed key blocks of an unpadded row of seq_len tokens: 1 + 2 per later block, i + 1 for a
    tail block i (not monotone in seq_len: a shorter row can list more)."""
    nq = -(-seq_len // block_size)
    t = _tail_start(seq_len, dense_tail, block_size)
    return sum(i + 1 if i >= t else (1 if i == 0 else 2) for i in range(nq))


def attended_fraction(seq_len: int, budget: int, block_size: int, dense_tail: int = 0) -> float:
    """The attended fraction of causal (query, key) pairs of an unpadded seq_len prompt (what the
    plan's kept_fraction reports): each query block sees key block 0, itself (causally) and
    min(budget - forced, candidates) earlier keys; a dense-tail block sees every earlier key."""
    L, bs = seq_len, block_size
    nq = -(-L // bs)
    if nq <= 2:
        return 1.0
    pairs, t = 0, _tail_start(L, dense_tail, bs)
    for i in range(nq):
        n = min(bs, L - i * bs)
        if i == 0:
            pairs += n * (n + 1) // 2
            continue
        extra = (i - 1) * bs if i >= t else min(max(0, budget - bs - n), (i - 1) * bs)
        pairs += n * bs + n * (n + 1) // 2 + extra * n
    return pairs / (L * (L + 1) / 2)


def budget_for(kept_fraction: float, seq_len: int, params: Mapping[str, Any]) -> int:
    """The budget (tokens, at least 2 blocks) attending closest to kept_fraction of the causal pairs
    of a seq_len prompt (the registry's density knob). The fraction never decreases with the budget."""
    bs = int(params.get("block_size", DHSA.block_size))
    tail = int(params.get("dense_tail", DHSA.dense_tail))

    def frac(b: int) -> float:
        return attended_fraction(seq_len, b, bs, tail)

    lo, hi = 2 * bs, max(2 * bs, seq_len + bs)
    while lo < hi:
        mid = (lo + hi) // 2
        if frac(mid) >= kept_fraction:
            hi = mid
        else:
            lo = mid + 1
    return min({lo, max(2 * bs, lo - 1)}, key=lambda b: (abs(frac(b) - kept_fraction), b))
