"""Batch invariance: a prompt keeps the same tokens and decodes the same answer alone and in a
left-padded batch (blocks are counted from each row's first real token; rows compress their
decode tails independently, at the same logical step as alone).

Plans are compared exactly (kept sets shifted by the row's padding); model outputs within a
tolerance derived from float32 and greedy tokens exactly.
"""
from __future__ import annotations

import pytest
import torch

from tca_attention.methods.tca.budgets import Budgets, HeadBudget
from tca_attention.methods.state import ModelIdentity
from tca_attention.ragged_cache import RaggedLayer
from tca_attention.methods.tca.candidates import candidate_ladder
from tca_attention.methods.tca.config import TCAConfig
from tca_attention.integration import enable
from tca_attention.integration.adapter import cache_kwargs
from tca_attention.methods.full_budget import FullBudget
from tca_attention.methods.streaming import StreamingLLM
from tca_attention.methods.tca.method import TCA
from tiny_models import tiny

B_, W_ = 16, 32  # block and window of the small tests
CHOICES = [0, 3, 6, None, 2, 5, 1, 4]  # ladder candidate per head (None = dense), cycled


def mixed_budgets(config: TCAConfig, identity: ModelIdentity) -> Budgets:
    """Budgets whose heads pick different candidates of the ladder (one in eight dense)."""
    ladder = candidate_ladder(config.block_size)
    C = ladder.shape[0]
    layers = []
    for li in range(identity.num_layers):
        heads = []
        for h in range(identity.num_kv_heads):
            c = CHOICES[(3 * li + h) % len(CHOICES)]
            c = C if c is None else min(c, C - 1)
            sc = tuple(0.0 if i < c else 1.0 for i in range(C))  # first candidate reaching tau: c
            heads.append(HeadBudget(sc, sc))
        layers.append(tuple(heads))
    return Budgets(identity, config, tuple(tuple(r) for r in ladder.tolist()), tuple(layers))


def fake_identity(layers: int, kv: int, heads: int, head_dim: int) -> ModelIdentity:
    return ModelIdentity("llama", "fake", layers, heads, kv, head_dim, heads * head_dim, 97, (0.0,) * 8)


