"""Triton: one decode token into a static ring buffer in one launch (ring_append.py has the
semantics and the PyTorch reference, which takes up to seven: the slot's subtraction and
remainder, three index copies, the query position, the counter's increment).

One program does it all: it reads the counter once, copies the B*KV rows of k and v into the slot,
writes the position into every row's t_pos, then q_pos <- counter and counter += 1. A single
program is what makes the increment safe (no other program can read the counter after it), and the
work is a few KiB: the launch, not the copy, is the cost it saves.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .ring_append import check


# per-request sizes (ring length, its first position, rows) are not specialised: no compile per request
@triton.jit(do_not_specialize=["t_pos0", "T", "B"])
def _ring_append_kernel(K, V, TK, TV, TPOS, COUNTER, QPOS, t_pos0, T, B, KV, D,
                        sk_b, sk_h, sk_d, sv_b, sv_h, sv_d, st_b, st_h, st_t, su_b, su_h, su_t, sp_b,
                        HAS_TPOS: tl.constexpr, HAS_QPOS: tl.constexpr, BLOCK_D: tl.constexpr):
    pos = tl.load(COUNTER)
    slot = (pos - t_pos0) % T
    slot = tl.where(slot < 0, slot + T, slot)  # a floor modulo, as torch.remainder
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    for r in range(0, B * KV):
        b = (r // KV).to(tl.int64)  # int64 offsets: a full-budget ring holds the whole prompt
        h = (r % KV).to(tl.int64)
        kr = tl.load(K + b * sk_b + h * sk_h + d * sk_d, mask=d_ok)
        vr = tl.load(V + b * sv_b + h * sv_h + d * sv_d, mask=d_ok)
        tl.store(TK + b * st_b + h * st_h + slot * st_t + d, kr, mask=d_ok)
        tl.store(TV + b * su_b + h * su_h + slot * su_t + d, vr, mask=d_ok)
    if HAS_TPOS:
        for b in range(0, B):
            tl.store(TPOS + b * sp_b + slot, pos)  # b * sp_b < B * T: int32 is enough
    if HAS_QPOS:
        tl.store(QPOS, pos)
    tl.store(COUNTER, pos + 1)


def ring_append_triton(t_keys: torch.Tensor, t_values: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       counter: torch.Tensor, t_pos0: int = 0, t_pos: torch.Tensor | None = None,
                       q_pos: torch.Tensor | None = None) -> None:
    check(t_keys, t_values, k, v, counter, t_pos, q_pos)
    B, KV, T, D = t_keys.shape
    if t_keys.stride(3) != 1 or t_values.stride(3) != 1 or (t_pos is not None and t_pos.stride(1) != 1):
        raise ValueError("ring_append_triton: the ring's last dimension must be contiguous")
    _ring_append_kernel[(1,)](
        k, v, t_keys, t_values, t_pos if t_pos is not None else counter, counter,
        q_pos if q_pos is not None else counter, t_pos0, T, B, KV, D,
        k.stride(0), k.stride(1), k.stride(3), v.stride(0), v.stride(1), v.stride(3),
        t_keys.stride(0), t_keys.stride(1), t_keys.stride(2), t_values.stride(0), t_values.stride(1),
        t_values.stride(2), t_pos.stride(0) if t_pos is not None else 0,
        HAS_TPOS=t_pos is not None, HAS_QPOS=q_pos is not None, BLOCK_D=triton.next_power_of_2(D), num_warps=1)
