"""Token Sparse Attention (Jo et al., 2026, "Token Sparse Attention: Efficient Long-Context Inference
with Interleaved Token Selection"): per layer and head, compress Q/K/V to a token subset, attend
densely among it, decompress the output back to the full sequence (zeros for the tokens left out,
which pass the layer on the residual path alone and are reconsidered at the next layer).

Per row (tokens counted from its first real one, so left padding changes nothing), n real tokens:
  the last `recent` queries attend (softmax, causal) to every key; per query head, their mean
  probability on each prefix key (the n - recent keys before them) is the token's score, average-
  pooled over `kernel` neighbours (zero padding, the official code's avg_pool1d).
  Dynamic Token Coverage: the head-averaged scores, normalised to sum 1 and sorted ascending; the
  tokens whose cumulative mass stays below `coverage`, plus one, are dropped: each head keeps its
  top max(min_tokens, prefix - dropped) prefix tokens by its own scores (`keep` > 0 instead keeps
  the top max(min_tokens, ceil(keep x prefix))). The last `recent` tokens are always kept.
  Rows of at most min_tokens + recent tokens, or where nothing falls under the coverage, keep all.
Only layers at relative depth >= `start` are sparse (the paper's default: the second half).

The plan is a SubsetPlan per query head (engine/subset.py: gather, causal SDPA, scatter). The KV
cache keeps every token (as the official code, which caches before compressing); decode is dense.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..engine.plan import SubsetPlan, pack_mask
from .base import ONE_PROCESS, HeadGroup, Method, first_at_depth, key_validity, model_depth


@dataclass(frozen=True)
class TokenSparse(Method):
    coverage: float = 0.005
    keep: float = 0.0
    min_tokens: int = 1024
    recent: int = 128
    kernel: int = 7
    start: float = 0.5
    name: str = "token-sparse"
    combines_heads = True  # the coverage rule reads the scores averaged over every head of the layer
    window: int = field(default=1, init=False, repr=False)  # the cache's; unused (decode keeps everything)
    block_size: int = field(default=64, init=False, repr=False)
    _depth: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # {"layers": N}

    def __post_init__(self) -> None:
        if not 0 <= self.coverage < 1:
            raise ValueError(f"token-sparse needs 0 <= coverage < 1 (attention mass dropped), got {self.coverage}")
        if not 0 <= self.keep <= 1:
            raise ValueError(f"token-sparse needs 0 <= keep <= 1 (0: the coverage decides), got {self.keep}")
        if self.min_tokens < 0 or self.recent < 1:
            raise ValueError(f"token-sparse needs min_tokens >= 0 and recent >= 1, got {self.min_tokens}, {self.recent}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"token-sparse needs an odd kernel >= 1 (average pooling), got {self.kernel}")
        if not 0 <= self.start <= 1:
            raise ValueError(f"token-sparse needs 0 <= start <= 1 (relative depth of the first sparse layer), got {self.start}")

    def check_model(self, model) -> None:
        self._depth["layers"] = model_depth(model)

    def decode_keep(self, layer_idx: int, num_kv_heads: int) -> torch.Tensor:
        return torch.full((num_kv_heads,), self.block_size, dtype=torch.long)

    def sparse_layer(self, layer_idx: int) -> bool:
        if "layers" not in self._depth:
            raise RuntimeError("token-sparse: the model's depth is unknown; call method.check_model(model) first "
                               "(tca_attention.enable does)")
        return layer_idx >= first_at_depth(self.start, self._depth["layers"])

    def plan(self, layer_idx, q, k, key_start, scaling, *, backend="auto", padded=True,
             heads: HeadGroup = ONE_PROCESS) -> SubsetPlan | None:
        """A SubsetPlan per query head, or None (SDPA) for a dense layer or a batch whose rows all stay
        dense. One host sync (the longest subset), plus one for the smallest key_start when padded."""
        B, H, L, _ = q.shape
        W = self.recent
        if not self.sparse_layer(layer_idx) or (self.keep == 0 and self.coverage == 0):
            return None
        ks = key_start.to(device=q.device, dtype=torch.long)
        if L - (int(ks.min()) if padded else 0) <= self.min_tokens + W:
            return None  # no row is long enough
        return SubsetPlan(*pack_mask(self.select(q, k, ks, scaling, heads)), ks)

    def select(self, q: torch.Tensor, k: torch.Tensor, ks: torch.Tensor, scaling: float,
               heads: HeadGroup = ONE_PROCESS) -> torch.Tensor:
        """(B, H, L) bool: the tokens each query head keeps (the paper's selection). The coverage
        reads the average over every head of the layer (heads: this process's are a share of them)."""
        B, H, L, _ = q.shape
        W = self.recent
        n = L - ks  # (B,) real tokens
        prefix = n - W  # (B,) scored tokens (may be <= 0 for a short row)
        pos = torch.arange(L, device=q.device)
        real = key_validity(L, ks)  # (B, L)
        in_prefix = real & (pos[None, :] < L - W)
        score = self.scores(q, k, ks, scaling) * in_prefix[:, None, :]  # (B, H, L)
        if self.kernel > 1:  # zero padding outside the row's prefix, as the official avg_pool1d
            score = F.avg_pool1d(score.view(B * H, 1, L), self.kernel, stride=1, padding=self.kernel // 2).view(B, H, L)
            score = score * in_prefix[:, None, :]  # the pooled prefix only (its length is kept, as the official)
        if self.keep > 0:
            count = torch.ceil(self.keep * prefix.double()).long()
        else:
            glob = heads.sum(score.sum(1)) / (H * heads.world)  # (B, L) the average over every head
            glob = glob / (glob.sum(-1, keepdim=True) + 1e-8)
            asc = torch.where(in_prefix, glob, math.inf).sort(-1).values  # prefix tokens first, ascending
            below = (asc.cumsum(-1) < self.coverage) & torch.isfinite(asc)
            dropped = below.sum(-1)
            count = torch.where(dropped > 0, prefix - dropped - 1, prefix)  # nothing under coverage: keep all
        count = torch.maximum(count, torch.full_like(count, self.min_tokens)).minimum(prefix.clamp_min(0))  # (B,)
        norm = score / (score.sum(-1, keepdim=True) + 1e-8)
        order = torch.where(in_prefix[:, None, :], norm, -1.0).sort(dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, pos.expand_as(order))  # (B, H, L) rank of each token
        keep = in_prefix[:, None, :] & (rank < count[:, None, None])
        keep |= (real & (pos[None, :] >= L - W))[:, None, :]  # the recent tokens (the scoring queries)
        short = n <= self.min_tokens + W  # rows that stay dense
        return torch.where(short[:, None, None], real[:, None, :], keep)

    def scores(self, q: torch.Tensor, k: torch.Tensor, ks: torch.Tensor, scaling: float) -> torch.Tensor:
        """(B, H, L) fp32: per query head, the mean softmax probability the last `recent` queries give
        each key (causal; padding keys get 0). One KV group at a time."""
        B, H, L, D = q.shape
        KV = k.shape[1]
        g, W = H // KV, min(self.recent, L)
        pos = torch.arange(L, device=q.device)
        qpos = pos[L - W:]
        visible = (pos[None, None, :] <= qpos[None, :, None]) & (pos[None, None, :] >= ks[:, None, None])  # (B, W, L)
        out = torch.empty(B, H, L, dtype=torch.float32, device=q.device)
        for h in range(KV):
            qh = q[:, h * g:(h + 1) * g, L - W:].float()  # (B, g, W, D)
            s = torch.matmul(qh, k[:, h:h + 1].float().transpose(-1, -2)) * scaling  # (B, g, W, L)
            s.masked_fill_(~visible[:, None], float("-inf"))
            out[:, h * g:(h + 1) * g] = torch.softmax(s, dim=-1).nan_to_num_(0.0).mean(2)  # padding queries: 0
        return out
