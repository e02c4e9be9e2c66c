"""Explicit backend dispatch: Triton on CUDA tensors, the PyTorch reference elsewhere.

backend: "auto" (Triton when the tensors are on CUDA and Triton imports), "triton", "reference".
column_mass: the attention probability each key receives, summed over queries and query heads
(engine/column_mass.py; SpAtten's token importance).
key_bias (plan.KeyBias, optional on every executor): the key logit bias, added to the logits of a
few listed keys per (row, query head) before the softmax; `dense_prefill` is the dense path with one.
"""
from __future__ import annotations

import os
from functools import lru_cache
from typing import Literal

import torch

from . import block_reference, compensation, reference, subset
from .column_mass import column_mass_ref
from .plan import BlockPlan, DecodeSelection, KeyBias, RaggedCacheView, SubsetPlan, TokenPlan
from .ring_append import check as ring_append_check
from .ring_append import ring_append_ref

Backend = Literal["auto", "triton", "reference"]


@lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


def check_name(backend: str) -> None:
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}")


def resolve(backend: Backend, device: torch.device) -> str:
    check_name(backend)
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "reference"
    if backend == "triton" and not triton_available():
        raise RuntimeError("backend='triton' was asked for but triton is not installed")
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' needs CUDA tensors (got {device.type}); "
                         "use backend='reference' or set TRITON_INTERPRET=1 to run the kernels on the CPU")
    return backend


def sparse_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: TokenPlan, scaling: float, backend: Backend = "auto",
    key_bias: KeyBias | None = None,
) -> torch.Tensor:
    """TCA prefill attention. q (B, H, L, D), k/v (B, KV, L, D) -> (B, L, H, D); the query heads
    a plan's head_keep drops output zeros."""
    if plan.attend_all:
        raise ValueError("this TokenPlan says only what the cache keeps (attend_all): its prefill is plain "
                         "causal attention, run by the caller")
    if resolve(backend, q.device) == "triton":
        from .triton_prefill import sparse_prefill_triton

        out = sparse_prefill_triton(q, k, v, plan, scaling, key_bias=key_bias)
    else:
        out = reference.sparse_prefill_ref(q, k, v, plan, scaling, key_bias=key_bias)
    if plan.head_keep is not None:
        out = out * plan.head_keep.to(device=out.device, dtype=out.dtype)[:, None, :, None]
    return out


def prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan, scaling: float, backend: Backend = "auto",
            key_bias: KeyBias | None = None) -> torch.Tensor:
    """Prefill attention over any plan type -> (B, L, H, D)."""
    if isinstance(plan, TokenPlan):
        return sparse_prefill(q, k, v, plan, scaling, backend, key_bias)
    if isinstance(plan, BlockPlan):
        return block_sparse_prefill(q, k, v, plan, scaling, backend, key_bias)
    if isinstance(plan, SubsetPlan):
        return subset_prefill(q, k, v, plan, scaling, backend, key_bias)
    raise TypeError(f"no executor for a plan of type {type(plan).__name__}")


def ragged_decode(
    q: torch.Tensor, cache: RaggedCacheView, scaling: float, backend: Backend = "auto", *,
    selection: DecodeSelection | None = None, key_bias: KeyBias | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (B, H, Q, D) over the ragged cache (only the selected tail pages when a
    selection is given) -> out (B, Q, H, D), lse (B, H, Q) fp32; see reference.ragged_decode_ref.
    The view's compensation entries (if any): inside the reference's softmax; on the Triton path
    merged into the kernel's (out, lse) afterwards (compensation.merge)."""
    if resolve(backend, q.device) == "triton":
        from .triton_decode import env_config, ragged_decode_triton

        out, lse = ragged_decode_triton(q, cache, scaling, selection=selection, key_bias=key_bias, **env_config())
        if cache.c_keys is not None:
            out, lse = compensation.merge(q, out, lse, cache.c_keys, cache.c_values, cache.c_logw, scaling)
        return out, lse
    return reference.ragged_decode_ref(q, cache, scaling, selection, key_bias)


def ring_append(t_keys: torch.Tensor, t_values: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                counter: torch.Tensor, t_pos0: int = 0, t_pos: torch.Tensor | None = None,
                q_pos: torch.Tensor | None = None, backend: Backend = "auto") -> None:
    """One decode token into a static ring (the static caches' decode steps), in place: see
    ring_append.ring_append_ref. Triton: one launch (the reference: up to seven)."""
    if resolve(backend, k.device) == "triton":
        from .triton_ring_append import ring_append_triton

        return ring_append_triton(t_keys, t_values, k, v, counter, t_pos0, t_pos, q_pos)
    ring_append_check(t_keys, t_values, k, v, counter, t_pos, q_pos)
    return ring_append_ref(t_keys, t_values, k, v, counter, t_pos0, t_pos, q_pos)


def dense_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, key_bias: KeyBias,
    key_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense causal prefill with a key logit bias (no plan): SDPA with an additive mask, query chunks
    at a time, on any device (reference.dense_biased). -> (B, L, H, D)."""
    return reference.dense_biased(q, k, v, scaling, key_bias, key_start)


def column_mass(q: torch.Tensor, k: torch.Tensor, scaling: float, key_start: torch.Tensor, weight: torch.Tensor,
                plan: TokenPlan | None = None, backend: Backend = "auto") -> torch.Tensor:
    """Per key, the attention probability it receives under the plan's mask (None: dense causal),
    summed over the query heads of its KV head and over the queries, each times weight (B, L).
    q (B, H, L, D), k (B, KV, L, D) -> (B, KV, L) fp32; see column_mass.column_mass_ref."""
    if resolve(backend, q.device) == "triton":
        from .triton_column_mass import column_mass_triton

        return column_mass_triton(q, k, scaling, key_start, weight, plan)
    return column_mass_ref(q, k, scaling, key_start, weight, plan)


def block_sparse_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan, scaling: float, backend: Backend = "auto",
    key_bias: KeyBias | None = None,
) -> torch.Tensor:
    """Block-sparse prefill attention. q (B, H, L, D), k/v (B, KV, L, D) -> (B, L, H, D); with the
    plan's in-loop skipping (BLASST) when plan.skip_threshold is set (both backends fill
    plan.skip_dropped); see block_reference.block_sparse_prefill_ref."""
    if resolve(backend, q.device) == "triton":
        from .triton_block import block_sparse_prefill_triton

        return block_sparse_prefill_triton(q, k, v, plan, scaling, key_bias=key_bias)
    return block_reference.block_sparse_prefill_ref(q, k, v, plan, scaling, key_bias=key_bias)


def subset_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: SubsetPlan, scaling: float, backend: Backend = "auto",
    key_bias: KeyBias | None = None,
) -> torch.Tensor:
    """Token-subset prefill (compress, dense causal attention, decompress). q (B, H, L, D),
    k/v (B, KV, L, D) -> (B, L, H, D). "reference": subset.subset_prefill_ref (the oracle); otherwise
    the gather + SDPA path on any device (the dense kernel is the device's: no Triton kernel of our own)."""
    check_name(backend)
    if backend == "reference":
        return subset.subset_prefill_ref(q, k, v, plan, scaling, key_bias)
    return subset.subset_prefill_gather(q, k, v, plan, scaling, key_bias)
