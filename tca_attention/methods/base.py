"""What a method (policy) is: it answers "what does each KV head keep" with a plan."""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..engine.dispatch import Backend
from ..engine.plan import TokenPlan


class Method(ABC):
    """A sparse-attention policy. Executors and the cache are shared; a method only plans.

    plan(): for a full-attention layer at prefill, a TokenPlan, or None for dense attention
    (everything kept). block_size/window set the cache geometry and decode compression period.
    """

    name: str
    block_size: int
    window: int

    @abstractmethod
    def plan(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, key_start: torch.Tensor, scaling: float,
        *, backend: Backend = "auto", padded: bool = True,
    ) -> TokenPlan | None:
        """q (B, H, L, D), k (B, KV, L, D) after rotary; key_start (B,) first non-padding key.

        backend: kernels to use where the method has them; padded=False promises key_start == 0
        (the caller knows it without reading the tensor), which lets a plan size things on the host.
        """

    @abstractmethod
    def decode_keep(self, layer_idx: int, num_kv_heads: int) -> torch.Tensor:
        """(KV,) tokens each head keeps when decode compresses one block."""

    def check_model(self, model) -> None:
        """Raise if this method cannot run on `model` (e.g. budgets of another model)."""


def local_geometry(seq_len: int, block_size: int, window: int) -> tuple[int, int] | None:
    """(n_blocks, local_start) of the global/local split, or None when the prompt stays dense."""
    if seq_len <= window + block_size:
        return None
    n = (seq_len - window) // block_size
    return n, n * block_size


def row_geometry(
    seq_len: int, key_start: torch.Tensor, block_size: int, window: int, dense_below: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (n_blocks, local_start) of a left-padded batch, on key_start's device, no host sync.

    Row r's real prompt is [s_r, L) with s_r = key_start[r] and L_r = L - s_r tokens: its blocks are
    counted from s_r, so they are the blocks it has alone, shifted by its padding. A row that stays
    dense alone (L_r <= window + block_size, or L_r < dense_below) gets n_r = 0 and local start s_r
    (everything local); else n_r = (L_r - window) // block_size and local start s_r + n_r * block_size.
    -> n_rows (B,) int64, local_starts (B,) int64.
    """
    ks = key_start.long()
    real = seq_len - ks
    sparse = real > window + block_size
    if dense_below:
        sparse &= real >= dense_below
    n = torch.where(sparse, torch.div(real - window, block_size, rounding_mode="floor"), torch.zeros_like(real))
    return n, ks + n * block_size


def global_region(seq_len: int, key_start: torch.Tensor, local_starts: torch.Tensor) -> torch.Tensor:
    """(B, seq_len) True on each row's global region [key_start, local_start)."""
    return key_validity(seq_len, key_start) & ~key_validity(seq_len, local_starts)


def key_validity(seq_len: int, key_start: torch.Tensor) -> torch.Tensor:
    """(B, L) True for non-padding keys."""
    return torch.arange(seq_len, device=key_start.device)[None, :] >= key_start[:, None]


def sink_mask(seq_len: int, key_start: torch.Tensor, n_sinks: int) -> torch.Tensor:
    """(B, seq_len) True on the first n_sinks non-padding keys of each row."""
    return key_validity(seq_len, key_start) & ~key_validity(seq_len, key_start + n_sinks)
