"""Helpers of the chunk-selecting prefill methods (longheads, dhsa): gathers that put every row's
first real token at position 0 (blocks and chunks count from it), and the packing of a
(query block, key block) keep mask into a BlockPlan's lists."""
from __future__ import annotations

import torch

# Elements of a keep mask packed at once (int64 ranks): 512 MiB at most.
_PACK_ELEMENTS = 1 << 26


def row_aligned(x: torch.Tensor, key_start: torch.Tensor, length: int) -> torch.Tensor:
    """x (B, C, L, D) -> (B, C, length, D): row b's positions key_start[b] + t, zeros past L."""
    B, C, L, D = x.shape
    pos = key_start.long()[:, None] + torch.arange(length, device=x.device)  # (B, length)
    idx = pos.clamp(max=L - 1)[:, None, :, None].expand(B, C, length, D)
    return torch.where((pos < L)[:, None, :, None], x.gather(2, idx), x.new_zeros(()))


def real_tokens(seq_len: int, key_start: torch.Tensor, length: int) -> torch.Tensor:
    """(B, length) True where row-aligned position t holds a real token (t < L - key_start)."""
    n = seq_len - key_start.long()
    return torch.arange(length, device=key_start.device)[None, :] < n[:, None]


def pack_lists(keep: torch.Tensor, nnz: int) -> tuple[torch.Tensor, torch.Tensor]:
    """keep (B, Hp, NQ, NK) bool -> indptr (B, Hp, NQ + 1) int32, indices (B, Hp, max(nnz, 1)) int32.

    nnz: an upper bound of the longest list (entries past a list's end are unused). The key blocks
    of each query block are listed ascending; packed a few query blocks at a time."""
    B, Hp, NQ, NK = keep.shape
    counts = keep.sum(-1)  # (B, Hp, NQ)
    indptr = torch.nn.functional.pad(counts.cumsum(-1), (1, 0))  # (B, Hp, NQ + 1) int64
    size = max(nnz, 1)
    indices = torch.zeros(B, Hp, size + 1, dtype=torch.int32, device=keep.device)  # slot `size`: a dump
    j = torch.arange(NK, device=keep.device, dtype=torch.int32)
    step = max(1, _PACK_ELEMENTS // max(B * Hp * NK, 1))
    for c0 in range(0, NQ, step):
        kp = keep[:, :, c0 : c0 + step]
        slot = torch.where(kp, indptr[:, :, c0 : c0 + kp.shape[2], None] + kp.cumsum(-1) - 1, size)
        indices.scatter_(2, slot.flatten(2), j.expand(kp.shape).flatten(2))
    return indptr.to(torch.int32), indices[..., :size].contiguous()
