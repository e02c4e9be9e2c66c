"""LongHeads: chunk representations against a loop of the definition, the selection rule, a
hand-built prompt whose chosen chunk is known, batch invariance, full density = dense attention,
the density knob and bad settings (small chunks: 16 tokens)."""
from __future__ import annotations

import pytest
import torch

from tca_attention import registry
from tca_attention.methods import base as base_module
from tca_attention.methods import longheads as LH
from tca_attention.methods.longheads import LongHeads, attended_fraction, chunk_representations, chunks_for
from method_checks import assert_alone_equals_batched, assert_full_density_equals_dense
from test_xattention import plan_lists, prompts

CS = 16


def brute_reps(q, k, key_start, scaling, cs):
    """(qbar, rep) (B, H, NC, D) by loops over rows, heads and chunks of real tokens."""
    B, H, L, D = q.shape
    g = H // k.shape[1]
    nc = -(-L // cs)
    qbar = torch.zeros(B, H, nc, D, dtype=torch.float64)
    rep = torch.zeros(B, H, nc, D, dtype=torch.float64)
    for b in range(B):
        s0 = int(key_start[b])
        for h in range(H):
            for c in range(nc):
                a, e = s0 + c * cs, min(L, s0 + (c + 1) * cs)
                if a >= L:
                    continue
                qs, ks = q[b, h, a:e].double(), k[b, h // g, a:e].double()
                u = qs.mean(0)
                p = torch.softmax(ks @ u * scaling, 0)
                qbar[b, h, c], rep[b, h, c] = u, p @ ks
    return qbar, rep


def brute_select(scores_row: list[float], i: int, chunks: int) -> set[int]:
    """Kept key chunks of query chunk i given its scores for chunks 0..i."""
    if i + 1 <= chunks:
        return set(range(i + 1))
    forced = {0, i - 1, i}
    others = sorted(set(range(1, i - 1)), key=lambda j: (-scores_row[j], j))
    return forced | set(others[: chunks - 3])


CASES = [((75, 60, 41), 4, 2), ((90,), 3, 3), ((130, 70), 2, 1)]  # GQA + padding, MHA, one KV head


@pytest.mark.parametrize("lengths,H,KV", CASES)
def test_chunk_representations_match_the_definition(lengths, H, KV):
    D = 8
    _, _, q, k, key_start = prompts(lengths, H, KV, D, seed=len(lengths) + H)
    qbar, rep = chunk_representations(q, k, key_start, D**-0.5, CS)
    want_q, want_rep = brute_reps(q, k, key_start, D**-0.5, CS)
    torch.testing.assert_close(qbar.double(), want_q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rep.double(), want_rep, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lengths,H,KV", CASES)
@pytest.mark.parametrize("chunks", [3, 4, 6])
def test_plan_is_the_selection_rule(lengths, H, KV, chunks, monkeypatch):
    D = 8
    _, _, q, k, key_start = prompts(lengths, H, KV, D, seed=3 * chunks + H, scale=2.0)
    L = q.shape[2]
    plan = LongHeads(chunks=chunks, chunk_size=CS).plan(0, q, k, key_start, D**-0.5)
    plan.validate(H, KV, L)
    monkeypatch.setattr(LH, "_POOL_ELEMENTS", 1)  # one chunk at a time: the same plan
    monkeypatch.setattr(base_module, "_PACK_ELEMENTS", 1)
    pieces = LongHeads(chunks=chunks, chunk_size=CS).plan(0, q, k, key_start, D**-0.5)
    assert torch.equal(pieces.indptr, plan.indptr) and torch.equal(pieces.indices, plan.indices)
    assert plan.indptr.shape[1] == H and plan.block_q == plan.block_k == CS  # a list per query head
    qbar, rep = brute_reps(q, k, key_start, D**-0.5, CS)
    scores = qbar @ rep.transpose(-1, -2)
    for b, n in enumerate(lengths):
        nc = -(-n // CS)
        for h in range(H):
            lists = plan_lists(plan, b, h)
            assert all(not x for x in lists[nc:])  # past the row's real chunks: nothing
            for i in range(nc):
                want = brute_select(scores[b, h, i].tolist(), i, chunks)
                assert lists[i] == sorted(want), (b, h, i)
        # kept fraction of an unpadded prompt: exactly the closed form the density knob solves with
        alone = LongHeads(chunks=chunks, chunk_size=CS).plan(0, q[b:b + 1, :, L - n:], k[b:b + 1, :, L - n:],
                                                              torch.zeros(1, dtype=torch.long), D**-0.5)
        if alone is not None:
            assert float(alone.kept_fraction(n)[0, 0]) == pytest.approx(attended_fraction(n, chunks, CS))


def test_a_query_aligned_with_one_chunk_selects_it():
    """Keys of chunk 5 point along e; the last chunk's queries too: with one free slot every head picks chunk 5."""
    H, KV, D, L = 4, 2, 16, 10 * CS
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, H, L, D, generator=gen) * 0.1
    k = torch.randn(1, KV, L, D, generator=gen) * 0.1
    e = torch.zeros(D)
    e[3] = 1.0
    k[:, :, 5 * CS:6 * CS] += 4 * e
    q[:, :, 9 * CS:] += 4 * e
    plan = LongHeads(chunks=4, chunk_size=CS).plan(0, q, k, torch.zeros(1, dtype=torch.long), D**-0.5, padded=False)
    for h in range(H):
        lists = plan_lists(plan, 0, h)
        assert lists[9] == [0, 5, 8, 9], h  # first, chosen, previous, own
        assert all(len(x) == min(i + 1, 4) for i, x in enumerate(lists))
    k[:, :, 5 * CS:6 * CS] -= 8 * e  # now chunk 5 is the least aligned: never chosen by the last chunk
    plan = LongHeads(chunks=4, chunk_size=CS).plan(0, q, k, torch.zeros(1, dtype=torch.long), D**-0.5, padded=False)
    assert all(5 not in plan_lists(plan, 0, h)[9] for h in range(H))


def test_plan_alone_equals_plan_in_padded_batch():
    lengths = (150, 97, 40)  # 40 tokens: 3 chunks, no plan alone, every causal chunk in the batch
    H, KV, D = 4, 2, 8
    qs, ks, q, k, key_start = prompts(lengths, H, KV, D, seed=11, scale=2.0)
    method = LongHeads(chunks=4, chunk_size=CS)
    batched = method.plan(0, q, k, key_start, D**-0.5)
    for r, n in enumerate(lengths):
        nc = -(-n // CS)
        alone = method.plan(0, qs[r][None], ks[r][None], torch.zeros(1, dtype=torch.long), D**-0.5, padded=False)
        for h in range(H):
            want = [list(range(i + 1)) for i in range(nc)] if alone is None else plan_lists(alone, 0, h)
            assert plan_lists(batched, r, h)[:nc] == want, (r, h)
        if alone is not None:
            torch.testing.assert_close(batched.kept_fraction(q.shape[2])[r], alone.kept_fraction(n)[0])
    assert float(batched.kept_fraction(q.shape[2])[0].mean()) < 1


def test_short_prompts_and_bad_settings():
    q, k = torch.randn(1, 2, 3 * CS, 8), torch.randn(1, 2, 3 * CS, 8)
    assert LongHeads(chunk_size=CS).plan(0, q, k, torch.zeros(1, dtype=torch.long), 1.0) is None  # all forced
    for bad, why in (({"chunks": 2}, "chunks >= 3"), ({"chunk_size": 24}, "power of two"),
                     ({"chunk_size": 8}, "power of two"), ({"chunks": 4.5}, "chunks >= 3")):
        with pytest.raises(ValueError, match=why):
            LongHeads(**bad)
    m = LongHeads()
    assert (m.chunks, m.chunk_size, m.block_size, m.name) == (16, 256, 256, "longheads")
    assert m.decode_keep(0, 3).tolist() == [256] * 3 and m.select_decode(0, None, None) is None
    with pytest.raises(ValueError, match="not a valid int"):
        registry.create("longheads:chunks=many")


def test_density_knob_solves_the_attended_fraction():
    for L, cs in ((4096, 64), (1000, 16), (8192, 256)):
        nc = -(-L // cs)
        fracs = [attended_fraction(L, n, cs) for n in range(3, nc + 2)]
        assert all(a <= b for a, b in zip(fracs, fracs[1:])) and fracs[-1] == 1.0
        for target in (0.1, 0.25, 0.5, 0.9):
            n = chunks_for(target, L, {"chunk_size": cs})
            best = min(abs(f - target) for f in fracs)
            assert abs(attended_fraction(L, n, cs) - target) == pytest.approx(best)
    spec = registry.at_density("longheads:chunk_size=64", 0.25, 4096)
    assert spec == f"longheads:chunks={chunks_for(0.25, 4096, {'chunk_size': 64})},chunk_size=64"
    assert registry.density_param("longheads") == "chunks" and "longheads" in registry.describe()
    assert registry.create(spec) == LongHeads(chunks=chunks_for(0.25, 4096, {"chunk_size": 64}), chunk_size=64)


def test_plan_runs_on_the_triton_kernel():
    from kernel_helpers import DEV  # sets up the interpreter without CUDA
    from tca_attention.engine import dispatch

    H, KV, D = 4, 2, 16
    _, _, q, k, key_start = prompts((90, 70), H, KV, D, seed=9, scale=2.0)
    v = torch.randn(k.shape, dtype=torch.float64)
    q, k, v, key_start = (t.to(DEV, torch.float32) if t.is_floating_point() else t.to(DEV) for t in (q, k, v, key_start))
    plan = LongHeads(chunks=3, chunk_size=CS).plan(0, q, k, key_start, D**-0.5)
    assert float(plan.kept_fraction(q.shape[2]).mean()) < 1
    tri = dispatch.prefill(q, k, v, plan, D**-0.5, backend="triton")
    ref = dispatch.prefill(q, k, v, plan, D**-0.5, backend="reference")
    assert float((tri - ref).abs().max()) <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_full_density_equals_dense(arch):
    assert_full_density_equals_dense(arch, LongHeads(chunks=64, chunk_size=CS), steps_n=12, new_tokens=8)


def test_sparse_model_run_alone_equals_batched():
    assert_alone_equals_batched(LongHeads(chunks=3, chunk_size=CS))
