"""XAttention: antidiagonal block scores against a brute force of the definition, the threshold
rule, monotonicity, batch invariance, full threshold = dense attention, and the registry, eval and
CLI paths (small blocks: block 16, stride 4)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tca_attention import registry
from tca_attention.methods import xattention as X
from tca_attention.methods.xattention import XAttention, block_mass, select_blocks
from method_checks import assert_alone_equals_batched, assert_full_density_equals_dense

BS, S = 16, 4


def padded(xs: list[torch.Tensor], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad per-prompt tensors (C, L_r, D) with random junk -> (B, C, L, D), key_start (B,)."""
    L = max(x.shape[1] for x in xs)
    out = torch.randn(len(xs), xs[0].shape[0], L, xs[0].shape[2], generator=gen, dtype=xs[0].dtype) * 3
    for r, x in enumerate(xs):
        out[r, :, L - x.shape[1]:] = x
    return out, torch.tensor([L - x.shape[1] for x in xs])


def prompts(lengths, H, KV, D, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    qs = [torch.randn(H, n, D, generator=gen, dtype=torch.float64) * scale for n in lengths]
    ks = [torch.randn(KV, n, D, generator=gen, dtype=torch.float64) * scale for n in lengths]
    q, key_start = padded(qs, gen)
    k, _ = padded(ks, gen)
    return qs, ks, q, k, key_start


# -- brute force of the paper's definition ------------------------------------------------------
def brute_mass(q, k, key_start, scaling, stride, block):
    """Block mass (B, H, NQ, NQ), loops over every reduced cell and antidiagonal entry."""
    B, H, L, D = q.shape
    g = H // k.shape[1]
    nq = -(-L // block)
    out = torch.zeros(B, H, nq, nq, dtype=torch.float64)
    for b in range(B):
        s0 = int(key_start[b])
        n = L - s0
        R = -(-n // stride)
        for h in range(H):
            qh, kh = q[b, h, s0:].double(), k[b, h // g, s0:].double()
            for m in range(R):
                logits = []
                for c in range(m + 1):  # reduced keys, causal in reduced positions
                    tot = 0.0
                    for i in range(stride):  # the antidiagonal of the stride x stride cell
                        t, u = stride * m + i, stride * c + stride - 1 - i
                        if t < n and u < n:
                            tot += float(qh[t] @ kh[u])
                    logits.append(tot * scaling / stride)
                p = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0)
                for c in range(m + 1):
                    out[b, h, m * stride // block, c * stride // block] += p[c]
    return out


def brute_select(row: list[float], i: int, threshold: float) -> set[int]:
    """Kept key blocks of query block i given its masses row[0..i]."""
    forced = {0, i}
    if threshold >= 1:
        return set(range(i + 1))
    kept, got, need = set(forced), sum(row[j] for j in forced), threshold * sum(row[: i + 1])
    for j in sorted(set(range(i + 1)) - forced, key=lambda j: (-row[j], j)):
        if got >= need:
            break
        kept.add(j)
        got += row[j]
    return kept


def plan_lists(plan, b: int, h: int) -> list[list[int]]:
    """The listed key blocks of each query block of (row b, head h)."""
    ptr = plan.indptr[b, h].tolist()
    return [plan.indices[b, h, ptr[i]:ptr[i + 1]].tolist() for i in range(len(ptr) - 1)]


CASES = [  # (lengths, H, KV, stride, block)
    ((75, 60, 41), 4, 2, 4, 16),  # GQA, padding, lengths not multiple of the block or the stride
    ((53,), 3, 3, 8, 16),  # MHA, stride 8: two reduced rows per block
    ((70, 34), 2, 1, 16, 16),  # stride = block: one reduced cell per block
]


@pytest.mark.parametrize("lengths,H,KV,stride,block", CASES)
def test_block_mass_matches_brute_force(lengths, H, KV, stride, block):
    D = 8
    _, _, q, k, key_start = prompts(lengths, H, KV, D, seed=len(lengths) + stride, scale=2.0)
    got = block_mass(q, k, key_start, D**-0.5, stride, block)
    want = brute_mass(q, k, key_start, D**-0.5, stride, block)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # each real reduced query row is a distribution: a block row sums to its real reduced rows
    rows = got.sum(-1)
    for b, n in enumerate(lengths):
        real = [len(range(0, n, stride)[i * block // stride:(i + 1) * block // stride]) for i in range(rows.shape[-1])]
        torch.testing.assert_close(rows[b], torch.tensor(real, dtype=rows.dtype).expand_as(rows[b]))


@pytest.mark.parametrize("lengths,H,KV,stride,block", CASES)
@pytest.mark.parametrize("threshold", [0.3, 0.8, 1.0])
def test_plan_is_the_threshold_rule_on_the_brute_force_mass(lengths, H, KV, stride, block, threshold, monkeypatch):
    D = 8
    _, _, q, k, key_start = prompts(lengths, H, KV, D, seed=7 * stride, scale=2.0)
    L = q.shape[2]
    mass = brute_mass(q, k, key_start, D**-0.5, stride, block)
    method = XAttention(threshold=threshold, stride=stride, block_size=block)
    plan = method.plan(0, q, k, key_start, D**-0.5)
    plan.validate(H, KV, L)
    assert plan.indptr.shape[1] == H  # a list per query head
    monkeypatch.setattr(X, "_SCORE_ELEMENTS", 1)  # one query block per chunk: same plan
    chunked = method.plan(0, q, k, key_start, D**-0.5)
    assert torch.equal(chunked.indptr, plan.indptr) and torch.equal(chunked.indices, plan.indices)
    for b, n in enumerate(lengths):
        nq = -(-n // block)
        for h in range(H):
            lists = plan_lists(plan, b, h)
            assert all(not x for x in lists[nq:])  # past the row's real blocks: nothing
            for i in range(nq):
                assert set(lists[i]) == brute_select(mass[b, h, i].tolist(), i, threshold), (b, h, i)


def test_threshold_rule_properties():
    """Always-kept blocks, the threshold reached, and no smaller set of candidates reaching it."""
    gen = torch.Generator().manual_seed(3)
    nb, nk, first = 6, 10, 4
    mass = torch.rand(2, 3, nb, nk, generator=gen) ** 4  # skewed masses
    for threshold in (0.2, 0.5, 0.9, 0.99):
        keep = select_blocks(mass, first, threshold)
        for idx in torch.cartesian_prod(torch.arange(2), torch.arange(3), torch.arange(nb)).tolist():
            b, h, r = idx
            i = first + r
            row, kept = mass[b, h, r, : i + 1].double(), keep[b, h, r]
            assert not kept[i + 1:].any()  # causal
            assert kept[0] and kept[i]  # sink and diagonal
            total = float(row.sum())
            got = float(row[kept[: i + 1]].sum())
            assert got >= threshold * total - 1e-12
            extra = [j for j in range(1, i) if kept[j]]
            if extra:  # minimal: dropping the smallest chosen candidate falls short
                assert got - min(float(row[j]) for j in extra) < threshold * total
                # and every candidate left out weighs no more than every one taken
                left = [float(row[j]) for j in range(1, i) if not kept[j]]
                assert not left or max(left) <= min(float(row[j]) for j in extra)


def test_higher_threshold_keeps_a_superset():
    _, _, q, k, key_start = prompts((150, 120), 4, 2, 8, seed=5, scale=2.0)
    L = q.shape[2]
    previous, fractions = None, []
    for threshold in (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0):
        plan = XAttention(threshold=threshold, stride=S, block_size=BS).plan(0, q, k, key_start, 8**-0.5)
        lists = [[set(x) for x in plan_lists(plan, b, h)] for b in range(2) for h in range(4)]
        if previous is not None:
            assert all(p <= c for pr, cr in zip(previous, lists) for p, c in zip(pr, cr))
        previous = lists
        fractions.append(float(plan.kept_fraction(L).mean()))
    assert fractions[0] < fractions[-2] < fractions[-1] == 1.0  # sparse below, everything at 1.0


def test_plan_alone_equals_plan_in_padded_batch():
    lengths = (150, 97, 40, 30)  # 30 <= 2 blocks: no plan alone, all blocks kept in the batch
    H, KV, D = 4, 2, 8
    qs, ks, q, k, key_start = prompts(lengths, H, KV, D, seed=11, scale=2.0)
    method = XAttention(threshold=0.7, stride=S, block_size=BS)
    batched = method.plan(0, q, k, key_start, D**-0.5)
    sparse = 0
    for r, n in enumerate(lengths):
        nq = -(-n // BS)
        for pad_flag in (False, True):
            alone = method.plan(0, qs[r][None], ks[r][None], torch.zeros(1, dtype=torch.long), D**-0.5,
                                padded=pad_flag)
            for h in range(H):
                got = plan_lists(batched, r, h)[:nq]
                want = [list(range(i + 1)) for i in range(nq)] if alone is None else plan_lists(alone, 0, h)
                assert got == want, (r, h)
            if alone is not None:
                sparse += 1
                torch.testing.assert_close(batched.kept_fraction(q.shape[2])[r], alone.kept_fraction(n)[0])
    assert sparse == 6 and float(batched.kept_fraction(q.shape[2])[:2].mean()) < 1


def test_short_prompts_and_bad_settings():
    q, k = torch.randn(1, 2, 2 * BS, 8), torch.randn(1, 2, 2 * BS, 8)
    assert XAttention(stride=S, block_size=BS).plan(0, q, k, torch.zeros(1, dtype=torch.long), 1.0) is None
    for bad in ({"threshold": 0.0}, {"threshold": 1.5}, {"stride": 3, "block_size": 16}, {"block_size": 24}):
        with pytest.raises(ValueError):
            XAttention(**bad)
    m = XAttention()
    assert (m.threshold, m.stride, m.block_size, m.name) == (0.9, 8, 128, "xattention")
    assert m.decode_keep(0, 3).tolist() == [128] * 3 and m.select_decode(0, None, None) is None


def test_chunks_fit_the_budget_and_cover_every_block():
    for nq, per, budget in ((1024, 32 * 16 * 16, 1 << 27), (7, 1, 1), (50, 3, 100)):
        chunks = X._chunks(nq, per, budget)
        assert chunks[0][0] == 0 and chunks[-1][1] == nq
        assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
        assert all((c1 - c0) * c1 * per <= budget or c1 - c0 == 1 for c0, c1 in chunks)
    # 128K tokens, 32 heads, block 128, stride 8: each chunk's scores stay within the budget
    assert max((c1 - c0) * c1 * 32 * 16 * 16 for c0, c1 in X._chunks(1024, 32 * 16 * 16, X._SCORE_ELEMENTS)) \
        <= X._SCORE_ELEMENTS


def test_plan_runs_on_the_triton_kernel():
    """The plan through dispatch: the Triton kernel (interpreter on the CPU) equals the reference."""
    from kernel_helpers import DEV  # sets up the interpreter without CUDA
    from tca_attention.engine import dispatch

    H, KV, D = 4, 2, 16
    _, _, q, k, key_start = prompts((75, 52), H, KV, D, seed=9, scale=2.0)
    v = torch.randn(k.shape, dtype=torch.float64)
    q, k, v, key_start = (t.to(DEV, torch.float32) if t.is_floating_point() else t.to(DEV) for t in (q, k, v, key_start))
    plan = XAttention(threshold=0.6, stride=S, block_size=BS).plan(0, q, k, key_start, D**-0.5)
    assert float(plan.kept_fraction(q.shape[2]).mean()) < 1
    tri = dispatch.prefill(q, k, v, plan, D**-0.5, backend="triton")
    ref = dispatch.prefill(q, k, v, plan, D**-0.5, backend="reference")
    assert float((tri - ref).abs().max()) <= 1e-4


@pytest.mark.gpu
def test_scoring_memory_is_bounded_at_128k():
    """128K tokens, Llama-3.1-8B's head shape: the plan's extra memory stays within a few GiB."""
    assert torch.cuda.is_available(), "the gpu-marked test needs CUDA"
    L, H, KV, D = 131072, 32, 8, 128
    q = torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, KV, L, D, device="cuda", dtype=torch.bfloat16)
    key_start = torch.zeros(1, dtype=torch.long, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    plan = XAttention(threshold=0.9).plan(0, q, k, key_start, D**-0.5, padded=False)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 3 * 2**30, f"scoring took {extra / 2**30:.2f} GiB"
    plan.validate(H, KV, L)
    assert plan.n_qblocks == L // 128 and plan.indptr.shape[1] == H




@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_full_threshold_equals_dense(arch):
    assert_full_density_equals_dense(arch, XAttention(threshold=1.0, stride=S, block_size=BS), steps_n=12, new_tokens=8)


def test_sparse_model_run_alone_equals_batched():
    assert_alone_equals_batched(XAttention(threshold=0.5, stride=S, block_size=BS))


# -- registry, eval, CLI -----------------------------------------------------------------------
def test_registry_builds_it():
    m = registry.create("xattention:threshold=0.9")
    assert isinstance(m, XAttention) and m == XAttention(threshold=0.9)
    assert registry.normalize("xattention: block_size=16,threshold=0.50, stride=4") == \
        "xattention:threshold=0.5,stride=4,block_size=16"
    assert registry.expand("xattention:threshold=0.5|0.9") == ["xattention:threshold=0.5", "xattention:threshold=0.9"]
    with pytest.raises(ValueError, match="declares no density knob"):
        registry.at_density("xattention", 0.5, 1000)
    assert "xattention" in registry.describe()


def test_eval_sweeps_the_threshold(tmp_path: Path, smol_tokenizer, monkeypatch):
    from tca_attention.eval.methods import ModelBackend
    from tca_attention.eval.runner import EvalConfig, evaluate
    from test_eval_pipeline import tiny_llama

    monkeypatch.setenv("TCA_CACHE_DIR", str(tmp_path / "cache"))
    backend = ModelBackend("tiny-llama", device="cpu", model=tiny_llama(len(smol_tokenizer)), tokenizer=smol_tokenizer)
    sweep = "xattention:threshold=0.3|0.9,stride=4,block_size=16"
    cfg = EvalConfig(model="tiny-llama", methods=("full", sweep), tasks=("niah_single", "perplexity"),
                     lengths=(512,), samples=1)
    results = evaluate(cfg, backend, tmp_path, progress=False)
    by = {(r.method, r.task): r for r in results}
    assert len(results) == 6
    for task in cfg.tasks:
        lo, hi = (by[(f"xattention:threshold={t},stride=4,block_size=16", task)] for t in (0.3, 0.9))
        assert lo.kept_fraction == hi.kept_fraction == 1.0 and lo.kv_bytes == lo.dense_kv_bytes  # cache: all
        a, b = lo.metadata["prefill_kept_fraction"], hi.metadata["prefill_kept_fraction"]
        assert 0 < a < b < 1, (a, b)  # attended fraction of the causal pairs
        assert hi.nll is None or math.isfinite(hi.nll)


def test_cli_generate_runs_it(tmp_path, smol_tokenizer, capsys, monkeypatch):
    from tca_attention.cli import main
    from test_cli import _tiny

    monkeypatch.setenv("TCA_CACHE_DIR", str(tmp_path / "cache"))
    model_dir = _tiny(smol_tokenizer, tmp_path / "tiny", 2048)
    args = ["generate", "--model", str(model_dir), "--question", "The quick brown fox. " * 20,
            "--max-new-tokens", "2", "--json", "--method", "xattention:threshold=0.5,stride=4,block_size=16"]
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in data["runs"]] == ["full", "xattention"]
    assert data["config"] == {"threshold": 0.5, "stride": 4, "block_size": 16, "name": "xattention"}
    run_ = data["runs"][1]
    assert run_["prompt_tokens"] > 2 * 16 and run_["kv_bytes"] == run_["dense_kv_bytes"]
