"""razor: RazorAttention's echo/induction heads and the compensation token.

The compensation entry in the engine (reference = n copies of the mean token; Triton path merged
from the kernel's lse = reference; the cache's running means at prefill and in decode), the scores
on hand-built attention, calibration end to end (cached), the state's JSON and identity checks,
all heads retrieval = dense, no compensation = StreamingLLM's cache under a dense prefill, batch
invariance, the density knob and the registry.
"""
from __future__ import annotations

import json

import pytest
import torch

from tca_attention import registry
from tca_attention.engine import compensation, dispatch, reference
from tca_attention.engine.plan import RaggedCacheView, TokenPlan
from tca_attention.integration import enable
from tca_attention.integration.probe import ModelProbe
from tca_attention.methods import razor
from tca_attention.methods.razor import Probing, Razor, RazorScores, echo_induction
from tca_attention.methods.state import ModelIdentity, StateError
from tca_attention.methods.streaming import StreamingLLM
from tca_attention.ragged_cache import RaggedLayer
from test_batch_invariance import greedy
from test_head_split import SINKS, W, B, fake_scores, left_padded
from tiny_models import tiny


def scores_of(model, echo, induction) -> RazorScores:
    return RazorScores(ModelIdentity.of(model), tuple(map(tuple, echo)), tuple(map(tuple, induction)), {"source": "test"})


def fake_razor(model, seed=0) -> RazorScores:
    f = fake_scores(model, seed)
    return RazorScores(f.model, f.layers, tuple(tuple(1 - x for x in r) for r in f.layers))


# -- the compensation entry in the engine ---------------------------------------------------------------
def view_with_comp(gen, Bn=2, KV=2, H=4, D=16, T=9, Q=1, n=(5, 0, 3, 11)):
    """A ragged view (global part of a few tokens per head + a tail) with compensation entries
    standing for n[b * KV + h] tokens (0: none)."""
    lens = torch.tensor([3, 0, 2, 4])
    off = torch.nn.functional.pad(lens.cumsum(0), (1, 0))
    N = int(lens.sum())
    q = torch.randn(Bn, H, Q, D, generator=gen)
    view = RaggedCacheView(
        q_pos=torch.full((Bn, Q), 40), g_keys=torch.randn(N, D, generator=gen), g_values=torch.randn(N, D, generator=gen),
        g_pos=torch.arange(N), g_offsets=off, t_keys=torch.randn(Bn, KV, T, D, generator=gen),
        t_values=torch.randn(Bn, KV, T, D, generator=gen), t_pos=torch.arange(30, 30 + T)[None].expand(Bn, T).clone(),
        c_keys=torch.randn(Bn, KV, D, generator=gen), c_values=torch.randn(Bn, KV, D, generator=gen),
        c_logw=compensation.log_weight(torch.tensor(n, dtype=torch.float64).view(Bn, KV)))
    return q, view


def test_compensation_entry_counts_as_n_copies_of_the_mean_token():
    """The reference with an entry for n tokens = plain attention with n copies of (c_key, c_value)
    appended to each head's global part."""
    gen = torch.Generator().manual_seed(0)
    q, view = view_with_comp(gen)
    out, lse = reference.ragged_decode_ref(q, view, 0.3)
    Bn, KV = view.c_keys.shape[:2]
    n = view.c_logw.exp().round().long()
    gk, gv, gp, offs = [], [], [], [0]
    for s in range(Bn * KV):
        a, e = int(view.g_offsets[s]), int(view.g_offsets[s + 1])
        m = int(n.view(-1)[s])
        gk += [view.g_keys[a:e], view.c_keys.view(-1, view.c_keys.shape[-1])[s].expand(m, -1)]
        gv += [view.g_values[a:e], view.c_values.view(-1, view.c_values.shape[-1])[s].expand(m, -1)]
        gp += [view.g_pos[a:e], torch.zeros(m, dtype=torch.long)]
        offs.append(offs[-1] + e - a + m)
    plain = RaggedCacheView(view.q_pos, torch.cat(gk), torch.cat(gv), torch.cat(gp), torch.tensor(offs),
                            view.t_keys, view.t_values, view.t_pos)
    want, want_lse = reference.ragged_decode_ref(q, plain, 0.3)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
    no_entry, _ = reference.ragged_decode_ref(q, RaggedCacheView(*[getattr(view, f) for f in (
        "q_pos", "g_keys", "g_values", "g_pos", "g_offsets", "t_keys", "t_values", "t_pos")]), 0.3)
    torch.testing.assert_close(out[0, :, 2:4], no_entry[0, :, 2:4])  # (b=0, KV head 1): n = 0, no entry
    assert not torch.allclose(out[:, :, :2], no_entry[:, :, :2])


