"""Explicit backend dispatch: Triton on CUDA tensors, the PyTorch reference elsewhere.

backend: "auto" (Triton when the tensors are on CUDA and Triton imports), "triton", "reference".
"""
from __future__ import annotations

import os
from functools import lru_cache
from typing import Literal

import torch

from . import reference
from .plan import TokenPlan

Backend = Literal["auto", "triton", "reference"]


@lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


def resolve(backend: Backend, device: torch.device) -> str:
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "reference"
    if backend == "triton" and not triton_available():
        raise RuntimeError("backend='triton' was asked for but triton is not installed")
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' needs CUDA tensors (got {device.type}); "
                         "use backend='reference' or set TRITON_INTERPRET=1 to run the kernels on the CPU")
    return backend


def check_name(backend: str) -> None:
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}")


def sparse_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: TokenPlan, scaling: float, backend: Backend = "auto"
) -> torch.Tensor:
    """TCA prefill attention. q (B, H, L, D), k/v (B, KV, L, D) -> (B, L, H, D)."""
    if resolve(backend, q.device) == "triton":
        from .triton_prefill import sparse_prefill_triton

        return sparse_prefill_triton(q, k, v, plan, scaling)
    return reference.sparse_prefill_ref(q, k, v, plan, scaling)


def ragged_decode(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    g_keys: torch.Tensor,
    g_values: torch.Tensor,
    g_pos: torch.Tensor,
    g_offsets: torch.Tensor,
    t_keys: torch.Tensor,
    t_values: torch.Tensor,
    t_pos: torch.Tensor,
    scaling: float,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the ragged cache; see reference.ragged_decode_ref for the layout."""
    args = (q, q_pos, g_keys, g_values, g_pos, g_offsets, t_keys, t_values, t_pos, scaling)
    if resolve(backend, q.device) == "triton":
        from .triton_decode import ragged_decode_triton

        return ragged_decode_triton(*args)
    return reference.ragged_decode_ref(*args)


def select_and_pack(
    q_last: torch.Tensor,
    k: torch.Tensor,
    key_start: torch.Tensor,
    keep_rank: torch.Tensor,
    n_blocks: int | torch.Tensor,
    block_size: int,
    alpha: float,
    mass_norm: str,
    scaling: float,
    max_kept: int,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """TCA Phase 2 selection; see reference.select_and_pack_ref. The Triton path never syncs.

    Blocks of row r start at key_start[r]; n_blocks: an int (every row) or a (B,) tensor of
    per-row block counts; keep_rank (KV, n_max) or (B, KV, n_max) per row."""
    args = (q_last, k, key_start, keep_rank, n_blocks, block_size, alpha, mass_norm, scaling, max_kept)
    if resolve(backend, k.device) == "triton":
        from .triton_select import select_and_pack_triton

        return select_and_pack_triton(*args)
    return reference.select_and_pack_ref(*args)
