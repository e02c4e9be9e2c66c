"""Column mass (engine/column_mass.py): the reference against an explicit L x L mask, the Triton kernel
against the reference on awkward shapes (interpreter sizes; a larger GPU fuzz), dispatch, and
SpAtten's kept sets on both backends of a tiny model."""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import pytest
import torch
from kernel_helpers import CUDA, DEV, GPU_FUZZ_SHARDS, make_qkv  # noqa: I001 - first: the interpreter

from tca_attention.engine import dispatch
from tca_attention.engine.column_mass import column_mass_ref
from tca_attention.engine.column_mass import kept_keys
from tca_attention.engine.plan import TokenPlan, pack_mask
from tca_attention.engine.triton_column_mass import ColumnMassConfig, column_mass_triton, key_tile_spans, weighted_queries
from tca_attention.integration import enable
from tca_attention.methods.spatten import SpAtten
from test_triton_kernels import plan_mask, random_plan
from tiny_models import tiny

# Small tiles under the interpreter: more query/key tiles, more edges.
SMALL = ColumnMassConfig(block_m=16, block_n=16, num_warps=4, num_stages=1) if not CUDA else None


def dense_mask(ks: torch.Tensor, L: int) -> torch.Tensor:
    """(B, 1, L, L) causal visibility over the real keys."""
    j = torch.arange(L, device=ks.device)
    return ((j[None, :] <= j[:, None])[None] & (j >= ks[:, None])[:, None, :])[:, None]


def explicit_mass(q, k, scaling, weight, mask) -> torch.Tensor:
    """The definition in float64 with an explicit mask (B, KV or 1, L, L) -> (B, KV, L)."""
    B, H, L, _ = q.shape
    KV = k.shape[1]
    g = H // KV
    s = torch.einsum("bhjd,bhsd->bhjs", q.double(), k.double().repeat_interleave(g, 1)) * scaling
    m = mask.expand(B, KV, L, L).repeat_interleave(g, 1)
    p = torch.softmax(s.masked_fill(~m, float("-inf")), -1).nan_to_num(0.0)
    return (p * weight.double()[:, None, :, None]).sum(2).view(B, KV, g, L).sum(2)


def random_case(gen: torch.Generator, B, H, KV, L, D, dtype, ks, planned, per_row=False, head_window=False):
    q, k, _ = make_qkv(gen, B, H, KV, L, D, dtype)
    weight = torch.rand(B, L, generator=gen).to(DEV) * (torch.rand(B, L, generator=gen) < 0.7).to(DEV)
    window, block = 8, 4
    plan = random_plan(gen, B, KV, L, window, block, 0.4, ks, per_row=per_row) if planned else None
    if plan is not None and head_window:
        plan = dataclasses.replace(plan, head_window=torch.randint(window, 3 * window, (B, KV), generator=gen).to(DEV))
    return q, k, torch.tensor(ks, device=DEV), weight, plan


