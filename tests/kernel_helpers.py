"""What the kernel test files share: the device, random inputs and the tolerance check.

Tolerance (flash-attention's method): a kernel run in low precision is compared with the fp32
reference, and its max error must be within 2x the error of the same attention computed by
torch in that low precision (explicit L x L mask, bf16/fp16 matmuls and softmax) plus 1e-5.
fp32 inputs are held to an explicit 1e-4 max error (interpreter: exact fp32 dots). Callers may
allow one unit of the output's last place on top (check_close's ulps).
"""
from __future__ import annotations

import torch

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")


def make_qkv(gen, B, H, KV, L, D, dtype):
    q = torch.randn(B, H, L, D, generator=gen).to(DEV, dtype)
    k = torch.randn(B, KV, L, D, generator=gen).to(DEV, dtype)
    v = torch.randn(B, KV, L, D, generator=gen).to(DEV, dtype)
    return q, k, v


def masked_attention_lowp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scaling: float) -> torch.Tensor:
    """Same math in q's precision: (B, H, L, D), (B, KV, L, D), mask (B, KV or H, L, L) -> (B, L, H, D)."""
    g = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(g, 1)
    vv = v.repeat_interleave(g, 1)
    m = mask if mask.shape[1] == q.shape[1] else mask.repeat_interleave(g, 1)
    logits = (q @ kk.transpose(-1, -2)) * scaling
    p = torch.softmax(logits.masked_fill(~m, float("-inf")), dim=-1)
    p = torch.nan_to_num(p)  # rows with no visible key -> zeros
    return (p @ vv).transpose(1, 2)


def check_close(out: torch.Tensor, ref32: torch.Tensor, lowp: torch.Tensor | None, ulps: int = 0) -> None:
    """ulps: low precision only, an extra allowance of that many units of the output dtype at each
    reference element (eps x |ref|): the final rounding of a value near a rounding boundary may land
    one unit off, which exceeds 2x torch's error where outputs are large (few keys per query)."""
    assert out.dtype == (lowp.dtype if lowp is not None else out.dtype)
    assert torch.isfinite(out).all(), "non-finite output (unwritten or NaN)"
    err = (out.float() - ref32.float()).abs().max().item()
    if out.dtype == torch.float32:
        assert err <= 1e-4, err
        return
    base = (lowp.float() - ref32.float()).abs().max().item()
    slack = ulps * torch.finfo(out.dtype).eps * ref32.float().abs()
    excess = ((out.float() - ref32.float()).abs() - slack).max().item()
    assert excess <= 2 * base + 1e-5, f"kernel err {err:.3e} ({ulps} ulp allowed) vs torch low-precision err {base:.3e}"
