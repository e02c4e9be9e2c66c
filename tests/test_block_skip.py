"""In-loop block skipping (BLASST) in the block-sparse executor: off equals today's kernel exactly,
the reference equals a brute force of the rule, the Triton kernel (interpreter on the CPU) equals
the reference on awkward shapes (dropped pairs counted identically), hand-built blocks that must be
kept or dropped, padding invariance, kept_fraction and validation."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from kernel_helpers import DEV, check_close, make_qkv
from test_block_sparse import SMALL, random_plan, run_triton

from tca_attention.engine.block_reference import block_sparse_prefill_ref
from tca_attention.engine.plan import BlockPlan
from tca_attention.engine.triton_block import BlockConfig

LOG2E = 1.4426950408889634


def brute_dropped(q, k, plan: BlockPlan) -> torch.Tensor:
    """(B, H, L, L) keys each query row drops, by walking its listed blocks in order (loops; fp64)."""
    B, H, L, _ = q.shape
    Hp = plan.indptr.shape[1]
    hg, per_kv = H // Hp, Hp // k.shape[1]
    out = torch.zeros(B, H, L, L, dtype=torch.bool)
    for b in range(B):
        ks, lam = int(plan.key_start[b]), float(plan.skip_threshold[b])
        if lam == 0:
            continue
        for hp in range(Hp):
            ptr = plan.indptr[b, hp].tolist()
            for h in range(hp * hg, (hp + 1) * hg):
                logits = (q[b, h].double() @ k[b, hp // per_kv].double().T) * plan_scaling
                for t in range(ks, L):
                    i = (t - ks) // plan.block_q
                    if i >= len(ptr) - 1:
                        continue
                    run = -math.inf
                    for j in plan.indices[b, hp, ptr[i]:ptr[i + 1]].tolist():
                        lo = ks + j * plan.block_k
                        hi = min(L, lo + plan.block_k, t + 1)
                        if hi <= lo:
                            continue
                        m = float(logits[t, lo:hi].max())
                        if m < run + math.log(lam):
                            out[b, h, t, lo:hi] = True
                        run = max(run, m)
    return out


plan_scaling = 0.25


def masked_attention(q, k, v, mask):
    """fp64 attention with an explicit (B, H, L, L) mask -> (B, L, H, D); empty rows -> 0."""
    g = q.shape[1] // k.shape[1]
    logits = (q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2)) * plan_scaling
    p = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1).nan_to_num()
    return (p @ v.double().repeat_interleave(g, 1)).transpose(1, 2)


def visible(plan: BlockPlan, H: int, L: int) -> torch.Tensor:
    """(B, H, L, L) the plan's visibility without skipping (listed blocks, extra columns, causal)."""
    from test_block_sparse import plan_mask

    m = plan_mask(moved(plan, DEV), L).cpu()
    return m.repeat_interleave(H // m.shape[1], 1)


def moved(plan: BlockPlan, device) -> BlockPlan:
    return dataclasses.replace(plan, **{f.name: getattr(plan, f.name).to(device) for f in dataclasses.fields(plan)
                                        if isinstance(getattr(plan, f.name), torch.Tensor)})


def test_reference_is_the_rule():
    """The reference drops exactly the keys of a brute-force walk of the rule and attends to the rest
    (CPU: the reference and the brute force)."""
    gen = torch.Generator().manual_seed(1)
    B, H, KV, L, D = 2, 4, 2, 75, 16
    q, k, v = (t.cpu() for t in make_qkv(gen, B, H, KV, L, D, torch.float32))
    q = q * 3  # peaked attention: some blocks far below the running max
    for Hp in (H, KV):
        plan = moved(random_plan(gen, L, Hp, [0, 9], 16, 16, 0.6, n_extra=3), "cpu")
        plan = plan.with_skip(torch.tensor([0.05, 0.2]), H)
        plan.validate(H, KV, L)
        got = block_sparse_prefill_ref(q, k, v, plan, plan_scaling)
        drop = brute_dropped(q, k, plan)
        assert drop.any()
        mask = visible(plan, H, L)
        extra_only = mask & ~visible(dataclasses.replace(plan, extra_cols=None), H, L)
        want = masked_attention(q, k, v, (mask & ~drop) | extra_only)  # extra columns are never dropped
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
        assert plan.skip_dropped.tolist() == (drop & mask & ~extra_only).sum((-1, -2)).tolist()


def test_off_is_todays_kernel_exactly():
    """No skip fields: the unchanged path. lambda = 0: the skip path drops nothing and, on the same
    tiles (block_n = block_k), gives bit-identical outputs; the reference is bit-identical too."""
    gen = torch.Generator().manual_seed(2)
    B, H, KV, L, D = 2, 4, 2, 97, 32
    q, k, v = make_qkv(gen, B, H, KV, L, D, torch.bfloat16)
    cfg = BlockConfig(32, 32, 4, 1)
    for Hp in (H, KV):
        plan = random_plan(gen, L, Hp, [0, 13], 16, 32, 0.5, n_extra=3)
        zero = plan.with_skip(0.0, H)
        assert torch.equal(run_triton(q, k, v, zero, D**-0.5, cfg), run_triton(q, k, v, plan, D**-0.5, cfg))
        assert int(zero.skip_dropped.sum()) == 0
        assert torch.equal(block_sparse_prefill_ref(q, k, v, zero, D**-0.5), block_sparse_prefill_ref(q, k, v, plan, D**-0.5))
        torch.testing.assert_close(zero.kept_fraction(L), plan.kept_fraction(L), atol=0, rtol=0)


CASES = [  # B, H, KV, Hp is KV, L, D, block_q, block_k, key_start, n_extra, dtype, lambdas
    (2, 4, 2, False, 97, 64, 16, 32, [0, 13], 2, torch.float32, [0.01, 0.1]),
    (2, 8, 2, True, 130, 64, 32, 16, [0, 40], 0, torch.bfloat16, [0.05, 0.0]),
    (1, 4, 1, True, 75, 128, 16, 16, [0], 3, torch.float16, [0.2]),
    (3, 6, 3, False, 50, 128, 16, 32, [5, 0, 49], 0, torch.bfloat16, [0.3, 0.02, 0.1]),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"H{c[1]}KV{c[2]}{'kv' if c[3] else 'h'}L{c[4]}D{c[5]}"
                         f"q{c[6]}k{c[7]}{str(c[10])[6:]}")
def test_triton_matches_reference(case):
    B, H, KV, per_kv, L, D, bq, bk, ks, n_extra, dtype, lams = case
    gen = torch.Generator().manual_seed(L + D)
    q, k, v = make_qkv(gen, B, H, KV, L, D, dtype)
    q = q * 2
    plan = random_plan(gen, L, KV if per_kv else H, ks, bq, bk, 0.6, n_extra).with_skip(torch.tensor(lams), H)
    plan.validate(H, KV, L)
    ref = block_sparse_prefill_ref(q.float(), k.float(), v.float(), plan, D**-0.5)
    dropped = plan.skip_dropped.clone()
    out = run_triton(q, k, v, plan, D**-0.5, SMALL)
    assert int(dropped.sum()) > 0, "the case should drop something"
    assert torch.equal(plan.skip_dropped, dropped)  # the same decisions, counted the same
    # the same math without skipping, in low precision, is the tolerance baseline
    lowp = None
    if dtype != torch.float32:
        lowp = run_triton(q, k, v, dataclasses.replace(plan, skip_threshold=None, skip_dropped=None), D**-0.5, SMALL)
        base = block_sparse_prefill_ref(q.float(), k.float(), v.float(),
                                        dataclasses.replace(plan, skip_threshold=None, skip_dropped=None), D**-0.5)
        lowp = (lowp.float() - base.float() + ref.float()).to(dtype)  # its error, around the skipping reference
    check_close(out, ref, lowp, ulps=1)
    for b, s in enumerate(ks):
        assert (out[b, :s] == 0).all()


def test_hand_built_blocks():
    """Keys of block 0 align with every query (huge logits), block 2 opposes them: block 2 is dropped by
    every later query at any lambda > tiny; block 1 (neutral, within ln(lambda) of the max) is kept."""
    B, H, KV, L, D, bs = 1, 2, 1, 64, 16, 16
    u = torch.zeros(D)
    u[0] = 1.0
    q = u.expand(B, H, L, D).clone() * 4
    k = torch.zeros(B, KV, L, D)
    k[..., :bs, :] = u * 4  # logits 16 x 0.25 = 4
    k[..., 2 * bs:3 * bs, :] = -u * 4  # logits -4
    v = torch.randn(B, KV, L, D, generator=torch.Generator().manual_seed(0))
    plan = BlockPlan.dense(B, KV, L, torch.zeros(B, dtype=torch.long, device=DEV), bs, bs).with_skip(0.01, H)  # ln 0.01 = -4.6
    for run in (block_sparse_prefill_ref, run_triton):
        out = run(q.to(DEV), k.to(DEV), v.to(DEV), plan, plan_scaling)
        # block 1 (logit 0 >= 4 - 4.6) kept, block 2 (logit -4 < -0.6) dropped by queries past it,
        # block 3 (the diagonal of the last queries, logit 0) kept
        mask = torch.ones(L, L).tril().bool()
        mask[2 * bs:, 2 * bs:3 * bs] = False
        want = masked_attention(q, k, v, mask.expand(B, H, L, L))
        torch.testing.assert_close(out.double().cpu(), want, atol=1e-5, rtol=1e-5)
        # queries of blocks 2 and 3 drop the visible keys of block 2: 16 * 17 / 2 + 16 * 16 each head
        assert plan.skip_dropped.tolist() == [[16 * 17 // 2 + 16 * 16] * H]
    frac = plan.kept_fraction(L).cpu()
    assert frac.shape == (B, KV)
    torch.testing.assert_close(frac, torch.full((B, KV), 1 - (16 * 17 // 2 + 256) / (L * (L + 1) / 2), dtype=torch.float64))


def test_padding_does_not_change_decisions():
    """A prompt alone and left-padded in a batch (same lambda): the same outputs and dropped pairs."""
    gen = torch.Generator().manual_seed(5)
    H, KV, L0, D, pad = 4, 2, 70, 16, 19
    q0, k0, v0 = make_qkv(gen, 1, H, KV, L0, D, torch.float32)
    q0 = q0 * 3
    q, k, v = make_qkv(gen, 2, H, KV, L0 + pad, D, torch.float32)
    for t, t0 in ((q, q0), (k, k0), (v, v0)):
        t[1, :, pad:] = t0[0]
    alone = BlockPlan.dense(1, KV, L0, torch.zeros(1, dtype=torch.long, device=DEV), 16, 16).with_skip(0.1, H)
    batch = BlockPlan.dense(2, KV, L0 + pad, torch.tensor([0, pad], device=DEV), 16, 16).with_skip(0.1, H)
    for run in (block_sparse_prefill_ref, run_triton):
        solo, both = run(q0, k0, v0, alone, D**-0.5), run(q, k, v, batch, D**-0.5)
        # the same pairs, summed in another order on a GPU (the row's tiles start elsewhere): 1e-5
        torch.testing.assert_close(both[1, pad:], solo[0], atol=1e-5, rtol=0)
        assert batch.skip_dropped[1].tolist() == alone.skip_dropped[0].tolist() and int(alone.skip_dropped.sum()) > 0


def test_skip_fields_are_validated():
    plan = BlockPlan.dense(2, 2, 40, torch.tensor([0, 3]), 16, 16)
    with pytest.raises(ValueError, match="go together"):
        dataclasses.replace(plan, skip_threshold=torch.zeros(2))
    good = plan.with_skip(0.1, 4)
    good.validate(4, 2, 40)
    bad = {
        "negative": dataclasses.replace(good, skip_threshold=torch.tensor([0.1, -1.0])),
        "nan": dataclasses.replace(good, skip_threshold=torch.tensor([0.1, float("nan")])),
        "shape": dataclasses.replace(good, skip_threshold=torch.zeros(3)),
        "dtype": dataclasses.replace(good, skip_threshold=torch.zeros(2, dtype=torch.float64)),
        "counter": dataclasses.replace(good, skip_dropped=torch.zeros(2, 2, dtype=torch.int64)),
    }
    for name, p in bad.items():
        with pytest.raises(ValueError, match="skip_"):
            p.validate(4, 2, 40)


@pytest.mark.gpu
def test_gpu_realistic_shapes():
    """Compiled kernel, Llama-like heads (GQA 4:1, dim 128, blocks 128 and 64). fp32 (exact fp32 dots):
    the reference's dropped pairs exactly, outputs within 1e-4. bf16 (tensor-core dots in another order
    than the reference: a decision at the boundary may flip): dropped pairs within 1%, outputs within
    the plain kernel's error or 0.02."""
    from kernel_helpers import CUDA

    assert CUDA, "the gpu-marked test needs CUDA"
    gen = torch.Generator().manual_seed(12)
    for dtype in (torch.float32, torch.bfloat16):
        for L, bk, lam in ((1500, 128, 0.05), (2048, 64, 0.01)):
            B, H, KV, D = 2, 8, 2, 128
            q, k, v = make_qkv(gen, B, H, KV, L, D, dtype)
            q = q * 2
            ks = torch.tensor([0, 333], device=DEV)
            plan = BlockPlan.dense(B, KV, L, ks, bk, bk).with_skip(torch.tensor([lam, lam / 3], device=DEV), H)
            ref = block_sparse_prefill_ref(q.float(), k.float(), v.float(), plan, D**-0.5)
            dropped = plan.skip_dropped.clone()
            out = run_triton(q, k, v, plan, D**-0.5, None)
            assert int(dropped.sum()) > 0
            if dtype == torch.float32:
                assert torch.equal(plan.skip_dropped, dropped)
                check_close(out, ref, None)
            else:
                assert float((plan.skip_dropped - dropped).abs().sum()) <= 0.01 * float(dropped.sum())
                assert float((out.float() - ref).abs().max()) <= 0.02
