"""head-split: DuoAttention's retrieval/streaming head split with training-free retrieval scores.

The score itself on hand-built q/k, calibration end to end (tiny model), the state's JSON and
identity checks, the two limits (all retrieval heads = dense, no retrieval head = StreamingLLM),
the density knob against what the cache holds, batch invariance, and the registry.
"""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

from tca_attention import registry
from tca_attention.integration import enable
from tca_attention.integration.probe import ModelProbe
from tca_attention.methods import head_split as hs
from tca_attention.methods.head_kinds import kinds_decode_keep, kinds_plan
from tca_attention.methods.head_split import Calibration, HeadScores, HeadSplit, far_mass, retrieval_hits
from tca_attention.methods.state import ModelIdentity, StateError
from tca_attention.methods.streaming import StreamingLLM
from test_batch_invariance import greedy, padded_batch, row_global_positions
from tiny_models import tiny

SINKS, W, B = 4, 32, 16  # small geometry of the tests


class CharTok:
    """A character tokenizer inside the tiny models' 97-token vocabulary."""

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        return {"input_ids": [ord(c) % 97 for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(int(i) + 97 * (int(i) < 32)) for i in ids)


def fake_scores(model_or_ident, seed: int = 0) -> HeadScores:
    """Distinct scores for every KV head of every full-attention layer."""
    ident = model_or_ident if isinstance(model_or_ident, ModelIdentity) else ModelIdentity.of(model_or_ident)
    gen = torch.Generator().manual_seed(seed)
    vals = torch.randperm(ident.num_layers * ident.num_kv_heads, generator=gen).double()
    vals = (vals + 1) / (len(vals) + 1)
    rows = tuple(tuple(vals[i * ident.num_kv_heads:(i + 1) * ident.num_kv_heads].tolist()) for i in range(ident.num_layers))
    return HeadScores(ident, rows)


# -- the retrieval score --------------------------------------------------------------------------
def test_retrieval_hits_on_hand_built_heads():
    """One-hot keys: each query head's argmax is where its query points. Head 0 copies every
    needle token, head 1 points one token off, head 2 copies the first 3 of 5 steps, head 3
    points at the same token outside the needle; the 6th answer token is not in the needle."""
    L, H, KV = 40, 4, 2
    ids = list(range(40, 80))  # distinct tokens
    needle, answer = (10, 15), (30, 36)
    ids[30:35] = ids[10:15]
    ids[35] = 90  # not in the needle: not a copy step
    ids[5] = ids[12]  # a copy of one needle token in the haystack
    k = torch.eye(L)[None].expand(KV, L, L).clone()  # (KV, L, D=L): key p is e_p
    q = torch.zeros(H, L, L)
    for i, t in enumerate(range(30, 35)):  # step t is predicted by query t - 1
        p = 10 + i  # the needle position holding ids[t]
        q[0, t - 1, p] = 10
        q[1, t - 1, p + 1 if p + 1 < 15 else p - 1] = 10
        q[2, t - 1, p if i < 3 else 0] = 10
        q[3, t - 1, 5] = 10
    assert retrieval_hits(q, k, 1.0, ids, needle, answer).tolist() == [1.0, 0.0, 0.6, 0.0]
    with pytest.raises(ValueError, match="nothing to score"):
        retrieval_hits(q, k, 1.0, ids, needle, (35, 36))


def test_far_mass_is_what_a_streaming_head_would_drop():
    """One-hot keys, logits of 100: head 0 looks far back, head 1 at its sinks, head 2 inside its
    window, head 3 nowhere (uniform: the share of keys beyond sinks + window)."""
    L, H, sinks, window = 60, 4, 4, 8
    k = torch.eye(L)[None].expand(2, L, L).clone()
    q = torch.zeros(H, L, L)
    for j in range(L):
        q[0, j, max(sinks, j - window - 3) if j >= sinks + window else 0] = 100
        q[1, j, 1] = 100
        q[2, j, j] = 100
    far = far_mass(q, k, 1.0, sinks, window, n_queries=1000)
    j = torch.arange(sinks + window, L, dtype=torch.float64)
    torch.testing.assert_close(far, torch.stack([torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64),
                                                 torch.tensor(0.0, dtype=torch.float64), ((j + 1 - sinks - window) / (j + 1)).mean()]),
                               rtol=0, atol=1e-6)  # float32 attention
    assert far_mass(q[:, :12], k[:, :12], 1.0, sinks, window).tolist() == [0.0] * 4  # no key beyond the window


