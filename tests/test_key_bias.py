"""The key logit bias (engine.plan.KeyBias) in every executor: the references against a hand
computation, bias 0 equal to no bias, and the Triton prefill, block and decode kernels (under the
interpreter without CUDA) against the references; the dense SDPA path likewise."""
from __future__ import annotations

import math

import pytest
import torch
from kernel_helpers import DEV, make_qkv
from test_block_sparse import SMALL as BLOCK_SMALL, random_plan as random_block_plan
from test_triton_kernels import SMALL, random_cache, random_plan

from tca_attention.engine import dispatch, reference as R
from tca_attention.engine.triton_common import interpreted
from tca_attention.engine.block_reference import block_sparse_prefill_ref
from tca_attention.engine.plan import BlockPlan, KeyBias, TokenPlan
from tca_attention.engine.triton_block import block_sparse_prefill_triton
from tca_attention.engine.triton_decode import ragged_decode_triton
from tca_attention.engine.triton_prefill import sparse_prefill_triton


def random_bias(gen: torch.Generator, B: int, H: int, L: int, P: int = 3) -> KeyBias:
    """P slots per (row, head): distinct positions in [0, L), the last slot unused (-1)."""
    pos = torch.stack([torch.randperm(L, generator=gen)[:P] for _ in range(B * H)]).view(B, H, P)
    pos[..., -1] = -1
    return KeyBias(pos.to(DEV), (2 * torch.randn(B, H, P, generator=gen)).to(DEV))


def dense_plan(B: int, KV: int, L: int, key_start: torch.Tensor) -> TokenPlan:
    """A TokenPlan whose band covers every causal key (dense attention)."""
    return TokenPlan(torch.zeros(B, KV, 0, dtype=torch.long, device=DEV), torch.zeros(B, KV, dtype=torch.int32, device=DEV),
                     0, L + 1, 16, key_start.to(DEV), torch.full((KV,), 16, device=DEV))