def test_merge_of_the_kernel_path_equals_the_reference():
    """Attention without the entries, merged by lse (what the Triton path does) = the reference."""
    gen = torch.Generator().manual_seed(1)
    q, view = view_with_comp(gen, Q=3)
    bare = RaggedCacheView(*[getattr(view, f) for f in ("q_pos", "g_keys", "g_values", "g_pos", "g_offsets",
                                                         "t_keys", "t_values", "t_pos")])
    out0, lse0 = reference.ragged_decode_ref(q, bare, 0.3)
    got, got_lse = compensation.merge(q, out0, lse0, view.c_keys, view.c_values, view.c_logw, 0.3)
    want, want_lse = reference.ragged_decode_ref(q, view, 0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_lse, want_lse, rtol=1e-5, atol=1e-5)


def test_triton_decode_honours_the_compensation_entries():
    gen = torch.Generator().manual_seed(2)
    q, view = view_with_comp(gen, Q=2)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    moved = RaggedCacheView(*[None if (x := getattr(view, f.name)) is None else x.to(dev)
                              for f in view.__dataclass_fields__.values()])
    got, got_lse = dispatch.ragged_decode(q.to(dev), moved, 0.3, backend="triton")
    want, want_lse = reference.ragged_decode_ref(q, view, 0.3)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_lse.cpu(), want_lse, rtol=1e-4, atol=1e-4)


def test_cache_folds_dropped_tokens_at_prefill_and_in_decode():
    """One layer, hand-built plan: head 0 keeps its whole global region, head 1 keeps 2 sinks and
    compensates. The entry is the mean of the real dropped tokens (padding never), its count their
    number; a block compressed in decode is folded in as a running mean."""
    Bn, KV, L, D, bs, w = 2, 2, 40, 4, 8, 8
    gen = torch.Generator().manual_seed(3)
    k, v = torch.randn(Bn, KV, L, D, generator=gen), torch.randn(Bn, KV, L, D, generator=gen)
    key_start = torch.tensor([0, 5])
    ls = torch.tensor([32, 29])  # per-row local starts
    kept_idx = torch.full((Bn, KV, 32), L)
    kept_len = torch.tensor([[32, 2], [24, 2]], dtype=torch.int32)
    kept_idx[0, 0], kept_idx[1, 0, :24] = torch.arange(32), torch.arange(5, 29)
    kept_idx[0, 1, :2], kept_idx[1, 1, :2] = torch.arange(2), torch.arange(5, 7)
    plan = TokenPlan(kept_idx, kept_len, 32, w, bs, key_start, torch.tensor([bs, 0]), row_local_start=ls,
                     compensate=torch.tensor([False, True]), attend_all=True)
    with pytest.raises(ValueError, match="attend_all"):  # the plan is what the cache keeps, not an attention plan
        dispatch.sparse_prefill(torch.randn(Bn, 2 * KV, L, D), k, v, plan, 0.5, backend="reference")
    layer = RaggedLayer(bs, w, backend="reference")
    layer.update(k, v)
    layer.commit_prefill(plan, key_start, plan.decode_keep)
    for r, (s, e) in enumerate([(2, 32), (7, 29)]):
        torch.testing.assert_close(layer.c_keys[r, 1], k[r, 1, s:e].mean(0))
        torch.testing.assert_close(layer.c_values[r, 1], v[r, 1, s:e].mean(0))
        assert layer.c_count[r].tolist() == [0.0, e - s]
    # decode until each row compresses one block: head 1 folds the whole block (it keeps none)
    before = layer.c_keys.clone(), layer.c_count.clone()
    new_k, new_v = [], []
    while layer.c_count[1, 1] == before[1][1, 1] or layer.c_count[0, 1] == before[1][0, 1]:
        nk, nv = torch.randn(Bn, KV, 1, D, generator=gen), torch.randn(Bn, KV, 1, D, generator=gen)
        new_k.append(nk), new_v.append(nv)
        layer.update(nk, nv)
        layer.attend(torch.randn(Bn, 2 * KV, 1, D, generator=gen), 0.5)
    all_k = torch.cat([k, *new_k], 2)
    for r, (s, e) in enumerate([(2, 32), (7, 29)]):
        n = int(layer.c_count[r, 1])
        assert n == e - s + bs  # exactly one block folded in
        torch.testing.assert_close(layer.c_keys[r, 1], all_k[r, 1, s:e + bs].mean(0), rtol=1e-5, atol=1e-6)
    assert layer.c_count[:, 0].tolist() == [0.0, 0.0]  # head 0 compensates nothing
    assert layer.kept_tokens() == int(layer.g_pos.shape[0]) + Bn * KV * layer.t_fill + 2  # two entries held


