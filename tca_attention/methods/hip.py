"""HiP Attention (Lee et al., ICLR'25, "A Training-Free Sub-quadratic Cost Transformer Model Serving
Framework with Hierarchically Pruned Attention"): block-sparse prefill chosen by a hierarchical
(tree-structured) top-k search over key blocks, per query block and query head.

Per query block i (blocks count from each row's first real token), the candidates are the key
blocks strictly between the sink block 0 and the local blocks (the diagonal and the
ceil(sliding_window / block_size) blocks before it): [1, i - w). They are cut into k contiguous
branches; each round splits every branch in two halves, scores each half by its representative
(the `rep_tokens` keys at the half's centre: max over them and over every `q_stride`-th query of
the block of q.k) and keeps the k best halves (ties: the earlier one), until every branch is one
key block. The plan lists block 0, the k found blocks and the local blocks. O(log) rounds of 2k
candidates each: sub-quadratic in the prompt length. A query block with at most k candidates keeps
them all.

Decode is dense (the cache keeps everything). The plan is a BlockPlan per query head, run by the
shared block-sparse kernel; the search is plain PyTorch, vectorised over rows, heads and query
blocks, chunked over query blocks (at most _SCORE_ELEMENTS scores at a time).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ..engine.plan import BlockPlan
from .base import Method, check_key_block

# fp32 elements (gathered representative queries and keys, their scores) held at once, per chunk of
# query blocks: 128 MiB (at 128K tokens, 32 heads, head dim 128, the defaults: about 150 query blocks a chunk).
_SCORE_ELEMENTS = 1 << 25


def _gather_rows(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x (B, C, L, D), pos (B, C, N) absolute positions (clamped into [0, L)) -> (B, C, N, D)."""
    B, C, L, D = x.shape
    idx = pos.clamp(0, L - 1)[..., None].expand(B, C, pos.shape[-1], D)
    return x.gather(2, idx)