def hand_attention(q, k, v, scaling, bias_rows, key_start):
    """Explicit softmax over visible keys with exp(bias) weights: q (B, H, L, D) -> (B, L, H, D)."""
    B, H, L, D = q.shape
    g = H // k.shape[1]
    out = torch.zeros(B, L, H, D)
    for b in range(B):
        for h in range(H):
            for j in range(int(key_start[b]), L):
                keys = range(int(key_start[b]), j + 1)
                w = torch.tensor([math.exp(float(q[b, h, j] @ k[b, h // g, s]) * scaling + float(bias_rows[b, h, s]))
                                  for s in keys])
                w = w / w.sum()
                out[b, j, h] = sum(w[i] * v[b, h // g, s] for i, s in enumerate(keys))
    return out


def test_hand_computation_every_prefill_path():
    gen = torch.Generator().manual_seed(0)
    B, H, KV, L, D = 2, 4, 2, 12, 16
    q, k, v = make_qkv(gen, B, H, KV, L, D, torch.float32)
    ks = torch.tensor([0, 3], device=DEV)  # every input on the device the kernels run on
    # ZeroTuning's shape: the row's first token, one scale per head (0.5, 1, 2, 4)
    kb = KeyBias.at(ks, torch.log(torch.tensor([0.5, 1.0, 2.0, 4.0], device=DEV)))
    want = hand_attention(q.cpu(), k.cpu(), v.cpu(), 0.25, kb.rows(L).cpu(), ks.cpu())
    plan = dense_plan(B, KV, L, ks)
    for out in (R.sparse_prefill_ref(q, k, v, plan, 0.25, key_bias=kb),
                sparse_prefill_triton(q, k, v, plan, 0.25, SMALL, key_bias=kb),
                block_sparse_prefill_ref(q, k, v, BlockPlan.dense(B, KV, L, ks, 16, 16), 0.25, key_bias=kb),
                block_sparse_prefill_triton(q, k, v, BlockPlan.dense(B, H, L, ks, 16, 16), 0.25, BLOCK_SMALL,
                                            key_bias=kb),
                dispatch.dense_prefill(q, k, v, 0.25, kb, ks)):
        torch.testing.assert_close(out.float().cpu(), want, atol=1e-5, rtol=1e-5)
    # the first token's weight is really scaled by the head's factor (then renormalised)
    assert not torch.allclose(want, R.dense_causal_ref(q, k, v, 0.25, ks.to(DEV)).cpu(), atol=1e-3)


def test_zero_bias_is_unbiased():
    gen = torch.Generator().manual_seed(1)
    B, H, KV, L, D = 2, 4, 2, 40, 16
    q, k, v = make_qkv(gen, B, H, KV, L, D, torch.float32)
    kb = random_bias(gen, B, H, L)
    zero = KeyBias(kb.pos, torch.zeros_like(kb.bias))
    plan = random_plan(gen, B, KV, L, 8, 8, 0.5, [0, 5])
    torch.testing.assert_close(R.sparse_prefill_ref(q, k, v, plan, 0.25, key_bias=zero),
                               R.sparse_prefill_ref(q, k, v, plan, 0.25), atol=0, rtol=0)
    # the kernel scales biased logits before the exponent and folds the scale into the exponent's
    # FMA without a bias: on a GPU the two roundings differ by ~1 ulp (H100: 4.8e-7 at most), so
    # equal up to float rounding there; the interpreter's numpy does not fuse: bit for bit
    tol = 0.0 if interpreted() else 2e-6
    torch.testing.assert_close(sparse_prefill_triton(q, k, v, plan, 0.25, SMALL, key_bias=zero),
                               sparse_prefill_triton(q, k, v, plan, 0.25, SMALL), atol=tol, rtol=tol)
    ks = torch.tensor([0, 5], device=DEV)
    torch.testing.assert_close(dispatch.dense_prefill(q, k, v, 0.25, zero, ks),
                               R.dense_causal_ref(q, k, v, 0.25, ks.to(DEV)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("key_start,window,block", [([0, 0], 8, 8), ([0, 7], 5, 16), ([3, 11], 16, 8)])
def test_prefill_kernel_matches_reference(key_start, window, block):
    gen = torch.Generator().manual_seed(2)
    B, H, KV, L, D = 2, 4, 2, 53, 16
    q, k, v = make_qkv(gen, B, H, KV, L, D, torch.float32)
    plan = random_plan(gen, B, KV, L, window, block, 0.5, key_start, per_row=True)
    kb = random_bias(gen, B, H, L, P=4)
    ref = R.sparse_prefill_ref(q, k, v, plan, 0.3, key_bias=kb)
    assert not torch.allclose(ref, R.sparse_prefill_ref(q, k, v, plan, 0.3), atol=1e-3)
    torch.testing.assert_close(sparse_prefill_triton(q, k, v, plan, 0.3, SMALL, key_bias=kb), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("per_kv,n_extra,skip", [(True, 0, False), (False, 3, False), (True, 2, True)])
def test_block_kernel_matches_reference(per_kv, n_extra, skip):
    gen = torch.Generator().manual_seed(3)
    B, H, KV, L, D = 2, 4, 2, 70, 16
    q, k, v = make_qkv(gen, B, H, KV, L, D, torch.float32)
    plan = random_block_plan(gen, L, KV if per_kv else H, [0, 9], 16, 16, 0.5, n_extra=n_extra)
    plan = plan.with_skip(0.3, H) if skip else plan
    kb = random_bias(gen, B, H, L, P=4)
    ref = block_sparse_prefill_ref(q, k, v, plan, 0.3, key_bias=kb)
    dropped = plan.skip_dropped.clone() if skip else None
    torch.testing.assert_close(block_sparse_prefill_triton(q, k, v, plan, 0.3, BLOCK_SMALL, key_bias=kb), ref,
                               atol=1e-4, rtol=1e-4)
    if skip:
        assert torch.equal(plan.skip_dropped, dropped)


def test_decode_kernel_matches_reference():
    gen = torch.Generator().manual_seed(4)
    B, H, KV, NQ, D, T = 2, 8, 2, 2, 16, 20
    q, cache = random_cache(gen, B, H, KV, NQ, D, T, 30, torch.float32)
    # biases on positions the cache holds (global and tail) and some it does not
    held = torch.cat([cache.g_pos.cpu(), cache.t_pos[0].cpu()]).unique()
    held = held[held >= 0]
    pos = torch.stack([held[torch.randperm(held.numel(), generator=gen)[:4]] for _ in range(B * H)]).view(B, H, 4)
    pos[..., -1] = 10_000  # not in the cache: no effect
    kb = KeyBias(pos.to(DEV), (2 * torch.randn(B, H, 4, generator=gen)).to(DEV))
    ref, ref_lse = R.ragged_decode_ref(q, cache, 0.3, key_bias=kb)
    plain, _ = R.ragged_decode_ref(q, cache, 0.3)
    assert not torch.allclose(ref, plain, atol=1e-3)
    out, lse = ragged_decode_triton(q, cache, 0.3, chunk=16, key_bias=kb)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    torch.testing.assert_close(lse[fin], ref_lse[fin], atol=1e-4, rtol=1e-4)


def test_bad_bias_is_refused():
    B, H = 1, 2
    with pytest.raises(ValueError, match="repeat"):
        KeyBias(torch.tensor([[[1, 1], [0, -1]]]), torch.zeros(1, 2, 2)).validate(B, H)
    with pytest.raises(ValueError, match="finite"):
        KeyBias(torch.tensor([[[0], [0]]]), torch.tensor([[[-math.inf], [0.0]]])).validate(B, H)
    with pytest.raises(ValueError, match=r"\(B=1, H=2, P\)"):
        KeyBias(torch.zeros(1, 3, 1, dtype=torch.long), torch.zeros(1, 3, 1)).validate(B, H)


@pytest.mark.parametrize("per_query_head", [False, True])
def test_subset_executors_with_bias(per_query_head, monkeypatch):
    """Token subsets (SubsetPlan): the gather + SDPA path (query chunks) equals the reference; a
    subset of every token equals the dense biased path; bias 0 equals no bias."""
    from tca_attention.engine import subset
    from tca_attention.engine.plan import SubsetPlan, pack_mask

    monkeypatch.setattr(subset, "_CHUNK", 5)  # several query chunks
    gen = torch.Generator().manual_seed(6)
    B, H, KV, L, D = 2, 4, 2, 31, 16
    q, k, v = make_qkv(gen, B, H, KV, L, D, torch.float32)
    ks = torch.tensor([0, 6], device=DEV)
    Hp = H if per_query_head else KV
    valid = torch.arange(L, device=DEV)[None, None] >= ks[:, None, None]
    mask = (torch.rand(B, Hp, L, generator=gen) < 0.6).to(DEV) & valid
    plan = SubsetPlan(*pack_mask(mask), ks)
    kb = random_bias(gen, B, H, L, P=4)
    ref = subset.subset_prefill_ref(q, k, v, plan, 0.3, kb)
    assert not torch.allclose(ref, subset.subset_prefill_ref(q, k, v, plan, 0.3), atol=1e-3)
    torch.testing.assert_close(dispatch.prefill(q, k, v, plan, 0.3, key_bias=kb), ref, atol=1e-5, rtol=1e-5)
    zero = KeyBias(kb.pos, torch.zeros_like(kb.bias))
    torch.testing.assert_close(subset.subset_prefill_gather(q, k, v, plan, 0.3, zero),
                               subset.subset_prefill_gather(q, k, v, plan, 0.3), atol=1e-6, rtol=1e-6)
    full = SubsetPlan(*pack_mask(valid.expand(B, Hp, L)), ks)
    got, want = subset.subset_prefill_gather(q, k, v, full, 0.3, kb), dispatch.dense_prefill(q, k, v, 0.3, kb, ks)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, 6:], want[1, 6:], atol=1e-5, rtol=1e-5)
