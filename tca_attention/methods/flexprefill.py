"""FlexPrefill (Lai et al., ICLR'25): per-head choice between a query-aware and a vertical-slash
block pattern, each kept up to a cumulative attention mass gamma.

Blocks are block_size x block_size, counted from each row's first real token (left padding).
Per query head, the last block_size queries of the prompt attend (softmax, causal) to every key:
  vertical[s] = their mean attention on key s; slash[o] = their mean attention on keys o tokens
  before them (o >= 0). Pooled into blocks: vertical block j = keys of block j; slash diagonal d =
  offsets [d bs, (d + 1) bs) (key block i - d for query block i, as the paper's implementation).
  Sampled distribution: the pooled vertical (a distribution over key blocks).
  Estimated distribution: softmax over key blocks of (mean of the last queries) . (mean key of the
  block) * scaling.
  Square-root Jensen-Shannon divergence of the two < tau: query-aware head, else vertical-slash.
Vertical-slash: n = (the fewest tokens, by descending vertical (resp. slash) mass, covering gamma)
  // block_size + 1 blocks, clamped to [ceil(min_budget / bs), the row's blocks]; the top n
  vertical blocks (block 0 first) and the top n slash diagonals (the main diagonal first) are kept.
Query-aware: the min-budget vertical-slash pattern plus, over the whole causal block map of block
  scores softmax((mean query of block i) . (mean key of block j) * scaling) (each row sums to 1),
  the fewest blocks by descending score whose mass reaches gamma of the map's total.
gamma >= 1 keeps every causal block. Rows of at most max(2, ceil(min_budget / bs)) blocks are dense.

Decode is dense (the cache keeps everything). The plan is a BlockPlan per query head; scoring is
chunked over KV heads and syncs with the host once per layer (the plan's NNZ and smallest
key_start), see plan().
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..engine.plan import BlockPlan
from .base import Method, check_key_block

# Last-query attention probabilities computed at once (per chunk of KV heads), fp32, held twice.
_SCORE_ELEMENTS = 1 << 26
# Block-map entries turned into lists at once (int64 temporaries), per chunk of heads.
_LIST_ELEMENTS = 1 << 24


def _aligned(x: torch.Tensor, key_start: torch.Tensor, length: int) -> torch.Tensor:
    """x (B, C, L, D) -> (B, C, length, D): row b's positions key_start[b] + t, zeros past L."""
    B, C, L, D = x.shape
    pos = key_start[:, None] + torch.arange(length, device=x.device)  # (B, length)
    idx = pos.clamp(max=L - 1)[:, None, :, None].expand(B, C, length, D)
    return torch.where((pos < L)[:, None, :, None], x.gather(2, idx), x.new_zeros(()))


def _block_means(x: torch.Tensor, key_start: torch.Tensor, bs: int, nq: int) -> torch.Tensor:
    """Mean of each aligned block's real tokens: x (B, C, L, D) -> (B, C, nq, D) fp32 (0 if none)."""
    B, C, L, D = x.shape
    s = _aligned(x, key_start, nq * bs).float().view(B, C, nq, bs, D).sum(3)
    n = (L - key_start[:, None] - bs * torch.arange(nq, device=x.device)).clamp(0, bs)  # (B, nq)
    return s / n.clamp_min(1)[:, None, :, None]


def _diagonal_sums(p: torch.Tensor) -> torch.Tensor:
    """p (..., Q, L), query i at position L - Q + i -> (..., L): entry o sums p[i, L - Q + i - o]."""
    Q, L = p.shape[-2:]
    f = torch.nn.functional.pad(p.flip(-1), (0, Q))  # (..., Q, L + Q): column u is key L - 1 - u
    # key L - Q + i - o is column o + Q - 1 - i: start Q - 1, step L + Q - 1 per row
    st = f.stride()
    view = f.as_strided((*f.shape[:-2], Q, L), (*st[:-2], st[-2] - 1, 1), f.storage_offset() + Q - 1)
    return view.sum(-2)