# ---------------------------------------------------------------------------------------------
# (a) plans: the reference selection of every method, alone vs in a left-padded batch
def padded_batch(xs: list[torch.Tensor], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad per-prompt tensors (C, L_r, D) with random junk -> (B, C, L, D), key_start (B,)."""
    L = max(x.shape[1] for x in xs)
    out = torch.randn(len(xs), xs[0].shape[0], L, xs[0].shape[2], generator=gen) * 3
    for r, x in enumerate(xs):
        out[r, :, L - x.shape[1]:] = x
    return out, torch.tensor([L - x.shape[1] for x in xs])


def methods(KV: int, H: int, D: int) -> dict[str, object]:
    ident = fake_identity(2, KV, H, D)
    cfg = TCAConfig(block_size=B_, window=W_)
    return {
        "tca": TCA(mixed_budgets(cfg, ident)),
        "tca-alpha-max": TCA(mixed_budgets(cfg.with_(alpha=0.5, mass_norm="max"), ident)),
        "tca-sinks": TCA(mixed_budgets(cfg.with_(sink_tokens=3), ident)),
        "tca-dense-below": TCA(mixed_budgets(cfg, ident), dense_below=260),
        "streaming": StreamingLLM(sinks=4, window=W_, block_size=B_),
        "full-budget": FullBudget(window=W_, block_size=B_),
    }


LENGTHS = [(300, 251, 200), (300, 251, 40), (251, 47, 120), (44, 40, 30)]  # 47, 40, 30: dense alone


@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda x: "-".join(map(str, x)))
@pytest.mark.parametrize("name", list(methods(2, 4, 16)))
def test_plan_alone_equals_plan_in_padded_batch(name, lengths):
    KV, H, D = 2, 4, 16
    gen = torch.Generator().manual_seed(sum(lengths))
    qs = [torch.randn(H, n, D, generator=gen) for n in lengths]
    ks = [torch.randn(KV, n, D, generator=gen) for n in lengths]
    q, key_start = padded_batch(qs, gen)
    k, _ = padded_batch(ks, gen)
    L = q.shape[2]
    for layer in (0, 1):
        method = methods(KV, H, D)[name]
        batched = method.plan(layer, q, k, key_start, D**-0.5, backend="reference", padded=True)
        if max(lengths) <= W_ + B_ or (name == "tca-dense-below" and max(lengths) < 260):
            assert batched is None  # every row is dense alone, so the batch is
            continue
        n_sparse = 0
        for r, n in enumerate(lengths):
            s = int(key_start[r])
            for padded in (False, True):  # alone: no mask, or an all-ones mask
                alone = method.plan(layer, qs[r][None], ks[r][None], torch.zeros(1, dtype=torch.long), D**-0.5,
                                    backend="reference", padded=padded)
                if alone is None:  # dense alone: dense in the batch (everything is local)
                    assert int(batched.local_starts()[r]) == s and int(batched.kept_len[r].max()) == 0
                    continue
                n_sparse += 1
                assert int(batched.local_starts()[r]) - s == int(alone.local_starts()[0])
                for h in range(KV):
                    got = batched.kept_idx[r, h, : int(batched.kept_len[r, h])] - s
                    want = alone.kept_idx[0, h, : int(alone.kept_len[0, h])]
                    assert torch.equal(got, want), (layer, r, h, padded)
                torch.testing.assert_close(batched.kept_fraction(L)[r], alone.kept_fraction(n)[0], rtol=0, atol=1e-12)
                if alone.retained is not None:
                    torch.testing.assert_close(batched.retained[r], alone.retained[0], rtol=1e-5, atol=1e-6)
        assert n_sparse > 0


def jaccard(a: set, b: set) -> float:
    return len(a & b) / max(1, len(a | b))


def test_the_issue_measurement_is_fixed():
    """The issue's measurement, scaled down: 3 prompts, the shorter rows' kept sets overlapped
    their unbatched sets with Jaccard 0.80-0.95 when blocks were laid from the padded start."""
    KV, H, D, b, w = 2, 4, 16, 16, 32
    gen = torch.Generator().manual_seed(11)
    lengths = (300, 250, 205)
    qs = [torch.randn(H, n, D, generator=gen) for n in lengths]
    ks = [torch.randn(KV, n, D, generator=gen) for n in lengths]
    q, key_start = padded_batch(qs, gen)
    k, _ = padded_batch(ks, gen)
    method = TCA(mixed_budgets(TCAConfig(block_size=b, window=w), fake_identity(1, KV, H, D)))
    batched = method.plan(0, q, k, key_start, D**-0.5, backend="reference")
    for r, n in enumerate(lengths):
        alone = method.plan(0, qs[r][None], ks[r][None], torch.zeros(1, dtype=torch.long), D**-0.5, backend="reference")
        s = int(key_start[r])
        for h in range(KV):
            got = set((batched.kept_idx[r, h, : int(batched.kept_len[r, h])] - s).tolist())
            want = set(alone.kept_idx[0, h, : int(alone.kept_len[0, h])].tolist())
            assert jaccard(got, want) == 1.0, (r, h)


# ---------------------------------------------------------------------------------------------
# the cache: per-row tails, independent compression
def test_cache_rows_compress_at_their_own_steps():
    """A batch of 3 left-padded rows through a RaggedLayer (prefill plan + 60 decode steps with
    random queries) holds, per row and head, the same global positions and the same tail as each
    row's own layer alone, at every step."""
    KV, H, D = 2, 4, 16
    gen = torch.Generator().manual_seed(4)
    lengths = (300, 251, 40)
    method = TCA(mixed_budgets(TCAConfig(block_size=B_, window=W_), fake_identity(1, KV, H, D)))
    qs = [torch.randn(H, n, D, generator=gen) for n in lengths]
    ks = [torch.randn(KV, n, D, generator=gen) for n in lengths]
    vs = [torch.randn(KV, n, D, generator=gen) for n in lengths]
    q, key_start = padded_batch(qs, gen)
    k, _ = padded_batch(ks, gen)
    v, _ = padded_batch(vs, gen)
    decode_keep = method.decode_keep(0, KV)
    batched = RaggedLayer(B_, W_, backend="reference")
    batched.update(k, v)
    batched.commit_prefill(method.plan(0, q, k, key_start, 0.25, backend="reference"), key_start, decode_keep)
    alone = []
    for r in range(3):
        lay = RaggedLayer(B_, W_, backend="reference")
        lay.update(ks[r][None], vs[r][None])
        lay.commit_prefill(method.plan(0, qs[r][None], ks[r][None], torch.zeros(1, dtype=torch.long), 0.25,
                                       backend="reference", padded=False), torch.zeros(1, dtype=torch.long), decode_keep)
        alone.append(lay)
    compressions = [0, 0, 0]
    for step in range(60):
        qn, kn, vn = (torch.randn(3, c, 1, D, generator=gen) for c in (H, KV, KV))
        batched.update(kn, vn)
        out_b = batched.attend(qn, 0.25)
        for r, lay in enumerate(alone):
            before = lay.g_pos.numel()
            lay.update(kn[r : r + 1], vn[r : r + 1])
            out_a = lay.attend(qn[r : r + 1], 0.25)
            compressions[r] += lay.g_pos.numel() != before
            torch.testing.assert_close(out_b[r], out_a[0], rtol=1e-5, atol=1e-6)
            s = int(key_start[r])
            for h in range(KV):
                seg_b = batched.g_pos[batched.g_offsets[r * KV + h] : batched.g_offsets[r * KV + h + 1]]
                seg_a = lay.g_pos[lay.g_offsets[h] : lay.g_offsets[h + 1]]
                assert sorted((seg_b - s).tolist()) == sorted(seg_a.tolist()), (step, r, h)
            tail_b = batched.tail_positions()[r]
            assert (tail_b[tail_b >= 0] - s).tolist() == lay.tail_positions()[0].tolist(), (step, r)
        assert batched.t_fill < W_ + B_  # the shared tail drops slots no row uses
    assert min(compressions) >= 3, compressions  # several compressions per row, at different steps
    assert batched.kv_bytes() < batched.dense_bytes()


# ---------------------------------------------------------------------------------------------
# (c) end to end on tiny models: prefill logits and greedy decoding, alone vs batched
def greedy(model, ids: torch.Tensor, mask: torch.Tensor, steps: int, session, prefill_keep: int = 0):
    """Prefill + greedy decode. -> (prefill logits (B, L or prefill_keep, V), step logits (B, steps, V),
    tokens, cache). prefill_keep > 0 keeps only the last prefill logits (real vocabularies are large)."""
    cache = session.new_cache()
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=prefill_keep,
                **cache_kwargs(cache))
    prefill, logits, toks = out.logits, [], []
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(steps):
        toks.append(nxt)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt, attention_mask=mask, position_ids=pos, **cache_kwargs(cache))
        logits.append(out.logits[:, -1])
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    return prefill, torch.stack(logits, 1), torch.cat(toks, 1), cache


