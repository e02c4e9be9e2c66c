"""What the Triton kernel tests share: the interpreter set-up, the tolerance and decode helpers.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set before the
kernel modules are imported; a kernel module imported earlier without it is rebuilt under it).

Tolerance (flash-attention's method): the kernel in low precision is compared with the fp32
reference, and its max error must be within 2x the error of the same attention computed by
torch in that low precision (explicit mask, bf16/fp16 matmuls and softmax) plus 1e-5.
fp32 inputs are held to an explicit 1e-4 max error (interpreter: exact fp32 dots). Callers may
allow one unit of the output's last place on top (check_close's ulps), or a larger factor where a
test says why.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import sys

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in ("tca_attention.engine.triton_common", "tca_attention.engine.triton_prefill",
                  "tca_attention.engine.triton_decode", "tca_attention.engine.triton_block",
                  "tca_attention.engine.triton_column_mass"):
        if _name in sys.modules:
            importlib.reload(sys.modules[_name])

from tca_attention.engine import reference as R  # noqa: E402
from tca_attention.engine.plan import DecodeSelection, RaggedCacheView  # noqa: E402
from tca_attention.engine.triton_decode import ragged_decode_triton  # noqa: E402

DEV = torch.device("cuda" if CUDA else "cpu")
# The 200-shape GPU fuzzes run as GPU_FUZZ_SHARDS tests of every GPU_FUZZ_SHARDS-th shape (same random
# stream, so together they are the 200 shapes): each compiles its own Triton variants, and the
# shards can run side by side (scripts/gpu_verify.sh PARALLEL=1), which cuts a device call's length
GPU_FUZZ_SHARDS = 4


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


def check_close(out: torch.Tensor, ref32: torch.Tensor, lowp: torch.Tensor | None, factor: float = 2.0,
                ulps: int = 0) -> None:
    """out within factor x torch's low-precision max error (lowp) + 1e-5 of ref32; fp32: 1e-4.

    ulps: low precision only, an extra allowance of that many units of the output dtype at each
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
    assert excess <= factor * base + 1e-5, f"kernel err {err:.3e} ({ulps} ulp allowed) vs torch low-precision err {base:.3e}"


def fp32(q: torch.Tensor, cache: RaggedCacheView) -> tuple[torch.Tensor, RaggedCacheView]:
    """The same inputs in fp32 (for the fp32 reference)."""
    return q.float(), dataclasses.replace(cache, g_keys=cache.g_keys.float(), g_values=cache.g_values.float(),
                                          t_keys=cache.t_keys.float(), t_values=cache.t_values.float())


def decode_lowp(q: torch.Tensor, cache: RaggedCacheView, scaling: float,
                selection: DecodeSelection | None = None) -> torch.Tensor:
    """ragged_decode_ref's math kept in the inputs' precision."""
    c = cache
    q_pos, gk, gv, gp, off, tk, tv, tp = c.q_pos, c.g_keys, c.g_values, c.g_pos, c.g_offsets, c.t_keys, c.t_values, c.t_pos
    B, H, NQ, D = q.shape
    KV, T = tk.shape[1:3]
    g = H // KV
    tail_sel = selection.tail_mask(T) if selection is not None else torch.ones(B, KV, T, dtype=torch.bool, device=DEV)
    out = torch.empty(B, NQ, H, D, dtype=q.dtype, device=DEV)
    for b in range(B):
        for h in range(KV):
            s, e = int(off[b * KV + h]), int(off[b * KV + h + 1])
            keys, vals = torch.cat([gk[s:e], tk[b, h]]), torch.cat([gv[s:e], tv[b, h]])
            pos = torch.cat([gp[s:e], torch.where(tail_sel[b, h], tp[b], -1)])
            vis = (pos[None] >= 0) & (pos[None] <= q_pos[b][:, None])
            p = torch.softmax(((q[b, h * g : (h + 1) * g] @ keys.T) * scaling).masked_fill(~vis, float("-inf")), -1)
            out[b, :, h * g : (h + 1) * g] = (torch.nan_to_num(p) @ vals).transpose(0, 1)
    return out


def run_decode(q: torch.Tensor, cache: RaggedCacheView, scaling: float, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """ragged_decode_triton into NaN-poisoned out/lse buffers."""
    B, H, NQ, D = q.shape
    out = torch.full((B, NQ, H, D), float("nan"), dtype=q.dtype, device=DEV)  # poison
    lse = torch.full((B, H, NQ), float("nan"), device=DEV)
    return ragged_decode_triton(q, cache, scaling, out=out, lse=lse, **kw)


def check_decode(q: torch.Tensor, cache: RaggedCacheView, scaling: float, out: torch.Tensor, lse: torch.Tensor,
                 selection: DecodeSelection | None = None, factor: float = 2.0) -> None:
    """A decode kernel's out/lse against the fp32 reference (out: check_close; lse: equal -inf
    pattern, close where finite)."""
    ref, ref_lse = R.ragged_decode_ref(*fp32(q, cache), scaling, selection)
    check_close(out, ref, decode_lowp(q, cache, scaling, selection) if q.dtype != torch.float32 else None, factor)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    fin = torch.isfinite(ref_lse)
    assert torch.isfinite(lse[fin]).all()
    tol = dict(atol=2e-2, rtol=1e-3) if q.dtype != torch.float32 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse[fin], ref_lse[fin], **tol)