CASES = [  # B, H, KV, L, D, dtype, key_start, planned, per_row, head_window
    (2, 6, 2, 53, 16, torch.float32, [0, 7], False, False, False),
    (3, 4, 4, 37, 32, torch.float32, [0, 5, 36], True, True, False),  # g = 1, a row of one real token
    (2, 12, 2, 70, 16, torch.bfloat16, [3, 0], True, False, False),  # g = 6 (padded to 8)
    (2, 6, 2, 45, 16, torch.bfloat16, [0, 9], True, True, True),  # per-head windows
    (1, 3, 1, 1, 16, torch.float32, [0], False, False, False),  # L = 1
    (2, 6, 3, 29, 16, torch.float32, [29, 2], False, False, False),  # a row of padding only
]


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_the_definition(case):
    gen = torch.Generator().manual_seed(len(case) + case[3])
    B, H, KV, L, D, dtype, ks, planned, per_row, hw = case
    q, k, kst, w, plan = random_case(gen, B, H, KV, L, D, dtype, ks, planned, per_row, hw)
    mask = plan_mask(plan, L) if plan is not None else dense_mask(kst, L)
    want = explicit_mass(q.float(), k.float(), 0.3, w, mask)
    torch.testing.assert_close(column_mass_ref(q, k, 0.3, kst, w, plan).double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference(case):
    gen = torch.Generator().manual_seed(case[3])
    B, H, KV, L, D, dtype, ks, planned, per_row, hw = case
    q, k, kst, w, plan = random_case(gen, B, H, KV, L, D, dtype, ks, planned, per_row, hw)
    got = column_mass_triton(q, k, 0.3, kst, w, plan, config=SMALL)
    want = column_mass_ref(q, k, 0.3, kst, w, plan)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert float(got.sum()) == pytest.approx(float((w * (torch.arange(L, device=DEV) >= kst[:, None])).sum()) * H,
                                             rel=1e-4)  # each counted query hands out H units (one per head)


@pytest.mark.parametrize("planned", [False, True])
def test_kernel_with_few_weighted_queries(planned):
    """Whole tiles of zero-weight queries (skipped by the kernel), a row with none at all."""
    gen = torch.Generator().manual_seed(11)
    q, k, kst, _, plan = random_case(gen, 3, 6, 2, 61, 16, torch.float32, [0, 4, 0], planned, True)
    w = torch.zeros(3, 61, device=DEV)
    w[0, [5, 6, 40, 60]] = torch.tensor([1.0, 0.5, 2.0, 1.0], device=DEV)
    w[2, 2] = 1.0
    got = column_mass_triton(q, k, 0.3, kst, w, plan, config=SMALL)
    torch.testing.assert_close(got, column_mass_ref(q, k, 0.3, kst, w, plan), atol=1e-5, rtol=1e-5)
    assert float(got[1].abs().sum()) == 0 and float(got[2].sum()) == pytest.approx(6.0)


def test_kernel_skips_the_key_tiles_a_plan_keeps_nothing_of():
    """A plan keeping 3 far keys: most key tiles are seen by their band's queries only (pass 2 walks
    just those; pass 1 skips the blocks before each tile's band)."""
    gen = torch.Generator().manual_seed(4)
    B, H, KV, L, D = 2, 4, 2, 97, 16
    q, k, _ = make_qkv(gen, B, H, KV, L, D, torch.float32)
    kst = torch.tensor([0, 6], device=DEV)
    keep = torch.zeros(B, KV, L, dtype=torch.bool, device=DEV)
    keep[:, :, [7, 40]] = True
    keep[1, 1, 70] = True
    idx, lens = pack_mask(keep)
    plan = TokenPlan(idx, lens, 80, 9, 4, kst, torch.ones(KV, dtype=torch.long, device=DEV),
                     row_local_start=torch.tensor([80, 82], device=DEV))
    w = torch.ones(B, L, device=DEV)
    qpos, nq = weighted_queries(w)
    spans = key_tile_spans(qpos, nq, KV, 16, plan, kept_keys(plan, L)).view(B, KV, -1, 2)
    assert spans[0, 0, 1].tolist() == [16, 16 + 15 + 9] and spans[0, 0, 0, 1] == L  # tile 0 keeps key 7
    assert spans[1, 1, 4, 1] == L and spans[1, 0, 4, 1] < L  # key 70: only (row 1, KV head 1) keeps it
    got = column_mass_triton(q, k, 0.3, kst, w, plan, config=SMALL)
    torch.testing.assert_close(got, column_mass_ref(q, k, 0.3, kst, w, plan), atol=1e-5, rtol=1e-5)


def test_dispatch_and_plan_kinds():
    gen = torch.Generator().manual_seed(3)
    q, k, kst, w, plan = random_case(gen, 2, 4, 2, 40, 16, torch.float32, [0, 3], True)
    dense = column_mass_ref(q, k, 0.3, kst, w)
    assert torch.equal(column_mass_ref(q, k, 0.3, kst, w, dataclasses.replace(plan, attend_all=True)), dense)
    assert torch.equal(dispatch.column_mass(q, k, 0.3, kst, w, plan, backend="reference"),
                       column_mass_ref(q, k, 0.3, kst, w, plan))
    torch.testing.assert_close(dispatch.column_mass(q, k, 0.3, kst, w, plan, backend="triton"),
                               column_mass_ref(q, k, 0.3, kst, w, plan), atol=1e-4, rtol=1e-4)
    with pytest.raises(NotImplementedError, match="compensation"):
        column_mass_ref(q, k, 0.3, kst, w, dataclasses.replace(plan, compensate=torch.ones(2, dtype=torch.bool)))


def spatten_log(model, ids, mask, backend: str) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """(layer, kept set, cumulative score) after every planned layer of one prefill."""
    log: list = []

    @dataclass(frozen=True)
    class Logged(SpAtten):
        def plan(self, layer_idx, *args, **kw):
            out = super().plan(layer_idx, *args, **kw)
            log.append((layer_idx, self._state["kept"].clone(), self._state["score"].clone()))
            return out

    with torch.no_grad(), enable(model, Logged(keep=0.2, window=16, block_size=16), backend=backend) as session:
        session.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=0)
    return log