def last_query_stats(
    q: torch.Tensor, k: torch.Tensor, key_start: torch.Tensor, scaling: float, bs: int, nq: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The last bs queries' attention, pooled: -> (vertical (B, H, nq * bs) by aligned key position,
    slash (B, H, L) by offset, estimate (B, H, nq) over key blocks), all fp32.

    Queries before key_start (rows shorter than bs) contribute nothing."""
    B, H, L, D = q.shape
    KV = k.shape[1]
    g = H // KV
    dev = q.device
    Q = min(bs, L)
    qpos = L - Q + torch.arange(Q, device=dev)  # absolute positions of the last queries
    s = torch.arange(L, device=dev)
    ok = (s[None, None, :] <= qpos[None, :, None]) & (s[None, None, :] >= key_start[:, None, None])  # (B, Q, L)
    kmean = _block_means(k, key_start, bs, nq)  # (B, KV, nq, D)
    qlast = q[:, :, L - Q:]  # (B, H, Q, D)
    qbar = (qlast.float() * (qpos[None, :] >= key_start[:, None])[:, None, :, None]).sum(2)
    qbar = qbar / (L - key_start).clamp(1, Q)[:, None, None]  # (B, H, D) mean of the real last queries
    est = torch.einsum("bhd,bhjd->bhj", qbar, kmean.repeat_interleave(g, 1)) * scaling
    nb = -(-(L - key_start) // bs)  # (B,) the row's blocks
    est = est.masked_fill((torch.arange(nq, device=dev)[None, :] >= nb[:, None])[:, None], float("-inf")).softmax(-1)
    vertical = torch.empty(B, H, L, device=dev)
    slash = torch.empty(B, H, L, device=dev)
    step = max(1, _SCORE_ELEMENTS // max(B * g * Q * L, 1))
    for a in range(0, KV, step):
        b_ = min(KV, a + step)
        qc = qlast[:, a * g : b_ * g].reshape(B, b_ - a, g * Q, D)  # (B, kvc, g Q, D)
        sc = torch.matmul(qc, k[:, a:b_].transpose(-1, -2)).view(B, (b_ - a) * g, Q, L).float() * scaling
        sc.masked_fill_(~ok[:, None], float("-inf"))
        p = torch.softmax(sc, -1)
        del sc
        p = torch.where(ok[:, None], p, 0.0)  # fully masked (padding) queries: NaN -> 0
        vertical[:, a * g : b_ * g] = p.sum(2) / Q
        slash[:, a * g : b_ * g] = _diagonal_sums(p) / Q
        del p
    return _aligned(vertical[..., None], key_start, nq * bs)[..., 0], slash, est


def sqrt_js(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Square root of the Jensen-Shannon divergence of distributions over the last dim (0 log 0 = 0)."""
    m = (p + q) / 2
    kl = lambda a: (torch.xlogy(a, a) - torch.xlogy(a, m)).sum(-1)  # noqa: E731
    return (0.5 * kl(p) + 0.5 * kl(q)).clamp_min(0).sqrt()


