"""Block-sparse prefill (BlockPlan): the PyTorch reference and the Triton kernel.

Without CUDA the kernel runs under the Triton interpreter (TRITON_INTERPRET=1, set by conftest and kernel_helpers
before anything imports triton) at small sizes; tests marked `gpu` use realistic sizes.
Tolerance: kernel_helpers.check_close (2x torch's own low-precision error, flash-attention style),
the low-precision baseline computed from an explicit mask built here, independently of the executors.
Sparse lists leave queries few keys, so outputs reach |v| ~ 3, where one bf16 unit (0.016) can exceed
2x torch's max error: a kernel value rounded to the other side of a rounding boundary. The comparisons
with low-precision kernels therefore allow one unit of the output's last place (ULPS) on top.
"""
from __future__ import annotations

import dataclasses
import random
import re

import pytest
import torch
from kernel_helpers import CUDA, DEV, GPU_FUZZ_SHARDS, check_close, make_qkv, masked_attention_lowp

from tca_attention.engine import dispatch
from tca_attention.engine.block_reference import block_sparse_prefill_ref
from tca_attention.engine.plan import BlockPlan
from tca_attention.engine.triton_block import BlockConfig, block_sparse_prefill_triton

# Small tiles under the interpreter: more programs, more masked/unmasked segments, fast enough.
SMALL = BlockConfig(block_m=32, block_n=16, num_warps=4, num_stages=1) if not CUDA else None
ULPS = 1