def test_spatten_kept_sets_equal_on_both_backends():
    model = tiny("llama", num_hidden_layers=4).float().to(DEV)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 97, (2, 150), generator=gen).to(DEV)
    mask = torch.ones_like(ids)
    mask[1, :23] = 0  # a left-padded row
    ref = spatten_log(model, ids, mask, "reference")
    tri = spatten_log(model, ids, mask, "triton")
    assert len(ref) == len(tri) == 4
    for (la, ka, sa), (lb, kb, sb) in zip(ref, tri):
        assert la == lb and torch.equal(ka, kb), la
        torch.testing.assert_close(sa, sb, atol=1e-3, rtol=1e-4)
    assert int(ref[-1][1][0].sum()) < int(ref[1][1][0].sum())  # it did prune


# -- fuzz: GPU sizes with the default tiles, or interpreter sizes -------------------------------------
def fuzz(n: int, seed: int, shard: tuple[int, int] = (0, 1), gpu: bool = True) -> None:
    rnd = random.Random(seed)
    failed = []
    for it in range(n):
        g, KV = rnd.choice([1, 2, 4, 7, 8]), rnd.choice([1, 2, 4])
        long = rnd.randint(300, 5000) if gpu else rnd.randint(40, 90)
        B, L, D = rnd.randint(1, 3), rnd.choice([rnd.randint(1, 300 if gpu else 40), long]), rnd.choice([64, 128])
        dtype = rnd.choice([torch.bfloat16, torch.float16, torch.float32] if gpu else [torch.bfloat16, torch.float32])
        ks = [rnd.choice([0, 0, rnd.randint(0, L - 1)]) for _ in range(B)]
        planned, per_row, hw = rnd.random() < 0.7, rnd.random() < 0.5, rnd.random() < 0.3
        if it % shard[1] != shard[0]:
            continue
        gen = torch.Generator().manual_seed(seed * 1000 + it)
        q, k, kst, w, plan = random_case(gen, B, g * KV, KV, L, D, dtype, ks, planned, per_row, hw)
        if plan is not None:  # windows of real methods on the GPU
            plan = dataclasses.replace(plan, window=rnd.choice([8, 64, 512] if gpu else [1, 8, 20]))
        got = column_mass_triton(q, k, D**-0.5, kst, w, plan, config=None if gpu else SMALL)
        want = column_mass_ref(q, k, D**-0.5, kst, w, plan)
        try:  # fp32 inputs: tf32 dots; low precision: exact products, fp32 sums in another order
            tol = 2e-2 if dtype == torch.float32 else 2e-3
            torch.testing.assert_close(got, want, atol=tol, rtol=tol)
        except AssertionError as e:
            failed.append(f"case {it}: B={B} g={g} KV={KV} L={L} D={D} {dtype} ks={ks} plan={planned}: {e}")
    assert not failed, "\n".join(failed)


def test_column_mass_fuzz_interpreter_sizes():
    fuzz(10, seed=5, gpu=False)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("shard", range(GPU_FUZZ_SHARDS))
def test_gpu_column_mass_fuzz(shard):
    fuzz(80, seed=17, shard=(shard, GPU_FUZZ_SHARDS))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_column_mass_long():
    gen = torch.Generator().manual_seed(2)
    B, KV, g, L, D = 1, 8, 4, 16384 + 77, 128
    q, k, kst, w, plan = random_case(gen, B, g * KV, KV, L, D, torch.bfloat16, [0], True, True)
    plan = dataclasses.replace(plan, window=1024)
    torch.testing.assert_close(column_mass_triton(q, k, D**-0.5, kst, w, plan),
                               column_mass_ref(q, k, D**-0.5, kst, w, plan), atol=2e-3, rtol=2e-3)