class CopyProbe:
    """A probe that replays the calibration's own prompts with hand-built q/k (layer 0): query head
    0 copies every needle token, head 4 (second KV head) copies in every other prompt only."""

    def __init__(self, model, prompts):
        self.model, self.prompts, self.calls = model, prompts, 0

    def observe(self, input_ids, observer):
        p = self.prompts[self.calls]
        assert input_ids[0].tolist() == p.ids, "calibration prompts are deterministic"
        L = len(p.ids)
        k = torch.eye(L)[None, None].expand(1, 2, L, L)
        q = torch.zeros(1, 6, L, L)
        for i, t in enumerate(range(*p.answer)):
            q[0, 0, t - 1, p.needle[0] + i] = 10
            if self.calls % 2 == 0:
                q[0, 4, t - 1, p.needle[0] + i] = 10
        observer(0, q, k, k, 1.0)
        observer(1, torch.zeros(1, 6, L, L), k, k, 1.0)  # argmax: key 0, never in the needle
        self.calls += 1


def test_calibration_averages_prompts_and_takes_the_max_over_a_kv_heads_query_heads():
    model = tiny("llama")  # 6 query heads, 2 KV heads: group of 3
    tok, cal = CharTok(), Calibration(length=400, samples=1)
    hay = hs._ids(tok, hs.essay_text())
    rng = random.Random(cal.seed)
    prompts = [hs.needle_prompt(tok, hay, 400, d, rng) for d in cal.depths]
    for p in prompts:
        n0, n1 = p.needle
        assert len(p.ids) == 400 and p.ids[n0:n1] == p.ids[p.answer[0]:p.answer[1]] and n1 < p.answer[0]
    scores = hs.calibrate_head_scores(CopyProbe(model, prompts), tok, cal, progress=False)
    assert scores.layers[0] == (1.0, 3 / 5) and scores.layers[1] == (0.0, 0.0)
    # layer 1's queries are all zero: uniform attention, the same far mass for both heads
    assert scores.far[1][0] == scores.far[1][1] and 0 < scores.far[1][0] < 0.5
    assert scores.ranked()[:2] == [(0, 0, 1.0), (0, 1, 0.6)]
    assert scores.retrieval_heads(0.25) == ((True, False), (False, False))
    assert scores.calibration["prompts"] == 5 and scores.calibration["length"] == 400


def test_calibration_on_a_tiny_model_end_to_end_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("TCA_CACHE_DIR", str(tmp_path))
    model = tiny("gemma3")  # sliding layers are left alone
    cal = Calibration(length=400, depths=(0.2, 0.8))
    calls = []
    real = hs.calibrate_head_scores
    monkeypatch.setattr(hs, "calibrate_head_scores", lambda *a, **k: calls.append(1) or real(*a, **k))
    scores = hs.load_or_calibrate(ModelProbe(model), CharTok(), "tiny", cal, announce=False)
    ident = ModelIdentity.of(model)
    assert scores.model == ident and len(scores.layers) == ident.num_layers
    assert [row is None for row in scores.layers] == [True, False, True]
    assert all(len(row) == ident.num_kv_heads and all(0 <= s <= 1 for s in row) for row in scores.layers if row)
    assert scores.calibration["prompts"] == 2
    saved = list((tmp_path / "head_scores").glob("*.json"))
    assert len(saved) == 1 and calls == [1]
    again = hs.load_or_calibrate(ModelProbe(model), CharTok(), "tiny", cal, announce=False)
    assert again == scores and calls == [1]
    # another model under the same key gets its own file (the identity is part of the key)
    hs.load_or_calibrate(ModelProbe(tiny("llama")), CharTok(), "tiny", cal, announce=False)
    assert len(list((tmp_path / "head_scores").glob("*.json"))) == 2 and calls == [1, 1]