# -- the scores --------------------------------------------------------------------------------------------
def test_echo_and_induction_scores_on_hand_built_heads():
    """One-hot keys, logits of 50: head 0 looks at its token's previous occurrence (echo), head 1
    at the token after it (induction), head 2 at itself, head 3 at the first token."""
    period, reps = 10, 3
    L, H = period * reps, 4
    k = torch.eye(L)[None].expand(2, L, L).clone()
    q = torch.zeros(H, L, L)
    for j in range(L):
        if j >= period:
            q[0, j, j - period] = 50
            q[1, j, j - period + 1] = 50
        q[2, j, j] = 50
        q[3, j, 0] = 50
    echo, ind = echo_induction(q, k, 1.0, period, n_queries=1000)
    # head 3's key 0 is the earlier occurrence for queries 10 and 20 and the token after it for 19 and 29
    torch.testing.assert_close(echo, torch.tensor([1.0, 0.0, 0.0, 0.1], dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(ind, torch.tensor([0.0, 1.0, 0.0, 0.1], dtype=torch.float64), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="no repetition"):
        echo_induction(q[:, :period, :period], k[:, :period, :period], 1.0, period)


def test_retrieval_heads_take_echo_then_induction():
    model = tiny("llama", num_key_value_heads=6, num_attention_heads=6)  # 2 layers x 6 KV heads = 12
    echo = [(0.9, 0.1, 0.0, 0.0, 0.2, 0.0), (0.0, 0.0, 0.8, 0.0, 0.0, 0.0)]
    ind = [(0.0, 0.7, 0.6, 0.1, 0.0, 0.0), (0.95, 0.0, 0.0, 0.0, 0.5, 0.0)]
    s = scores_of(model, echo, ind)
    # 1/12 by echo: (0, 0); then the best induction of the rest up to 4: (1, 0), (0, 1), (0, 2)
    assert s.retrieval_heads(4 / 12, 1 / 12) == ((True, True, True, False, False, False),
                                                 (True, False, False, False, False, False))
    # 2 by echo: (0, 0), (1, 2); then induction: (1, 0), (0, 1)
    assert s.retrieval_heads(4 / 12, 2 / 12) == ((True, True, False, False, False, False),
                                                 (True, False, True, False, False, False))
    assert s.retrieval_heads(1.0, 0.0) == ((True,) * 6, (True,) * 6)
    assert s.retrieval_heads(0.0, 0.5) == ((False,) * 6, (False,) * 6)  # the echo share counts inside the total


def test_calibration_on_a_tiny_model_end_to_end_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("TCA_CACHE_DIR", str(tmp_path))
    model = tiny("gemma3")
    probing = Probing(period=40, repeats=3, samples=2)
    ids = razor.random_repeats(97, probing, 0)
    assert len(ids) == 120 and ids[:40] == ids[40:80] == ids[80:] and ids != razor.random_repeats(97, probing, 1)
    calls = []
    real = razor.calibrate_razor_scores
    monkeypatch.setattr(razor, "calibrate_razor_scores", lambda *a, **k: calls.append(1) or real(*a, **k))
    s = razor.load_or_calibrate(ModelProbe(model), "tiny", probing, announce=False)
    assert [r is None for r in s.echo] == [True, False, True] == [r is None for r in s.induction]
    assert all(0 <= x <= 1 for x in s.echo[1] + s.induction[1]) and len(s.echo[1]) == 2
    assert s.calibration["samples"] == 2 and calls == [1]
    assert razor.load_or_calibrate(ModelProbe(model), "tiny", probing, announce=False) == s and calls == [1]


def test_state_round_trips_and_refuses_other_models_and_versions(tmp_path):
    model, other = tiny("llama"), tiny("qwen2")
    s = scores_of(model, [(0.9, 0.1), (0.4, 0.6)], [(0.2, 0.3), (0.5, 0.0)])
    path = s.save(tmp_path / "r.json")
    assert RazorScores.load(path, model=model) == s
    with pytest.raises(StateError, match="do not fit this model"):
        RazorScores.load(path, model=other)
    with pytest.raises(StateError, match="do not fit this model"):
        enable(other, Razor(s))
    data = s.to_json()
    for broken, why in (({**data, "version": 3}, "version 3 is not supported"),
                        ({**data, "format": "tca-attention/duo-gates"}, "not a tca-attention/razor-scores file"),
                        ({**data, "echo": data["echo"][:1]}, "echo must be a list of 2"),
                        ({**data, "induction": [[0.5, -0.1], None]}, r"induction\[0\] must be null or 2 scores"),
                        ({**data, "echo": [None, [0.1, 0.2]]}, "must score the same layers"),
                        ({**data, "model": {**data["model"], "head_dim": True}}, "must be a positive integer")):
        with pytest.raises(StateError, match=why):
            RazorScores.from_json(broken)
    (tmp_path / "bad.json").write_text("[1")
    with pytest.raises(StateError, match="corrupt"):
        RazorScores.load(tmp_path / "bad.json")
    assert json.loads(path.read_text())["format"] == "tca-attention/razor-scores"


# -- on the model ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_all_retrieval_heads_equal_dense(arch):
    model = tiny(arch).double()
    _, ids, mask = left_padded((200, 151, 40), seed=5)
    method = Razor(fake_razor(model), retrieval_fraction=1.0, sinks=SINKS, window=W, block_size=B)
    with torch.no_grad():
        with enable(model, None) as dense:
            dp, dl, dt, _ = greedy(model, ids, mask, 30, dense)
        with enable(model, method, backend="reference") as session:
            sp, sl, st, cache = greedy(model, ids, mask, 30, session)
    assert torch.equal(st, dt)
    assert torch.equal(sp[mask.bool()], dp[mask.bool()])
    assert float((sl - dl).abs().max()) <= 64 * torch.finfo(torch.float32).eps * float(dl.abs().max())
    assert all(l.g_pos.numel() == 0 and l.c_keys is None for l in cache.tca_layers())


def test_prefill_is_dense_and_without_compensation_the_cache_is_streaming_llms():
    """retrieval_fraction=0: the prefill is plain attention (the same logits as dense); without the
    compensation token the cache is StreamingLLM's, and with it each head holds one entry more and
    decodes differently."""
    model = tiny("llama")
    _, ids, mask = left_padded((300, 251, 45), seed=6)
    valid = mask.bool()
    runs = {}
    with torch.no_grad():
        for name, method in (("dense", None), ("stream", StreamingLLM(sinks=SINKS, window=W, block_size=B)),
                             ("razor0", Razor(fake_razor(model), 0.0, 0.0, SINKS, W, B, compensate=False)),
                             ("razor", Razor(fake_razor(model), 0.0, 0.0, SINKS, W, B))):
            with enable(model, method, backend="reference") as session:
                runs[name] = greedy(model, ids, mask, 40, session)
                if name == "razor":
                    assert session.prefill_report()["kept_fraction"] < 0.5
    assert torch.equal(runs["razor"][0][valid], runs["dense"][0][valid])
    assert torch.equal(runs["razor0"][0][valid], runs["dense"][0][valid])
    rc, sc, cc = runs["razor0"][3], runs["stream"][3], runs["razor"][3]
    for i, (a, b, c) in enumerate(zip(rc.tca_layers(), sc.tca_layers(), cc.tca_layers())):
        assert a.c_keys is None and a.g_pos.numel() > 0
        for f in ("g_pos", "g_offsets", "t_first"):  # the same tokens held (StreamingLLM's prefill is sparse,
            assert torch.equal(getattr(a, f), getattr(b, f)) and torch.equal(getattr(a, f), getattr(c, f)), f
        assert a.t_fill == b.t_fill == c.t_fill and a.t_pos0 == b.t_pos0 == c.t_pos0  # so only layer 0's keys agree)
        if i == 0:
            assert torch.equal(a.g_keys, b.g_keys)
        # every row's heads hold one entry more (each dropped something), and it counts every dropped real token
        assert c.kept_tokens() == a.kept_tokens() + 3 * 2
        n_seen = (c.seen - c.key_start)[:, None]  # real tokens each (row, head) was given
        held = (c.g_offsets[1:] - c.g_offsets[:-1]).view(3, 2) + (c.tail_positions() >= 0).sum(-1, keepdim=True)
        assert torch.equal(c.c_count.long() + held, n_seen.expand(3, 2))
        assert c.kv_bytes() > a.kv_bytes()
    assert not torch.allclose(runs["razor"][1], runs["razor0"][1])  # the entry changes decode


def test_alone_equals_batched():
    model = tiny("qwen2")
    method = Razor(fake_razor(model), 0.5, 0.25, SINKS, W, B)
    prompts, ids, mask = left_padded((300, 251, 45), seed=7)
    L = ids.shape[1]
    with torch.no_grad(), enable(model, method, backend="reference") as session:
        bp, bl, bt, bc = greedy(model, ids, mask, 30, session)
        for r, p in enumerate(prompts):
            ap, al, at, ac = greedy(model, p[None], torch.ones(1, len(p), dtype=torch.long), 30, session)
            assert torch.equal(bt[r], at[0]), r
            tol = 64 * torch.finfo(torch.float32).eps * float(ap.abs().max())
            assert float((bp[r, L - len(p):] - ap[0]).abs().max()) <= tol
            assert float((bl[r] - al[0]).abs().max()) <= tol
            for lb, la in zip(bc.tca_layers(), ac.tca_layers()):
                assert torch.equal(lb.c_count[r], la.c_count[0]), r
                torch.testing.assert_close(lb.c_keys[r], la.c_keys[0], rtol=1e-5, atol=1e-6)


def test_static_decode_is_refused_clearly():
    model = tiny("llama")
    with enable(model, Razor(fake_razor(model), 0.5)) as session, pytest.raises(ValueError, match="graph-safe"):
        session.new_cache(max_new_tokens=4)


def test_density_knob_and_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("TCA_CACHE_DIR", str(tmp_path))
    model = tiny("llama", num_attention_heads=8, num_key_value_heads=8, num_hidden_layers=3)  # 24 KV heads
    s = fake_razor(model)
    L, params = 300, {"sinks": SINKS, "window": W, "block_size": B}
    rf = razor.retrieval_fraction_for(0.5, L, params)
    method = registry.create(registry.at_density("razor:sinks=4,window=32,block_size=16,echo_fraction=0", 0.5, L),
                             scores=s)
    assert isinstance(method, Razor) and method.retrieval_fraction == rf
    with torch.no_grad(), enable(model, method, backend="reference") as session:
        cache = session.new_cache()
        model(input_ids=torch.randint(0, 97, (1, L)), **session.cache_kwargs(cache))
    assert abs(cache.kept_fraction() - 0.5) <= 1 / (2 * 24) + 1e-9  # one head's rounding at most
    path = s.save(tmp_path / "s.json")
    assert registry.create(f"razor:scores={path}").scores == s
    with pytest.raises(StateError):
        registry.create(f"razor:scores={path}", model=tiny("qwen2"))
    with pytest.raises(ValueError, match="model="):
        registry.create("razor")
    built = registry.create("razor:compensate=false", model=tiny("llama"))
    assert built.compensate is False and len(list((tmp_path / "razor_scores").glob("*.json"))) == 1


def test_bench_sweep_and_synthetic_state():
    from argparse import Namespace

    from tca_attention.benchmarks import bench_methods

    assert bench_methods.PEER_SWEEPS["razor"] == "razor:retrieval_fraction=0.15|0.3"
    model = tiny("llama")
    m = bench_methods.build_method("razor:retrieval_fraction=0.5,echo_fraction=0.25", model,
                                   Namespace(synthetic_state=True))
    assert isinstance(m, Razor) and m.report() == {"retrieval_heads": 2, "kv_heads": 4}
    m.check_model(model)
    assert m.scores.echo != m.scores.induction  # two seeds
