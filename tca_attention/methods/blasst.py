"""BLASST (Yuan et al., 2025, "BLASST: Dynamic BLocked Attention Sparsity via Softmax Thresholding";
Skip-Softmax in TensorRT-LLM): no pre-pass, no mask. Inside the flash-attention loop, a key block
whose largest logit is so far below the running maximum that each of its softmax weights is under
lambda times the largest weight so far is skipped (its softmax, V load and P.V).

On the engine: plan() returns the dense BlockPlan (every causal key block, one list per KV head) with
the block executor's in-loop skipping switched on (BlockPlan.with_skip; the rule, per query row and
key block, is in engine/plan.py). lambda = threshold when threshold > 0, else scale_factor / n with n
the row's real prompt length (the paper's and TensorRT-LLM's lambda inversely proportional to the
context length). lambda = 0 is plain dense attention through the block kernel.
Decode is dense (the cache keeps everything; the paper's decode-side skipping is not implemented).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..engine.plan import BlockPlan
from .base import Method, check_key_block


@dataclass(frozen=True)
class BLASST(Method):
    scale_factor: float = 1000.0
    threshold: float = 0.0
    block_size: int = 128
    name: str = "blasst"
    window: int = field(default=1, init=False, repr=False)  # the cache's; unused (decode keeps everything)

    def __post_init__(self) -> None:
        b = self.block_size
        check_key_block("BLASST", b)
        if not (self.scale_factor >= 0 and self.threshold >= 0) or self.threshold == float("inf"):
            raise ValueError(f"BLASST needs scale_factor >= 0 and a finite threshold >= 0, got "
                             f"{self.scale_factor}, {self.threshold}")

    def decode_keep(self, layer_idx: int, num_kv_heads: int) -> torch.Tensor:
        return torch.full((num_kv_heads,), self.block_size, dtype=torch.long)

    def lambdas(self, seq_len: int, key_start: torch.Tensor) -> torch.Tensor:
        """(B,) fp32 lambda of each row: threshold, or scale_factor / the row's prompt length."""
        if self.threshold > 0:
            return torch.full(key_start.shape, self.threshold, dtype=torch.float32, device=key_start.device)
        n = (seq_len - key_start.long()).clamp(min=1).to(torch.float64)
        return (self.scale_factor / n).to(torch.float32)

    def plan(self, layer_idx, q, k, key_start, scaling, *, backend="auto", padded=True) -> BlockPlan | None:
        """The dense BlockPlan per KV head with in-loop skipping, or None for a prompt of one key block
        (its first block is never skipped). Syncs once (the dense plan's NQ and NNZ)."""
        B, H, L, _ = q.shape
        bs = self.block_size
        if L <= bs:
            return None
        ks = key_start.to(device=q.device, dtype=torch.long)
        plan = BlockPlan.dense(B, k.shape[1], L, ks, bs, bs)
        if self.threshold == 0 and self.scale_factor == 0:
            return plan  # lambda 0: nothing to skip, the kernel's plain path
        return plan.with_skip(self.lambdas(L, ks), H)