# -- the state ------------------------------------------------------------------------------------
def test_state_round_trips_and_refuses_other_models_and_versions(tmp_path):
    model, other = tiny("llama"), tiny("qwen2")
    scores = HeadScores(fake_scores(model).model, fake_scores(model).layers, calibration={"source": "test"})
    path = scores.save(tmp_path / "s.json")
    assert HeadScores.load(path, model=model) == scores
    assert HeadScores.from_json(json.loads(json.dumps(scores.to_json()))) == scores
    with pytest.raises(StateError, match="do not fit this model"):
        HeadScores.load(path, model=other)
    with pytest.raises(StateError, match="do not fit this model"):
        HeadSplit(scores).check_model(other)
    with pytest.raises(StateError, match="do not fit this model"):
        enable(other, HeadSplit(scores))
    assert scores.to_json()["far"] is None
    # equal retrieval scores are ordered by far mass; it round-trips
    tied = HeadScores(scores.model, ((0.5, 0.5), (0.0, 0.5)), ((0.1, 0.3), (0.9, 0.2)))
    assert tied.retrieval_heads(0.5) == ((False, True), (False, True))
    assert tied.retrieval_heads(0.75) == ((True, True), (False, True))
    assert HeadScores.load(tied.save(tmp_path / "t.json")) == tied
    data = tied.to_json()
    with pytest.raises(StateError, match=r"far\[1\] and layers\[1\] must both be null"):
        HeadScores.from_json({**data, "far": [[0.1, 0.3], None]})
    data = scores.to_json()
    for broken, why in (({**data, "version": 2}, "version 2 is not supported"),
                        ({**data, "format": "tca-attention/budgets"}, "not a tca-attention/head-scores file"),
                        ({**data, "layers": data["layers"][:1]}, "layers must be a list of 2"),
                        ({**data, "layers": [[0.5, 1.5], None]}, r"layers\[0\] must be null or 2 scores"),
                        ({**data, "model": {**data["model"], "num_layers": "2"}}, "must be a positive integer")):
        with pytest.raises(StateError, match=why):
            HeadScores.from_json(broken)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(StateError, match="corrupt"):
        HeadScores.load(tmp_path / "bad.json")


# -- the two limits --------------------------------------------------------------------------------
def left_padded(lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 97, (n,), generator=gen) for n in lengths]
    L = max(lengths)
    ids = torch.zeros(len(lengths), L, dtype=torch.long)
    mask = torch.zeros(len(lengths), L, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, L - len(p):], mask[r, L - len(p):] = p, 1
    return prompts, ids, mask


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_all_retrieval_heads_equal_dense(arch):
    """retrieval_fraction=1: a left-padded batch prefills and decodes greedily as plain attention."""
    model = tiny(arch).double()  # float64: token-for-token equality without near ties
    _, ids, mask = left_padded((200, 151, 40), seed=5)
    method = HeadSplit(fake_scores(model), retrieval_fraction=1.0, sinks=SINKS, window=W, block_size=B)
    with torch.no_grad():
        with enable(model, None) as dense:
            dp, dl, dt, _ = greedy(model, ids, mask, 30, dense)
        with enable(model, method, backend="reference") as split:
            sp, sl, st, cache = greedy(model, ids, mask, 30, split)
    assert torch.equal(st, dt)
    valid = mask.bool()
    assert torch.equal(sp[valid], dp[valid])  # every layer plans nothing: SDPA itself
    # decode runs over the ragged cache, whose reference attends in float32
    assert float((sl - dl).abs().max()) <= 64 * torch.finfo(torch.float32).eps * float(dl.abs().max())
    assert all(l.g_pos.numel() == 0 and l.t_fill == ids.shape[1] + 30 for l in cache.tca_layers())  # all kept