def initial_branches(n: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k contiguous branches cutting candidates [1, 1 + n): n (...,) -> starts, ends (..., k) (some
    empty when n < k: then the n single blocks)."""
    t = torch.arange(k + 1, device=n.device)
    edges = 1 + (t * n[..., None]) // k  # (..., k + 1)
    return edges[..., :-1], edges[..., 1:]


def split(a: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each branch [a, e) into halves [a, m), [m, e), m = ceil((a + e) / 2) (a single block stays,
    with an empty twin) -> starts, ends (..., 2k), children of branch t at 2t and 2t + 1."""
    m = torch.where(e - a >= 2, (a + e + 1) // 2, e)
    return torch.stack([a, m], -1).flatten(-2), torch.stack([m, e], -1).flatten(-2)


def representatives(a: torch.Tensor, e: torch.Tensor, block: int, rep: int) -> torch.Tensor:
    """The rep token offsets (from the row's first token) at the centre of branches [a, e) of key
    blocks: (...,) -> (..., rep), clipped into the branch."""
    lo, hi = a * block, e * block
    start = ((lo + hi) // 2 - rep // 2).clamp(min=lo)
    start = torch.minimum(start, (hi - rep).clamp(min=lo))
    return (start[..., None] + torch.arange(rep, device=a.device)).minimum((hi - 1).clamp(min=0)[..., None])


def search_blocks(q: torch.Tensor, k: torch.Tensor, key_start: torch.Tensor, scaling: float, method: "HiP",
                  i0: int, i1: int, n_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k key blocks the tree search finds for query blocks [i0, i1) -> starts (B, H, nb, k) int64 and
    whether each is real (a branch of one block); q (B, H, L, D), k (B, KV, L, D)."""
    B, H, L, D = q.shape
    KV = k.shape[1]
    g, bs, kk, dev = H // KV, method.block_size, method.k, q.device
    nb = i1 - i0
    i = torch.arange(i0, i1, device=dev)
    n = (i - method.local_blocks - 1).clamp(min=0)  # (nb,) candidates [1, i - w)
    a, e = initial_branches(n, kk)  # (nb, k)
    a, e = a.expand(B, H, nb, kk), e.expand(B, H, nb, kk)
    ks = key_start.long()[:, None, None]  # (B, 1, 1)
    # representative queries: every q_stride-th query of the block, real ones only
    qo = i[:, None] * bs + torch.arange(0, bs, method.q_stride, device=dev)  # (nb, nq)
    qpos = ks + qo  # (B, nb, nq)
    q_ok = qpos < L
    qr = _gather_rows(q, qpos.flatten(1)[:, None].expand(B, H, -1)).float().view(B, H, nb, -1, D)
    for _ in range(n_iter):
        ca, ce = split(a, e)  # (B, H, nb, 2k)
        kpos = ks[..., None, None] + representatives(ca, ce, bs, method.rep_tokens)  # (B, H, nb, 2k, R)
        kr = _gather_rows(k, kpos.reshape(B, KV, -1))  # (B, KV, g * nb * 2k * R, D): head h = kv * g + j
        kr = kr.float().view(B, H, nb, -1, D)  # query head h reads KV head h // g
        s = torch.einsum("bhnqd,bhncd->bhnqc", qr, kr)  # (B, H, nb, nq, 2k * R)
        s = s.masked_fill(~q_ok[:, None, :, :, None], float("-inf")).amax(3).view(B, H, nb, 2 * kk, -1).amax(-1)
        s = s.masked_fill(ce <= ca, float("-inf"))  # empty halves never win over a real one
        top = s.sort(dim=-1, descending=True, stable=True).indices[..., :kk].sort(-1).values  # position order
        a, e = ca.gather(-1, top), ce.gather(-1, top)
    return a, e > a


@dataclass(frozen=True)
class HiP(Method):
    k: int = 8
    block_size: int = 64
    sliding_window: int = 256
    rep_tokens: int = 2
    q_stride: int = 2
    name: str = "hip"
    window: int = field(default=1, init=False, repr=False)  # the cache's; unused (decode keeps everything)

    def __post_init__(self) -> None:
        b = self.block_size
        check_key_block("HiP", b)
        if self.k < 1:
            raise ValueError(f"HiP needs k >= 1 key blocks, got {self.k}")
        if self.sliding_window < 0:
            raise ValueError(f"HiP needs sliding_window >= 0, got {self.sliding_window}")
        if not 1 <= self.rep_tokens <= b:
            raise ValueError(f"HiP needs 1 <= rep_tokens <= block_size, got {self.rep_tokens}")
        if not 1 <= self.q_stride <= b:
            raise ValueError(f"HiP needs 1 <= q_stride <= block_size, got {self.q_stride}")

    @property
    def local_blocks(self) -> int:
        """Key blocks kept before the diagonal: those holding the sliding_window keys before the query block."""
        return -(-self.sliding_window // self.block_size)

    def decode_keep(self, layer_idx: int, num_kv_heads: int) -> torch.Tensor:
        return torch.full((num_kv_heads,), self.block_size, dtype=torch.long)

    def plan(self, layer_idx, q, k, key_start, scaling, *, backend="auto", padded=True) -> BlockPlan | None:
        """A BlockPlan per query head, or None when no query block has a candidate (L <= (w + 2)
        blocks: sink and local blocks cover everything). One host sync (the plan's NNZ; in a padded batch with the smallest key_start)."""
        B, H, L, D = q.shape
        bs, w, kk = self.block_size, self.local_blocks, self.k
        nq = -(-L // bs)  # query blocks of a row without padding: the most any row has
        if nq - w - 2 <= 0:  # no query block has a candidate: sink and local blocks are everything
            return None
        dev = q.device
        ks = key_start.to(device=dev, dtype=torch.long)
        n_iter = math.ceil(math.log2(-(-(nq - w - 2) // kk)))  # halvings down to single blocks
        nqr = -(-(L - ks) // bs)  # (B,) the row's real query blocks
        nqr_, ncr = bs // self.q_stride, 2 * kk * self.rep_tokens  # representative queries, keys per query block
        per_block = B * H * ((nqr_ + ncr) * D + nqr_ * ncr)  # fp32 gathered q and k, and their scores
        step = max(1, _SCORE_ELEMENTS // max(per_block, 1))
        sel, sel_ok = [], []
        for i0 in range(0, nq, step):
            a, ok = search_blocks(q, k, ks, scaling, self, i0, min(nq, i0 + step), n_iter)
            sel.append(a)
            sel_ok.append(ok)
        found, found_ok = torch.cat(sel, 2), torch.cat(sel_ok, 2)  # (B, H, nq, k)
        i = torch.arange(nq, device=dev)[:, None]
        local = i - w + torch.arange(w + 1, device=dev)  # (nq, w + 1) ascending, ends at the diagonal
        blocks = torch.cat([torch.zeros(nq, 1, dtype=torch.long, device=dev).expand(B, H, nq, 1), found,
                            local.expand(B, H, nq, w + 1)], -1)
        valid = torch.cat([torch.ones_like(found_ok[..., :1]), found_ok, (local >= 1).expand(B, H, nq, w + 1)], -1)
        valid &= (i < nqr[:, None, None])[:, None]  # query blocks past the row's end list nothing
        ks_min = int(ks.min()) if padded else 0
        return BlockPlan.from_lists(bs, bs, ks, blocks, valid, -(-(L - ks_min) // bs))


def attended_pairs(k: int, seq_len: int, params: Mapping[str, Any]) -> int:
    """Causal (query, key) pairs a prompt of seq_len tokens attends to under HiP with k blocks."""
    m = HiP(**{**params, "k": max(1, k)})
    bs, w, n = m.block_size, m.local_blocks, seq_len
    nq = -(-n // bs)
    total = 0
    for i in range(nq):
        rows = min(bs, n - i * bs)
        kept = 1 + min(k, max(0, i - w - 1)) + min(w, max(0, i - 1))  # full blocks before the diagonal
        total += (kept if i > 0 else 0) * rows * bs + rows * (rows + 1) // 2
    return total


def k_for(kept_fraction: float, seq_len: int, params: Mapping[str, Any]) -> int:
    """The k attending closest to kept_fraction of the causal pairs of a seq_len prompt (the registry's
    density knob: the attended fraction, which HiP's selection fixes exactly for a given k)."""
    target = kept_fraction * seq_len * (seq_len + 1) / 2
    lo, hi = 1, max(1, -(-seq_len // int(params.get("block_size", HiP.block_size))))  # pairs never decrease with k
    while lo < hi:
        mid = (lo + hi) // 2
        if attended_pairs(mid, seq_len, params) >= target:
            hi = mid
        else:
            lo = mid + 1
    return min({lo, max(1, lo - 1)}, key=lambda k: (abs(attended_pairs(k, seq_len, params) - target), k))