def row_global_positions(layer: RaggedLayer, r: int, shift: int) -> list[list[int]]:
    KV = layer.t_keys.shape[1]
    segs = [layer.g_pos[layer.g_offsets[r * KV + h] : layer.g_offsets[r * KV + h + 1]] for h in range(KV)]
    return [sorted((s - shift).tolist()) for s in segs]


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2"])
@pytest.mark.parametrize("lengths", [(300, 251, 200), (300, 251, 45)], ids=["sparse", "one-dense"])
def test_tiny_model_alone_equals_batched(arch, lengths):
    steps = 40
    model = tiny(arch)
    budgets = mixed_budgets(TCAConfig(block_size=B_, window=W_), ModelIdentity.of(model))
    gen = torch.Generator().manual_seed(len(arch) + sum(lengths))
    prompts = [torch.randint(0, 97, (n,), generator=gen) for n in lengths]
    L = max(lengths)
    ids = torch.zeros(3, L, dtype=torch.long)
    mask = torch.zeros(3, L, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, L - len(p):], mask[r, L - len(p):] = p, 1
    with torch.no_grad(), enable(model, TCA(budgets), backend="reference") as session:
        bp, bl, bt, bcache = greedy(model, ids, mask, steps, session)
        for r, p in enumerate(prompts):
            ap, al, at, acache = greedy(model, p[None], torch.ones(1, len(p), dtype=torch.long), steps, session)
            assert torch.equal(bt[r], at[0]), f"row {r}: greedy tokens differ"
            scale = float(ap.abs().max())
            tol = 64 * torch.finfo(torch.float32).eps * scale  # float32 rounding of two computation orders (~1e-7 seen)
            err_prefill = float((bp[r, L - len(p):] - ap[0]).abs().max())
            err_decode = float((bl[r] - al[0]).abs().max())
            assert err_prefill <= tol and err_decode <= tol, (r, err_prefill, err_decode, tol)
            for lb, la in zip(bcache.tca_layers(), acache.tca_layers()):
                assert row_global_positions(lb, r, L - len(p)) == row_global_positions(la, 0, 0), r
    assert all(l.g_pos.numel() > 0 for l in bcache.tca_layers())


def test_tiny_model_alone_equals_batched_on_the_triton_kernels():
    """The same through the Triton kernels (fused selection, prefill, decode; the interpreter
    without CUDA): rows of different block phases compress at different decode steps (5, 8, 12)."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steps, lengths = 13, (200, 155, 36)
    model = tiny("llama", num_hidden_layers=1).to(dev)  # one layer: the interpreter is slow
    budgets = mixed_budgets(TCAConfig(block_size=B_, window=W_), ModelIdentity.of(model))
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 97, (n,), generator=gen).to(dev) for n in lengths]
    L = max(lengths)
    ids = torch.zeros(3, L, dtype=torch.long, device=dev)
    mask = torch.zeros(3, L, dtype=torch.long, device=dev)
    for r, p in enumerate(prompts):
        ids[r, L - len(p):], mask[r, L - len(p):] = p, 1
    with torch.no_grad(), enable(model, TCA(budgets), backend="triton") as session:
        bp, bl, bt, bcache = greedy(model, ids, mask, steps, session)
        for r, p in enumerate(prompts):
            ap, al, at, acache = greedy(model, p[None], torch.ones(1, len(p), dtype=torch.long, device=dev), steps, session)
            assert torch.equal(bt[r], at[0]), f"row {r}: greedy tokens differ"
            tol = 64 * torch.finfo(torch.float32).eps * float(ap.abs().max())
            assert float((bp[r, L - len(p):] - ap[0]).abs().max()) <= tol
            assert float((bl[r] - al[0]).abs().max()) <= tol
            for lb, la in zip(bcache.tca_layers(), acache.tca_layers()):
                assert row_global_positions(lb, r, L - len(p)) == row_global_positions(la, 0, 0), r
            prefill_local_start = (len(p) - W_) // B_ * B_ if len(p) > W_ + B_ else 0
            assert all(la.t_pos0 == prefill_local_start + B_ for la in acache.tca_layers()), "one decode compression"