def test_no_retrieval_head_equals_streaming_llm():
    """retrieval_fraction=0: the same prefill outputs, decode outputs and cache as StreamingLLM."""
    model = tiny("llama")
    _, ids, mask = left_padded((300, 251, 45), seed=6)
    split = HeadSplit(fake_scores(model), retrieval_fraction=0.0, sinks=SINKS, window=W, block_size=B)
    stream = StreamingLLM(sinks=SINKS, window=W, block_size=B)
    runs = []
    with torch.no_grad():
        for method in (split, stream):
            with enable(model, method, backend="reference") as session:
                runs.append(greedy(model, ids, mask, 40, session))
    (sp, sl, st, sc), (rp, rl, rt, rc) = runs
    assert torch.equal(sp, rp) and torch.equal(sl, rl) and torch.equal(st, rt)
    for a, b in zip(sc.tca_layers(), rc.tca_layers()):
        assert a.g_pos.numel() > 0  # decode evicted blocks
        for name in ("g_keys", "g_values", "g_pos", "g_offsets", "t_first"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert a.t_fill == b.t_fill and a.t_pos0 == b.t_pos0
        assert torch.equal(a.t_keys[:, :, :a.t_fill], b.t_keys[:, :, :b.t_fill])


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_mixed_layer_heads_are_dense_or_streaming(backend):
    """One layer, two kinds, a left-padded batch: each dense head's prefill output is full causal
    attention, each streaming head's is StreamingLLM's (the engine's executors, both backends)."""
    from tca_attention.engine import dispatch

    KV, H, D, lengths = 2, 4, 16, (200, 150)
    gen = torch.Generator().manual_seed(2)
    q, key_start = padded_batch([torch.randn(H, n, D, generator=gen) for n in lengths], gen)
    k, _ = padded_batch([torch.randn(KV, n, D, generator=gen) for n in lengths], gen)
    v, _ = padded_batch([torch.randn(KV, n, D, generator=gen) for n in lengths], gen)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    q, k, v, key_start = q.to(dev), k.to(dev), v.to(dev), key_start.to(dev)
    plan = kinds_plan(("dense", "streaming"), k, key_start, sinks=SINKS, window=W, block_size=B)
    out = dispatch.prefill(q, k, v, plan, D**-0.5, backend=backend)  # (B, L, H, D)
    stream_plan = StreamingLLM(sinks=SINKS, window=W, block_size=B).plan(0, q, k, key_start, D**-0.5)
    stream = dispatch.prefill(q, k, v, stream_plan, D**-0.5, backend=backend)
    for r, n in enumerate(lengths):
        s = int(key_start[r])
        kk, vv = (x[r, :, s:].repeat_interleave(H // KV, 0) for x in (k, v))  # (H, n, D)
        full = torch.nn.functional.scaled_dot_product_attention(q[r, :, s:], kk, vv, is_causal=True, scale=D**-0.5)
        torch.testing.assert_close(out[r, s:, :2], full[:2].transpose(0, 1), rtol=1e-4, atol=1e-5)  # KV head 0
        torch.testing.assert_close(out[r, s:, 2:], stream[r, s:, 2:], rtol=1e-4, atol=1e-5)  # KV head 1
        assert not torch.allclose(out[r, s:, 2:], full[2:].transpose(0, 1), atol=1e-3)  # it does drop keys


# -- kept fraction and the density knob --------------------------------------------------------------
def kept_per_head(layer) -> torch.Tensor:
    """(B, KV) tokens a ragged layer holds per row and KV head."""
    B, KV = layer.t_keys.shape[:2]
    glob = (layer.g_offsets[1:] - layer.g_offsets[:-1]).view(B, KV)
    return glob + (layer.tail_positions() >= 0).sum(-1, keepdim=True)


@pytest.mark.parametrize("target", [0.3, 0.55, 0.8])
def test_kept_fraction_in_the_cache_matches_the_density_solve(target):
    model = tiny("llama", num_attention_heads=8, num_key_value_heads=8, num_hidden_layers=3)  # 24 KV heads
    L, N = 300, 24
    params = {"sinks": SINKS, "window": W, "block_size": B}
    rf = hs.retrieval_fraction_for(target, L, params)
    assert 0 < rf < 1
    method = HeadSplit(fake_scores(model), retrieval_fraction=rf, **params)
    assert method.report() == {"retrieval_heads": math.floor(rf * N + 0.5), "kv_heads": N}
    ids = torch.randint(0, 97, (1, L))
    with torch.no_grad(), enable(model, method, backend="reference") as session:
        cache = session.new_cache()
        model(input_ids=ids, **session.cache_kwargs(cache))
        reported = session.prefill_report()["kept_fraction"]
    kept = torch.cat([kept_per_head(l) for l in cache.tca_layers()], -1).double().mean() / L
    s = StreamingLLM(**params).kept_tokens(L) / L  # what a streaming head keeps
    assert abs(float(kept) - target) <= (1 - s) / (2 * N) + 1e-12  # one head's rounding at most
    assert abs(reported - float(kept)) < 1e-12
    streaming = [[k == "streaming" for k in method.kinds(i)] for i in range(3)]
    for layer, kinds in zip(cache.tca_layers(), streaming):
        held = kept_per_head(layer)[0]
        assert all((int(n) == StreamingLLM(**params).kept_tokens(L)) == st for n, st in zip(held, kinds))
        assert all(int(n) == L for n, st in zip(held, kinds) if not st)


def test_density_solve_limits():
    params = {"sinks": SINKS, "window": W, "block_size": B}
    s = StreamingLLM(**params).kept_tokens(300) / 300
    assert hs.retrieval_fraction_for(1.0, 300, params) == 1.0
    assert hs.retrieval_fraction_for(s / 2, 300, params) == 0.0  # below what streaming heads keep
    assert hs.retrieval_fraction_for(0.5, 40, params) == 0.0  # a prompt every head keeps whole
    f = 0.6
    rf = hs.retrieval_fraction_for(f, 300, params)
    assert abs(rf + (1 - rf) * s - f) < 1e-4


# -- batch invariance --------------------------------------------------------------------------------
@pytest.mark.parametrize("lengths", [(300, 251, 200), (251, 47, 120)], ids=["sparse", "one-dense"])
def test_plan_alone_equals_plan_in_padded_batch(lengths):
    KV, H, D = 4, 8, 16
    kinds = ("dense", "streaming", "streaming", "dense")
    gen = torch.Generator().manual_seed(sum(lengths))
    ks = [torch.randn(KV, n, D, generator=gen) for n in lengths]
    k, key_start = padded_batch(ks, gen)
    batched = kinds_plan(kinds, k, key_start, sinks=SINKS, window=W, block_size=B)
    assert torch.equal(batched.decode_keep, kinds_decode_keep(kinds, B)) and batched.decode_keep.tolist() == [B, 0, 0, B]
    for r, n in enumerate(lengths):
        s = int(key_start[r])
        for padded in (False, True):
            alone = kinds_plan(kinds, ks[r][None], torch.zeros(1, dtype=torch.long), sinks=SINKS, window=W,
                               block_size=B, padded=padded)
            if alone is None:  # dense alone: everything local in the batch too
                assert int(batched.local_starts()[r]) == s and int(batched.kept_len[r].max()) == 0
                continue
            ls = int(alone.local_starts()[0])
            assert int(batched.local_starts()[r]) - s == ls
            if not padded:
                assert alone.kept_total == int(alone.kept_len.sum())
            for h in range(KV):
                got = batched.kept_idx[r, h, : int(batched.kept_len[r, h])] - s
                want = alone.kept_idx[0, h, : int(alone.kept_len[0, h])]
                assert torch.equal(got, want), (r, h, padded)
                expect = torch.arange(ls) if kinds[h] == "dense" else torch.arange(min(SINKS, ls))
                assert torch.equal(want, expect), (r, h)


def test_tiny_model_alone_equals_batched():
    model = tiny("qwen2")
    method = HeadSplit(fake_scores(model), retrieval_fraction=0.5, sinks=SINKS, window=W, block_size=B)
    prompts, ids, mask = left_padded((300, 251, 45), seed=7)
    L = ids.shape[1]
    with torch.no_grad(), enable(model, method, backend="reference") as session:
        bp, bl, bt, bcache = greedy(model, ids, mask, 30, session)
        for r, p in enumerate(prompts):
            ap, al, at, acache = greedy(model, p[None], torch.ones(1, len(p), dtype=torch.long), 30, session)
            assert torch.equal(bt[r], at[0]), r
            tol = 64 * torch.finfo(torch.float32).eps * float(ap.abs().max())
            assert float((bp[r, L - len(p):] - ap[0]).abs().max()) <= tol
            assert float((bl[r] - al[0]).abs().max()) <= tol
            for lb, la in zip(bcache.tca_layers(), acache.tca_layers()):
                assert row_global_positions(lb, r, L - len(p)) == row_global_positions(la, 0, 0), r


# -- the registry --------------------------------------------------------------------------------------
def test_registry_create_and_at_density(tmp_path, monkeypatch):
    monkeypatch.setenv("TCA_CACHE_DIR", str(tmp_path))
    model = tiny("llama", max_position_embeddings=400)  # calibrates on 400-token prompts
    scores = fake_scores(model)
    m = registry.create("head-split:retrieval_fraction=0.25,window=32,block_size=16", scores=scores)
    assert isinstance(m, HeadSplit) and (m.retrieval_fraction, m.sinks, m.window, m.block_size) == (0.25, 64, 32, 16)
    path = scores.save(tmp_path / "s.json")
    assert registry.create(f"head-split:scores={path}").scores == scores
    with pytest.raises(StateError):
        registry.create(f"head-split:scores={path}", model=tiny("qwen2"))
    with pytest.raises(ValueError, match="model= and tokenizer="):
        registry.create("head-split")
    built = registry.create("head-split:retrieval_fraction=1", model=model, tokenizer=CharTok())
    assert built.scores.model == ModelIdentity.of(model) and built.scores.calibration["length"] == 400
    assert len(list((tmp_path / "head_scores").glob("*.json"))) == 1
    assert registry.create("head-split", model=model, tokenizer=CharTok()).scores == built.scores  # cached
    assert registry.density_param("head-split") == "retrieval_fraction"
    spec = registry.at_density("head-split:sinks=4,window=32,block_size=16", 0.5, 300)
    rf = registry.parse_spec(spec)[1]["retrieval_fraction"]
    assert rf == hs.retrieval_fraction_for(0.5, 300, {"sinks": 4, "window": 32, "block_size": 16})
    assert registry.at_density("head-split", 1.0, 4096) == "head-split:retrieval_fraction=1.0"
    assert "density knob: retrieval_fraction" in registry.describe()


# -- the real default model (slow) ---------------------------------------------------------------------
@pytest.mark.slow
def test_calibrate_smollm2_prints_the_top_heads():
    from tca_attention.models import load_model

    model, tok = load_model("smollm2")
    scores = hs.calibrate_head_scores(ModelProbe(model), tok, Calibration(length=2048), progress=False)
    top = scores.ranked()[:10]
    print("top KV heads (layer, head, score):", [(i, h, round(s, 3)) for i, h, s in top])
    assert top[0][2] > 0.3  # a real model has heads that copy the needle
    assert sum(s > 0 for row in scores.layers for s in row) < len(scores.ranked())  # and many that never do
