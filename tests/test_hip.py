"""HiP: the tree search against a brute force of the definition, a planted key block found,
chunking and padding invariance, the exact attended fraction (density knob), k covering every
candidate = dense attention, and the registry (small blocks: block 16)."""
from __future__ import annotations

import math

import pytest
import torch

from tca_attention import registry
from tca_attention.methods import hip as hip_mod
from tca_attention.methods.hip import HiP, attended_pairs, k_for
from method_checks import assert_alone_equals_batched, assert_full_density_equals_dense


def padded(xs: list[torch.Tensor], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad per-prompt tensors (C, L_r, D) with random junk -> (B, C, L, D), key_start (B,)."""
    L = max(x.shape[1] for x in xs)
    out = torch.randn(len(xs), xs[0].shape[0], L, xs[0].shape[2], generator=gen) * 3
    for r, x in enumerate(xs):
        out[r, :, L - x.shape[1]:] = x
    return out, torch.tensor([L - x.shape[1] for x in xs])


def prompts(lengths, H, KV, D, seed):
    gen = torch.Generator().manual_seed(seed)
    qs = [torch.randn(H, n, D, generator=gen) for n in lengths]
    ks = [torch.randn(KV, n, D, generator=gen) for n in lengths]
    q, key_start = padded(qs, gen)
    k, _ = padded(ks, gen)
    return qs, ks, q, k, key_start


def plan_lists(plan, b: int, h: int) -> list[list[int]]:
    ptr = plan.indptr[b, h].tolist()
    return [plan.indices[b, h, ptr[i]:ptr[i + 1]].tolist() for i in range(len(ptr) - 1)]


def brute_lists(q, k, ks: int, m: HiP, h: int, n_blocks: int) -> list[list[int]]:
    """The definition, one query block at a time with Python loops (fp64 scores), for one row."""
    L = q.shape[1]
    g = q.shape[0] // k.shape[0]
    bs, w, kk, R = m.block_size, m.local_blocks, m.k, m.rep_tokens
    qh, kh = q[h].double(), k[h // g].double()
    out = []
    for i in range(n_blocks):
        n = max(0, i - w - 1)
        br = [(1 + t * n // kk, 1 + (t + 1) * n // kk) for t in range(kk)]
        qpos = [p for p in range(ks + i * bs, ks + (i + 1) * bs, m.q_stride) if p < L]

        def score(a, e):
            if e <= a:
                return -math.inf
            lo, hi = a * bs, e * bs
            start = min(max(lo, (lo + hi) // 2 - R // 2), max(lo, hi - R))
            toks = [ks + min(start + r, hi - 1) for r in range(R)]
            return max(float(qh[p] @ kh[t]) for p in qpos for t in toks)

        while any(e - a > 1 for a, e in br):
            kids = []
            for a, e in br:
                mid = (a + e + 1) // 2 if e - a >= 2 else e
                kids += [(a, mid), (mid, e)]
            sc = [score(a, e) for a, e in kids]
            best = sorted(sorted(range(len(kids)), key=lambda c: (-sc[c], c))[:kk])
            br = [kids[c] for c in best]
        found = sorted(a for a, e in br if e > a)
        out.append([0] + found + list(range(max(1, i - w), i + 1)))
    return out


CASES = [  # (lengths, H, KV, k, sliding_window)
    ((300, 237, 150), 4, 2, 3, 32),  # GQA, padding, lengths not multiples of the block
    ((260,), 2, 2, 2, 0),  # no local blocks but the diagonal
    ((200, 131), 2, 1, 5, 16),  # k larger than the candidates of early blocks
]


@pytest.mark.parametrize("lengths,H,KV,k,window", CASES)
def test_plan_is_the_tree_search(lengths, H, KV, k, window, monkeypatch):
    D, bs = 8, 16
    qs, kss, q, kk, key_start = prompts(lengths, H, KV, D, seed=len(lengths) + k)
    L = q.shape[2]
    m = HiP(k=k, block_size=bs, sliding_window=window)
    plan = m.plan(0, q, kk, key_start, D**-0.5)
    plan.validate(H, KV, L)
    assert plan.indptr.shape[1] == H  # a list per query head
    monkeypatch.setattr(hip_mod, "_SCORE_ELEMENTS", 1)  # one query block per chunk: the same plan
    chunked = m.plan(0, q, kk, key_start, D**-0.5)
    assert torch.equal(chunked.indptr, plan.indptr) and torch.equal(chunked.indices, plan.indices)
    for b, n in enumerate(lengths):
        nq = -(-n // bs)
        for h in range(H):
            lists = plan_lists(plan, b, h)
            assert all(not x for x in lists[nq:])  # past the row's real blocks: nothing
            assert lists[:nq] == brute_lists(qs[b], kss[b], 0, m, h, nq), (b, h)
            for i, x in enumerate(lists[:nq]):  # k found blocks (or every candidate), sink, local
                assert len(x) == min(i + 1, 1 + k + m.local_blocks + 1) if i > m.local_blocks else len(x) == i + 1


def test_planted_block_is_found():
    """Attention locality, planted: the keys' alignment with every query peaks at the centre of key
    block 9 and falls off linearly (the rest is small noise). Every query block that has block 9 as a
    candidate finds it through the whole tree, although only branch centres are ever scored."""
    gen = torch.Generator().manual_seed(3)
    H, D, bs, L, target = 2, 16, 16, 512, 9
    u = torch.zeros(D)
    u[0] = 1.0
    q = torch.randn(1, H, L, D, generator=gen) * 0.01 + u * 3
    t = torch.arange(L, dtype=torch.float32)
    bump = (1 - (t - (target * bs + bs / 2)).abs() / 200).clamp(min=0)
    k = torch.randn(1, 1, L, D, generator=gen) * 0.01 + bump[:, None] * u * 3
    m = HiP(k=2, block_size=bs, sliding_window=16)
    plan = m.plan(0, q, k, torch.zeros(1, dtype=torch.long), D**-0.5)
    hits = 0
    for h in range(H):
        for i, x in enumerate(plan_lists(plan, 0, h)):
            if i > target + m.local_blocks + 1:  # block 9 is a candidate, among more than k
                assert target in x, (h, i, x)
                hits += 1
    assert hits == H * (L // bs - target - m.local_blocks - 2)
    assert float(plan.kept_fraction(L).mean()) < 0.3


def test_plan_alone_equals_plan_in_padded_batch():
    lengths = (300, 170, 40)  # 40 tokens: no candidate alone (no plan), all blocks kept in the batch
    H, KV, D = 4, 2, 8
    qs, kss, q, k, key_start = prompts(lengths, H, KV, D, seed=11)
    m = HiP(k=2, block_size=16, sliding_window=16)
    batched = m.plan(0, q, k, key_start, D**-0.5)
    for r, n in enumerate(lengths):
        nq = -(-n // 16)
        for pad_flag in (False, True):
            alone = m.plan(0, qs[r][None], kss[r][None], torch.zeros(1, dtype=torch.long), D**-0.5, padded=pad_flag)
            for h in range(H):
                want = [list(range(i + 1)) for i in range(nq)] if alone is None else plan_lists(alone, 0, h)
                assert plan_lists(batched, r, h)[:nq] == want, (r, h)
            if alone is not None:
                torch.testing.assert_close(batched.kept_fraction(q.shape[2])[r], alone.kept_fraction(n)[0])


def test_attended_fraction_is_exact_and_k_for_matches_it():
    q, k = torch.randn(1, 2, 333, 8), torch.randn(1, 1, 333, 8)
    params = {"block_size": 16, "sliding_window": 32}
    causal = 333 * 334 / 2
    for kk in (1, 3, 7, 30):
        plan = HiP(k=kk, **params).plan(0, q, k, torch.zeros(1, dtype=torch.long), 1.0)
        assert float(plan.kept_fraction(333)[0, 0]) == pytest.approx(attended_pairs(kk, 333, params) / causal, abs=1e-12)
    fracs = [attended_pairs(kk, 333, params) / causal for kk in range(1, 22)]
    assert fracs == sorted(fracs) and fracs[-1] == 1.0
    for target in (0.3, 0.5, 0.8):
        best = k_for(target, 333, params)
        assert abs(fracs[best - 1] - target) == min(abs(f - target) for f in fracs)
    assert registry.at_density("hip:block_size=16,sliding_window=32", 0.5, 333) == \
        f"hip:k={k_for(0.5, 333, params)},block_size=16,sliding_window=32"


def test_short_prompts_and_bad_settings():
    m = HiP(block_size=16, sliding_window=32)  # 2 local blocks: query block 4 has the first candidate (block 1)
    assert m.plan(0, torch.randn(1, 2, 64, 8), torch.randn(1, 1, 64, 8), torch.zeros(1, dtype=torch.long), 1.0) is None
    assert m.plan(0, torch.randn(1, 2, 65, 8), torch.randn(1, 1, 65, 8), torch.zeros(1, dtype=torch.long), 1.0) is not None
    for bad in ({"k": 0}, {"block_size": 24}, {"sliding_window": -1}, {"rep_tokens": 0}, {"q_stride": 0},
                {"block_size": 16, "rep_tokens": 17}):
        with pytest.raises(ValueError):
            HiP(**bad)
    d = HiP()
    assert (d.k, d.block_size, d.sliding_window, d.rep_tokens, d.q_stride) == (8, 64, 256, 2, 2)
    assert d.decode_keep(0, 3).tolist() == [64] * 3 and d.select_decode(0, None, None) is None


def test_plan_runs_on_the_triton_kernel():
    from kernel_helpers import DEV  # sets up the interpreter without CUDA
    from tca_attention.engine import dispatch

    H, KV, D = 4, 2, 16
    _, _, q, k, key_start = prompts((150, 97), H, KV, D, seed=9)
    v = torch.randn(k.shape)
    q, k, v, key_start = (t.to(DEV) for t in (q, k, v, key_start))
    plan = HiP(k=1, block_size=16, sliding_window=16).plan(0, q, k, key_start, D**-0.5)
    assert float(plan.kept_fraction(q.shape[2]).mean()) < 1
    tri = dispatch.prefill(q, k, v, plan, D**-0.5, backend="triton")
    ref = dispatch.prefill(q, k, v, plan, D**-0.5, backend="reference")
    assert float((tri - ref).abs().max()) <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_k_covering_every_candidate_equals_dense(arch):
    assert_full_density_equals_dense(arch, HiP(k=16, block_size=16, sliding_window=16), steps_n=8, new_tokens=6)


def test_sparse_model_run_alone_equals_batched():
    assert_alone_equals_batched(HiP(k=1, block_size=16, sliding_window=16))


def test_registry_builds_it():
    m = registry.create("hip:k=4,block_size=16")
    assert isinstance(m, HiP) and m == HiP(k=4, block_size=16)
    assert registry.normalize("hip: q_stride=1, k=3") == "hip:k=3,q_stride=1"
    assert registry.density_param("hip") == "k"
    assert "hip" in registry.describe()


def test_eval_sweeps_k(tmp_path, smol_tokenizer, monkeypatch):
    from tca_attention.eval.methods import ModelBackend
    from tca_attention.eval.runner import EvalConfig, evaluate
    from test_eval_pipeline import tiny_llama

    monkeypatch.setenv("TCA_CACHE_DIR", str(tmp_path / "cache"))
    backend = ModelBackend("tiny-llama", device="cpu", model=tiny_llama(len(smol_tokenizer)), tokenizer=smol_tokenizer)
    cfg = EvalConfig(model="tiny-llama", methods=("hip:k=1|4,block_size=16,sliding_window=16",), tasks=("niah_single",),
                     lengths=(512,), samples=1)
    by = {r.method: r for r in evaluate(cfg, backend, tmp_path, progress=False)}
    lo, hi = (by[f"hip:k={k},block_size=16,sliding_window=16"] for k in (1, 4))
    assert lo.kept_fraction == hi.kept_fraction == 1.0  # the cache keeps everything
    a, b = lo.metadata["prefill_kept_fraction"], hi.metadata["prefill_kept_fraction"]
    assert 0 < a < b < 1, (a, b)
