"""XAttention (Xu et al., ICML'25): block-sparse prefill chosen by antidiagonal scoring.

Per query head, the attention map is cut into block_size x block_size blocks (counted from each
row's first real token). A block's importance is estimated from the sums of the antidiagonals of
its stride x stride sub-blocks: reduced query m and reduced key n score
sum_i q[S m + i] . k[S n + S - 1 - i] * scaling / S (S = stride), the reduced map is softmaxed per
row (causal in reduced positions: n <= m), and its cells are summed into blocks (block_size / S
squared cells each). Per query block, the first (sink) key block and the diagonal block are always
kept; the other causal blocks are added in descending mass until the kept mass reaches
`threshold` of the row's total (the smallest such set). threshold >= 1 keeps every causal block.

Decode is dense: the cache keeps everything (decode_keep = block_size, no decode selection).
The plan is a BlockPlan per query head, executed by the shared block-sparse kernel. Scoring is
chunked over query blocks (at most _SCORE_ELEMENTS reduced scores at a time) and syncs with the
host once per layer (the plan's NNZ and, in a padded batch, the smallest key_start), see plan().
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..engine.plan import BlockPlan
from .base import Method, check_key_block

# Reduced scores computed at once, per chunk of query blocks. A chunk holds them twice: in q's dtype
# (the matmul) and in fp32 (the softmax): 768 MiB for a bf16 model.
_SCORE_ELEMENTS = 1 << 27


def _aligned(x: torch.Tensor, key_start: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """x (B, C, L, D) -> (B, C, length, D): row b's positions key_start[b] + start + t, zeros past L.

    Puts every row's first real token at 0, so that blocks count from it (left padding)."""
    B, C, L, D = x.shape
    pos = key_start.long()[:, None] + start + torch.arange(length, device=x.device)  # (B, length)
    valid = pos < L
    idx = pos.clamp(max=L - 1)[:, None, :, None].expand(B, C, length, D)
    return torch.where(valid[:, None, :, None], x.gather(2, idx), x.new_zeros(()))