def cover_count(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """The fewest entries, by descending value, whose sum reaches gamma (x sums to ~1): (..., N) -> (...)."""
    c = x.sort(-1, descending=True).values.double().cumsum(-1)
    return ((c <= gamma).sum(-1) + 1).clamp(max=x.shape[-1])


def _top_n(score: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """score (..., N), n (...): bool (..., N), the n largest (ties: lower index first)."""
    order = score.sort(dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(score.shape[-1], device=score.device).expand_as(order))
    return rank < n[..., None]


def query_aware_blocks(qmean: torch.Tensor, kmean: torch.Tensor, nb: torch.Tensor, scaling: float,
                       gamma: float) -> torch.Tensor:
    """qmean (B, H, nq, D), kmean (B, H, nq, D), nb (B,) row blocks -> (B, H, nq, nq) bool: the fewest
    causal blocks, by descending block score, holding gamma of the block map's total score."""
    B, H, nq, _ = qmean.shape
    dev = qmean.device
    i = torch.arange(nq, device=dev)
    real = i[None, :] < nb[:, None]  # (B, nq)
    ok = (i[None, :, None] >= i[None, None, :]) & real[:, :, None] & real[:, None, :]  # (B, nq, nq)
    s = torch.matmul(qmean, kmean.transpose(-1, -2)) * scaling
    p = torch.where(ok[:, None], torch.softmax(s.masked_fill(~ok[:, None], float("-inf")), -1), 0.0)
    flat = p.flatten(2).double()  # (B, H, nq * nq)
    vals, order = flat.sort(dim=-1, descending=True, stable=True)
    before = vals.cumsum(-1) - vals
    take = (before < gamma * flat.sum(-1, keepdim=True)) & (vals > 0)
    return torch.zeros_like(take).scatter_(-1, order, take).view(B, H, nq, nq)


def patterns(method: "FlexPrefill", q: torch.Tensor, k: torch.Tensor, key_start: torch.Tensor,
             scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (query_aware (B, H) bool, keep (B, H, nq, nq) bool causal key blocks of each query block)."""
    B, H, L, D = q.shape
    bs, dev = method.block_size, q.device
    g = H // k.shape[1]
    nq = -(-L // bs)
    ks = key_start.to(device=dev, dtype=torch.long)
    nb = -(-(L - ks) // bs)  # (B,)
    vert, slash, est = last_query_stats(q, k, ks, scaling, bs, nq)
    vblk = vert.view(B, H, nq, bs).sum(-1)  # (B, H, nq) sampled block distribution
    sblk = torch.nn.functional.pad(slash, (0, nq * bs - L)).view(B, H, nq, bs).sum(-1)  # by diagonal d
    qaware = sqrt_js(est, vblk) < method.tau  # (B, H)
    lo = max(1, -(-method.min_budget // bs))
    nv = (cover_count(vert, method.gamma) // bs + 1).clamp(min=lo)
    ns = (cover_count(slash, method.gamma) // bs + 1).clamp(min=lo)
    nv = torch.where(qaware, lo, torch.minimum(nv, nb[:, None]))
    ns = torch.where(qaware, lo, torch.minimum(ns, nb[:, None]))
    j = torch.arange(nq, device=dev)
    pad = j[None, None, :] >= nb[:, None, None]
    vblk = vblk.masked_fill(j == 0, float("inf")).masked_fill(pad, float("-inf"))
    sblk = sblk.masked_fill(j == 0, float("inf")).masked_fill(pad, float("-inf"))
    vkeep, skeep = _top_n(vblk, nv), _top_n(sblk, ns)  # (B, H, nq) blocks / diagonals
    d = (j[:, None] - j[None, :]).clamp_min(0)  # (nq, nq) diagonal of (i, j)
    keep = vkeep[:, :, None, :] | skeep[:, :, d]
    km = _block_means(k, ks, bs, nq)  # (B, KV, nq, D)
    for h in range(0, H, g):  # one KV group at a time: the block map is (B, g, nq, nq)
        qm = _block_means(q[:, h : h + g], ks, bs, nq)  # (B, g, nq, D)
        qa = query_aware_blocks(qm, km[:, h // g : h // g + 1].expand_as(qm), nb, scaling, method.gamma)
        keep[:, h : h + g] |= qaware[:, h : h + g, None, None] & qa
    real = j[None, :] < nb[:, None]
    causal = (j[:, None] >= j[None, :]) & real[:, :, None]  # (B, nq, nq)
    dense = (nb <= max(2, lo)) | (method.gamma >= 1)  # (B,)
    keep = torch.where(dense[:, None, None, None], causal[:, None], keep & causal[:, None])
    return qaware, keep


@dataclass(frozen=True)
class FlexPrefill(Method):
    gamma: float = 0.9
    tau: float = 0.1
    min_budget: int = 512
    block_size: int = 128
    name: str = "flexprefill"
    window: int = field(default=1, init=False, repr=False)  # the cache's; unused (decode keeps everything)

    def __post_init__(self) -> None:
        if not 0 < self.gamma <= 1:
            raise ValueError(f"FlexPrefill needs 0 < gamma <= 1, got {self.gamma}")
        if not 0 <= self.tau <= 1:
            raise ValueError(f"FlexPrefill needs 0 <= tau <= 1, got {self.tau}")
        if not isinstance(self.min_budget, int) or self.min_budget < 1:
            raise ValueError(f"FlexPrefill needs min_budget >= 1 (tokens), got {self.min_budget!r}")
        b = self.block_size
        check_key_block("FlexPrefill", b)

    def decode_keep(self, layer_idx: int, num_kv_heads: int) -> torch.Tensor:
        return torch.full((num_kv_heads,), self.block_size, dtype=torch.long)

    def plan(self, layer_idx, q, k, key_start, scaling, *, backend="auto", padded=True) -> BlockPlan | None:
        """A BlockPlan per query head, or None when no row has more blocks than the dense minimum.

        One host sync: the largest list length (NNZ) with, in a padded batch, the smallest key_start."""
        B, H, L, _ = q.shape
        bs = self.block_size
        if -(-L // bs) <= max(2, -(-self.min_budget // bs)):
            return None
        ks = key_start.to(device=q.device, dtype=torch.long)
        _, keep = patterns(self, q, k, ks, scaling)  # (B, H, nq, nq)
        nq = keep.shape[-1]
        cnt = keep.sum(-1)  # (B, H, nq)
        ub = nq * (nq + 1) // 2  # causal entries of a list: an upper bound of NNZ
        indices = torch.zeros(B, H, ub + 1, dtype=torch.int32, device=q.device)  # slot ub: a dump
        j = torch.arange(nq, device=q.device)
        off = cnt.cumsum(-1) - cnt  # (B, H, nq) first slot of each list
        step = max(1, _LIST_ELEMENTS // max(B * nq * nq, 1))
        for h0 in range(0, H, step):  # a few heads at a time: (B, h, nq, nq) int64 temporaries
            h1 = min(H, h0 + step)
            cols = torch.where(keep[:, h0:h1], j, j + nq).sort(-1).values  # listed blocks first, ascending
            slot = torch.where(j < cnt[:, h0:h1, :, None], off[:, h0:h1, :, None] + j, ub)
            indices[:, h0:h1].scatter_(2, slot.flatten(2), cols.flatten(2).to(torch.int32))
        filled = cnt.sum(-1)
        if padded:
            nnz, ks_min = torch.stack([filled.max(), ks.min()]).tolist()
        else:
            nnz, ks_min = int(filled.max()), 0
        n_q = -(-(L - ks_min) // bs)
        indptr = torch.nn.functional.pad(cnt.cumsum(-1), (1, 0))[..., : n_q + 1]
        return BlockPlan(bs, bs, ks, indptr.to(torch.int32).contiguous(), indices[..., :nnz].contiguous())