# ---------------------------------------------------------------------------------------------
# helpers
def cdiv(a, b: int):
    """ceil(a / b) of ints or integer tensors."""
    return -(-a // b)


def random_plan(
    gen: torch.Generator, L: int, Hp: int, key_start: list[int], bq: int, bk: int, density: float,
    n_extra: int = 0, p_empty: float = 0.2,
) -> BlockPlan:
    """Random ascending block lists per (row, head, query block), any key block of the row (before,
    on or past the diagonal), some lists empty; n_extra extra columns, some unused (-1)."""
    B = len(key_start)
    ks = torch.tensor(key_start, dtype=torch.long)
    NQ, NKB = cdiv(L - min(key_start), bq), cdiv(L, bk)
    i, j = torch.arange(NQ), torch.arange(NKB)
    in_row = (i[:, None] < cdiv(L - ks, bq)[:, None, None]) & (j < cdiv(L - ks, bk)[:, None, None])  # (B, NQ, NKB)
    dens = torch.rand(B, Hp, 1, 1, generator=gen) * 2 * density
    table = (torch.rand(B, Hp, NQ, NKB, generator=gen) < dens) & in_row[:, None]
    diag = ((i * bq + bq - 1) // bk).clamp(max=NKB - 1)  # key block of each query block's last query
    table[..., i, diag] |= torch.rand(B, Hp, NQ, generator=gen) < 0.6
    table &= (torch.rand(B, Hp, NQ, 1, generator=gen) >= p_empty) & in_row[:, None]
    counts = table.sum(-1)  # (B, Hp, NQ)
    indptr = torch.nn.functional.pad(counts.cumsum(-1), (1, 0))
    nnz = int(indptr[..., -1].max())
    indices = torch.zeros(B, Hp, nnz, dtype=torch.long)
    for b in range(B):
        for h in range(Hp):
            listed = table[b, h].nonzero()[:, 1]  # row-major: ascending per query block
            indices[b, h, : listed.numel()] = listed
    extra = None
    if n_extra:  # random real positions, unsorted; repeats and a random 30% unused
        span = (L - ks)[:, None, None, None]
        extra = (ks[:, None, None, None] + torch.rand(B, Hp, NQ, n_extra, generator=gen) * span).long().sort(-1).values
        unused = torch.rand(extra.shape, generator=gen) < 0.3
        unused[..., 1:] |= extra[..., 1:] == extra[..., :-1]
        extra = torch.where(unused, -1, extra)[..., torch.randperm(n_extra, generator=gen)]
    return BlockPlan(bq, bk, ks.to(DEV), indptr.to(DEV, torch.int32), indices.to(DEV, torch.int32),
                     extra.to(DEV) if extra is not None else None)


def plan_mask(plan: BlockPlan, L: int) -> torch.Tensor:
    """Explicit visibility (B, Hp, L, L) of a plan, written independently of the executors."""
    B, Hp = plan.indptr.shape[:2]
    pos = torch.arange(L, device=DEV)
    mask = torch.zeros(B, Hp, L, L, dtype=torch.bool, device=DEV)
    for b in range(B):
        ks = int(plan.key_start[b])
        qblk = torch.where(pos >= ks, (pos - ks) // plan.block_q, -1)  # -1: padding
        kblk = torch.where(pos >= ks, (pos - ks) // plan.block_k, -1)
        for h in range(Hp):
            ptr = plan.indptr[b, h].long()
            owner = torch.repeat_interleave(torch.arange(ptr.numel() - 1, device=DEV), ptr.diff())
            pairs = torch.zeros(plan.n_qblocks + 1, cdiv(L, plan.block_k) + 1, dtype=torch.bool, device=DEV)
            pairs[owner, plan.indices[b, h, int(ptr[0]) : int(ptr[-1])].long()] = True  # [-1] row/col: padding
            m = pairs[qblk][:, kblk]  # (L, L)
            if plan.extra_cols is not None:
                for c in plan.extra_cols[b, h].T:  # (NQ,) one slot of every query block
                    ok = (qblk >= 0) & (c[qblk.clamp(min=0)] >= 0)
                    m[pos[ok], c[qblk[ok]]] = True
            mask[b, h] = m
        mask[b] &= (pos[None, :] <= pos[:, None]) & (pos[None, :] >= ks) & (pos[:, None] >= ks)
    return mask


def run_triton(q, k, v, plan, scaling, config=SMALL) -> torch.Tensor:
    return block_sparse_prefill_triton(q, k, v, plan, scaling, config=config)


def check_case(q, k, v, plan, scaling, config=SMALL) -> None:
    """Triton vs the fp32 reference, within the low-precision baseline; padding queries exact zeros."""
    L = q.shape[2]
    out = run_triton(q, k, v, plan, scaling, config)
    ref = block_sparse_prefill_ref(q.float(), k.float(), v.float(), plan, scaling)
    lowp = masked_attention_lowp(q, k, v, plan_mask(plan, L), scaling) if q.dtype != torch.float32 else None
    check_close(out, ref, lowp, ulps=ULPS)
    for b, s in enumerate(plan.key_start.tolist()):
        assert (out[b, :s] == 0).all()


# ---------------------------------------------------------------------------------------------
# reference: the statement of the semantics
@pytest.mark.parametrize("Hp_is_kv", [False, True])
def test_reference_matches_explicit_mask(Hp_is_kv):
    gen = torch.Generator().manual_seed(1)
    B, H, KV, L, D = 3, 4, 2, 97, 16
    q, k, v = make_qkv(gen, B, H, KV, L, D, torch.float32)
    plan = random_plan(gen, L, KV if Hp_is_kv else H, [0, 9, 60], 16, 32, 0.4, n_extra=5)
    plan.validate(H, KV, L)
    ref = block_sparse_prefill_ref(q, k, v, plan, 0.3)
    alt = masked_attention_lowp(q, k, v, plan_mask(plan, L), 0.3)
    torch.testing.assert_close(ref, alt, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Triton vs reference: awkward shapes
CASES = [
    # B, H, KV, Hp is KV, L, D, block_q, block_k, key_start, n_extra, dtype
    (1, 2, 2, False, 1, 16, 16, 16, [0], 0, torch.float32),
    (2, 4, 4, True, 17, 32, 16, 16, [0, 3], 2, torch.float32),
    (2, 4, 2, False, 97, 16, 32, 16, [0, 13], 4, torch.bfloat16),
    (3, 8, 2, True, 130, 32, 16, 32, [0, 40, 129], 3, torch.float16),
    (1, 8, 1, True, 257, 16, 64, 32, [0], 6, torch.bfloat16),
    (2, 8, 1, False, 130, 64, 16, 64, [5, 70], 0, torch.float32),
    (2, 6, 3, True, 97, 32, 32, 32, [2, 0], 5, torch.float16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}H{c[1]}KV{c[2]}{'kv' if c[3] else 'h'}L{c[4]}D{c[5]}"
                         f"q{c[6]}k{c[7]}x{c[9]}{str(c[10])[6:]}")
def test_triton_matches_reference(case):
    B, H, KV, per_kv, L, D, bq, bk, ks, n_extra, dtype = case
    gen = torch.Generator().manual_seed(L * 7 + D + H)
    q, k, v = make_qkv(gen, B, H, KV, L, D, dtype)
    plan = random_plan(gen, L, KV if per_kv else H, ks, bq, bk, 0.4, n_extra)
    plan.validate(H, KV, L)
    check_case(q, k, v, plan, D**-0.5)


# CUDA: the kernel's compile-time values (group size, head dim, dtype, block sizes) come from a few
# configurations, so 200 shapes compile a few dozen variants, not hundreds (each takes seconds)
GPU_CONFIGS = ((1, 64, torch.bfloat16, 64, 64), (4, 128, torch.bfloat16, 128, 64), (8, 128, torch.float16, 64, 128),
               (2, 256, torch.bfloat16, 64, 64), (4, 128, torch.float32, 64, 64))


def random_shape(rng: random.Random, gpu: bool) -> dict:
    if gpu:
        g, D, dtype, bq, bk = rng.choice(GPU_CONFIGS)
    else:
        g, D, dtype = rng.choice([1, 2, 4, 8]), rng.choice([16, 32]), rng.choice([torch.bfloat16, torch.float16, torch.float32])
        bq, bk = rng.choice([16, 32]), rng.choice([16, 32])
    KV = rng.choice([1, 2, 4] if gpu else [1, 2])
    L = rng.randint(1, 2048) if gpu else rng.choice([1, 17, 33, 64, 97, 130])
    B = rng.randint(1, 3)
    return dict(
        B=B, H=g * KV, KV=KV, L=L, per_kv=rng.random() < 0.5, D=D, bq=bq, bk=bk,
        ks=[0] + [rng.randrange(L) for _ in range(B - 1)], n_extra=rng.choice([0, 0, 3, 20 if gpu else 4]),
        dtype=dtype, density=rng.choice([0.1, 0.3, 0.6]),
    )


def fuzz(n: int, seed: int, gpu: bool, shard: tuple[int, int] = (0, 1)) -> None:
    """n random shapes (those of `shard` = (index, count): every count-th); every failing case is reported."""
    rng = random.Random(seed)
    failed = []
    for it in range(n):
        s = random_shape(rng, gpu)
        if it % shard[1] != shard[0]:
            continue
        gen = torch.Generator().manual_seed(seed * 1000 + it)
        q, k, v = make_qkv(gen, s["B"], s["H"], s["KV"], s["L"], s["D"], s["dtype"])
        plan = random_plan(gen, s["L"], s["KV"] if s["per_kv"] else s["H"], s["ks"], s["bq"], s["bk"],
                           s["density"], s["n_extra"])
        try:
            check_case(q, k, v, plan, s["D"] ** -0.5, SMALL if not gpu else None)
        except AssertionError as e:
            failed.append(f"case {it}: {s}: {e}")
    assert not failed, f"{len(failed)}/{n} failed:\n" + "\n".join(failed)


def test_fuzz_interpreter_sizes():
    fuzz(20, seed=7, gpu=False)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("shard", range(GPU_FUZZ_SHARDS))
def test_gpu_fuzz(shard):
    fuzz(200, seed=11, gpu=True, shard=(shard, GPU_FUZZ_SHARDS))


# ---------------------------------------------------------------------------------------------
# dense plan, batch invariance, empty plans, dispatch
def causal_mask(key_start: torch.Tensor, L: int) -> torch.Tensor:
    """(B, 1, L, L) causal visibility of real keys."""
    pos = torch.arange(L, device=DEV)
    return ((pos[None, :] <= pos[:, None]) & (pos[None, None, :] >= key_start[:, None, None]))[:, None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Hp_is_kv", [False, True])
def test_dense_plan_equals_dense_attention(dtype, Hp_is_kv):
    """BlockPlan.dense == torch SDPA (fp32, causal + left-padding mask) on real positions, both executors."""
    gen = torch.Generator().manual_seed(3)
    B, H, KV, L, D = 3, 4, 2, 130, 32
    q, k, v = make_qkv(gen, B, H, KV, L, D, dtype)
    ks = torch.tensor([0, 17, 100], device=DEV)
    plan = BlockPlan.dense(B, KV if Hp_is_kv else H, L, ks, 32, 16)
    plan.validate(H, KV, L)
    assert torch.allclose(plan.kept_fraction(L).cpu(), torch.ones(B, plan.indptr.shape[1], dtype=torch.float64))
    mask = causal_mask(ks, L)
    sdpa32 = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=mask, scale=D**-0.5, enable_gqa=True).transpose(1, 2)
    lowp = masked_attention_lowp(q, k, v, mask.expand(B, KV, L, L), D**-0.5) if dtype != torch.float32 else None
    for out in (block_sparse_prefill_ref(q, k, v, plan, D**-0.5), run_triton(q, k, v, plan, D**-0.5)):
        for b, s in enumerate(ks.tolist()):  # SDPA's padding rows are undefined (no visible key)
            assert (out[b, :s] == 0).all()
            check_close(out[b, s:], sdpa32[b, s:], lowp[b, s:] if lowp is not None else None, ulps=ULPS)


@pytest.mark.parametrize("Hp_is_kv", [False, True])
def test_batch_invariance(Hp_is_kv):
    """A prompt alone and left-padded in a batch, with its own block lists: the same output."""
    gen = torch.Generator().manual_seed(5)
    H, KV, L0, D, pad = 4, 2, 75, 16, 38
    Hp = KV if Hp_is_kv else H
    alone = random_plan(gen, L0, Hp, [0], 16, 32, 0.4, n_extra=3)
    q0, k0, v0 = make_qkv(gen, 1, H, KV, L0, D, torch.bfloat16)
    batch = random_plan(gen, L0 + pad, Hp, [0, pad, 11], 16, 32, 0.4, n_extra=3)
    # Row 1 takes the prompt (after `pad` padding tokens) and its plan: lists unchanged, extra columns shifted.
    NQ = batch.n_qblocks
    ptr = batch.indptr.clone()
    ptr[1] = alone.indptr[0, :, -1:].expand(Hp, NQ + 1)  # padded query blocks: empty
    ptr[1, :, : alone.n_qblocks + 1] = alone.indptr[0]
    nnz = max(batch.indices.shape[-1], alone.indices.shape[-1])
    idx = torch.nn.functional.pad(batch.indices, (0, nnz - batch.indices.shape[-1]))
    idx[1] = 0
    idx[1, :, : alone.indices.shape[-1]] = alone.indices[0]
    extra = batch.extra_cols.clone()
    extra[1] = -1
    extra[1, :, : alone.n_qblocks] = torch.where(alone.extra_cols[0] >= 0, alone.extra_cols[0] + pad, -1)
    plan = dataclasses.replace(batch, indptr=ptr, indices=idx, extra_cols=extra)
    plan.validate(H, KV, L0 + pad)
    q, k, v = make_qkv(gen, 3, H, KV, L0 + pad, D, torch.bfloat16)
    for t, t0 in ((q, q0), (k, k0), (v, v0)):
        t[1, :, pad:] = t0[0]
    torch.testing.assert_close(plan.kept_fraction(L0 + pad)[1], alone.kept_fraction(L0)[0], atol=0, rtol=0)
    for run in (run_triton, block_sparse_prefill_ref):
        solo, batched = run(q0, k0, v0, alone, D**-0.5), run(q, k, v, plan, D**-0.5)
        assert torch.equal(batched[1, pad:], solo[0]), run.__name__
        assert (batched[1, :pad] == 0).all()


def test_empty_plan_gives_zeros():
    gen = torch.Generator().manual_seed(2)
    B, H, KV, L, D = 2, 4, 2, 40, 16
    q, k, v = make_qkv(gen, B, H, KV, L, D, torch.float16)
    ks = torch.tensor([0, 8], device=DEV)
    NQ = cdiv(L, 16)
    plan = BlockPlan(16, 16, ks, torch.zeros(B, KV, NQ + 1, dtype=torch.int32, device=DEV),
                     torch.zeros(B, KV, 0, dtype=torch.int32, device=DEV))
    plan.validate(H, KV, L)
    assert (plan.kept_fraction(L) == 0).all()
    for out in (run_triton(q, k, v, plan, 0.25), block_sparse_prefill_ref(q, k, v, plan, 0.25)):
        assert out.dtype == q.dtype and (out == 0).all()


def test_kept_fraction_counts_the_mask():
    gen = torch.Generator().manual_seed(4)
    L = 130
    plan = random_plan(gen, L, 3, [0, 21, 90], 32, 16, 0.3, n_extra=6)
    m = plan_mask(plan, L)
    n = (L - plan.key_start).double()
    expect = m.sum((-1, -2)).double() / (n * (n + 1) / 2)[:, None]
    torch.testing.assert_close(plan.kept_fraction(L), expect, atol=1e-12, rtol=0)
    assert (plan.kept_fraction(L) < 1).all()


def test_dispatch_backends_agree():
    gen = torch.Generator().manual_seed(6)
    B, H, KV, L, D = 1, 4, 2, 50, 16
    q, k, v = make_qkv(gen, B, H, KV, L, D, torch.float32)
    plan = random_plan(gen, L, KV, [0], 16, 16, 0.5, n_extra=2)
    ref = dispatch.block_sparse_prefill(q, k, v, plan, 0.25, backend="reference")
    tri = dispatch.block_sparse_prefill(q, k, v, plan, 0.25, backend="triton")
    torch.testing.assert_close(tri, ref, atol=1e-4, rtol=0)
    auto = dispatch.block_sparse_prefill(q, k, v, plan, 0.25)  # reference on the CPU, Triton on CUDA
    torch.testing.assert_close(auto, ref, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# validate(): clear errors
def good_plan() -> BlockPlan:
    return random_plan(torch.Generator().manual_seed(8), 70, 2, [0, 6], 16, 16, 0.5, n_extra=3, p_empty=0.0)


def with_index(plan: BlockPlan, pos: int, value: int) -> BlockPlan:
    idx = plan.indices.clone()
    idx[0, 0, pos] = value
    return dataclasses.replace(plan, indices=idx)


BAD_PLANS = {
    "int64 key_start": (lambda p: dataclasses.replace(p, key_start=p.key_start.int()), "key_start must be"),
    "int64 indptr": (lambda p: dataclasses.replace(p, indptr=p.indptr.long()), "indptr must be a 3-d int32"),
    "NQ": (lambda p: dataclasses.replace(p, indptr=p.indptr[..., :-1]), "NQ + 1 = 6"),
    "Hp": (lambda p: dataclasses.replace(p, indptr=p.indptr[:, :1], indices=p.indices[:, :1]), "Hp in"),
    "decreasing indptr": (lambda p: dataclasses.replace(p, indptr=p.indptr.flip(-1).contiguous()), "non-decreasing"),
    "index range": (lambda p: with_index(p, int(p.indptr[0, 0, -1]) - 1, 5), "out of range"),
    "unsorted": (lambda p: with_index(p, int(p.indptr[0, 0, 4]) - 1, 0), "sorted ascending and unique"),
    "extra range": (lambda p: dataclasses.replace(p, extra_cols=torch.full_like(p.extra_cols, 70)), "extra_cols must be -1"),
    "extra padding key": (lambda p: dataclasses.replace(p, extra_cols=torch.where(p.extra_cols >= 0, 2, -1)),
                          "extra_cols must be -1"),
    "extra repeats": (lambda p: dataclasses.replace(p, extra_cols=torch.full_like(p.extra_cols, 6)), "repeat"),
    "extra shape": (lambda p: dataclasses.replace(p, extra_cols=p.extra_cols[:, :, :2]), "extra_cols must be a"),
}


@pytest.mark.parametrize("name", list(BAD_PLANS))
def test_validate_errors(name):
    plan = good_plan()
    plan.validate(4, 2, 70)
    make, msg = BAD_PLANS[name]
    with pytest.raises(ValueError, match=re.escape(msg)):
        make(plan).validate(4, 2, 70)


@pytest.mark.parametrize("size", [8, 24, 0])
def test_block_size_must_be_pow2(size):
    plan = good_plan()
    with pytest.raises(ValueError, match="power of two >= 16"):
        dataclasses.replace(plan, block_k=size)