def _reduced_keys(k: torch.Tensor, key_start: torch.Tensor, stride: int, length: int) -> torch.Tensor:
    """k (B, KV, L, D) -> (B, KV, length / stride, stride * D): each stride group of keys, reversed,
    concatenated (so a dot with a plain group of queries sums one antidiagonal)."""
    B, KV, _, D = k.shape
    ka = _aligned(k, key_start, 0, length).view(B, KV, length // stride, stride, D)
    return ka.flip(3).reshape(B, KV, length // stride, stride * D)


def _chunk_mass(
    q: torch.Tensor, kr: torch.Tensor, key_start: torch.Tensor, scaling: float, stride: int, block: int,
    c0: int, c1: int,
) -> torch.Tensor:
    """Block mass of query blocks [c0, c1) against key blocks [0, c1) -> (B, H, c1 - c0, c1) fp32.

    q (B, H, L, D) as given; kr the reduced keys of _reduced_keys. Reduced rows past a row's real
    prompt give zero mass; a partial last stride group is scored with zeros for its missing tokens."""
    B, H, L, D = q.shape
    KV = kr.shape[1]
    g, r, nb = H // KV, block // stride, c1 - c0
    qa = _aligned(q, key_start, c0 * block, nb * block)  # (B, H, nb * block, D)
    qr = qa.view(B, KV, g * nb * r, stride * D)  # (B, KV, g * rows, S * D): query head h = kv * g + j
    s = torch.matmul(qr, kr[:, :, : c1 * r].transpose(-1, -2)).view(B, H, nb * r, c1 * r)  # q's dtype
    s.mul_(scaling / stride)
    m = c0 * r + torch.arange(nb * r, device=q.device)  # reduced query positions
    n = torch.arange(c0 * r, c1 * r, device=q.device)  # the only keys that can lie after a query
    s[..., c0 * r :].masked_fill_(n[None, :] > m[:, None], float("-inf"))
    p = torch.softmax(s, dim=-1, dtype=torch.float32)
    del s
    p = p.view(B, H, nb * r, c1, r).sum(-1)  # (B, H, reduced rows, key blocks)
    rows = -(-(L - key_start.long()) // stride)  # (B,) reduced rows holding a real token
    p.mul_((m[None, :] < rows[:, None])[:, None, :, None])
    return p.view(B, H, nb, r, c1).sum(3)


def select_blocks(mass: torch.Tensor, first_block: int, threshold: float) -> torch.Tensor:
    """The kept key blocks of query blocks first_block + [0, nb): mass (..., nb, NK) -> (..., nb, NK) bool.

    Kept: the causal key blocks j <= i of query block i: block 0 and block i always, then the others
    in descending mass (ties: lower index first) while the mass kept before each is below threshold of
    the row's total. threshold >= 1: every causal block."""
    nb, nk = mass.shape[-2:]
    dev = mass.device
    i = first_block + torch.arange(nb, device=dev)[:, None]
    j = torch.arange(nk, device=dev)[None, :]
    causal = j <= i  # (nb, NK)
    forced = causal & ((j == 0) | (j == i))
    if threshold >= 1:
        return causal.expand(mass.shape).clone()
    m = torch.where(causal, mass.double(), 0.0)
    need = threshold * m.sum(-1, keepdim=True)
    base = torch.where(forced, m, 0.0).sum(-1, keepdim=True)
    cand = torch.where(forced | ~causal, -1.0, m)  # sorts after every candidate (masses are >= 0)
    vals, order = cand.sort(dim=-1, descending=True, stable=True)
    got = vals.clamp_min(0.0)
    before = got.cumsum(-1) - got  # mass of the candidates ranked above
    take = (vals >= 0) & (base + before < need)
    return torch.zeros_like(take).scatter_(-1, order, take) | forced


def block_mass(
    q: torch.Tensor, k: torch.Tensor, key_start: torch.Tensor, scaling: float, stride: int, block: int
) -> torch.Tensor:
    """Whole block-mass map (B, H, NQ, NQ), NQ = ceil(L / block), rows aligned to key_start (tests;
    plan() scores chunk by chunk)."""
    L = q.shape[2]
    nq = -(-L // block)
    kr = _reduced_keys(k, key_start, stride, nq * block)
    return _chunk_mass(q, kr, key_start, scaling, stride, block, 0, nq)


def _chunks(nq: int, per_block: int, budget: int) -> list[tuple[int, int]]:
    """Query-block ranges [c0, c1) whose scores (nb * c1 * per_block elements, causal width) fit budget."""
    out, c0, cap = [], 0, budget / max(per_block, 1)
    while c0 < nq:
        nb = max(1, int((-c0 + math.sqrt(c0 * c0 + 4 * cap)) / 2))  # largest nb with nb (c0 + nb) <= cap
        out.append((c0, min(nq, c0 + nb)))
        c0 += nb
    return out


@dataclass(frozen=True)
class XAttention(Method):
    threshold: float = 0.9
    stride: int = 8
    block_size: int = 128
    name: str = "xattention"
    window: int = field(default=1, init=False, repr=False)  # the cache's; unused (decode keeps everything)

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ValueError(f"XAttention needs 0 < threshold <= 1, got {self.threshold}")
        b = self.block_size
        check_key_block("XAttention", b)
        if self.stride < 1 or b % self.stride:
            raise ValueError(f"XAttention needs a stride >= 1 dividing block_size {b}, got {self.stride}")

    def decode_keep(self, layer_idx: int, num_kv_heads: int) -> torch.Tensor:
        return torch.full((num_kv_heads,), self.block_size, dtype=torch.long)

    def plan(self, layer_idx, q, k, key_start, scaling, *, backend="auto", padded=True) -> BlockPlan | None:
        """A BlockPlan per query head, or None when no row has more than two blocks (all kept).

        One host sync: the largest list length (NNZ) together with, in a padded batch, the smallest
        key_start (the plan's NQ)."""
        B, H, L, _ = q.shape
        bs, S = self.block_size, self.stride
        if L <= 2 * bs:  # query blocks 0 and 1 keep all their causal blocks (sink and diagonal)
            return None
        nq = -(-L // bs)  # query blocks of a row without padding: the most any row has
        dev = q.device
        ks = key_start.to(device=dev, dtype=torch.long)
        kr = _reduced_keys(k, ks, S, nq * bs)
        row_blocks = -(-(L - ks) // bs)  # (B,) the row's real query blocks
        ub = nq * (nq + 1) // 2  # causal entries of a list: an upper bound of NNZ
        indices = torch.full((B, H, ub + 1), 0, dtype=torch.int32, device=dev)  # slot ub: a dump
        counts = torch.zeros(B, H, nq, dtype=torch.long, device=dev)
        filled = torch.zeros(B, H, dtype=torch.long, device=dev)
        r = bs // S
        for c0, c1 in _chunks(nq, B * H * r * r, _SCORE_ELEMENTS):
            mass = _chunk_mass(q, kr, ks, scaling, S, bs, c0, c1)  # (B, H, nb, c1)
            keep = select_blocks(mass, c0, self.threshold)
            keep &= (c0 + torch.arange(c1 - c0, device=dev))[None, None, :, None] < row_blocks[:, None, None, None]
            cnt = keep.sum(-1)  # (B, H, nb)
            j = torch.arange(c1, device=dev)
            cols = torch.where(keep, j, j + c1).sort(-1).values  # listed blocks first, ascending
            off = filled[..., None] + cnt.cumsum(-1) - cnt  # (B, H, nb) first slot of each list
            slot = torch.where(j < cnt[..., None], off[..., None] + j, ub)  # (B, H, nb, c1)
            indices.scatter_(2, slot.flatten(2), cols.flatten(2).to(torch.int32))
            counts[..., c0:c1] = cnt
            filled += cnt.sum(-1)
        if padded:
            nnz, ks_min = torch.stack([filled.max(), ks.min()]).tolist()
        else:
            nnz, ks_min = int(filled.max()), 0
        n_q = -(-(L - ks_min) // bs)
        indptr = torch.nn.functional.pad(counts.cumsum(-1), (1, 0))[..., : n_q + 1]
        return BlockPlan(bs, bs, ks, indptr.to(torch.int32).contiguous(), indices[..., :nnz].contiguous())
