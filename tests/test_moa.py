"""MoA: the influence profile, the rule search, per-head window plans, the state file, the registry."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from method_checks import assert_alone_equals_batched, assert_full_density_equals_dense
from tiny_models import tiny

from tca_attention import registry
from tca_attention.engine import reference as R
from tca_attention.integration.probe import ModelProbe
from tca_attention.methods import moa
from tca_attention.methods.moa import MoA, MoAProfile, Rule
from tca_attention.methods.state import ModelIdentity, StateError

SMALL = dict(sinks=4, window=16, block_size=16)  # engine geometry for tiny prompts
CAL = moa.Calibration(lengths=(64, 128), samples=1, block=16)


@pytest.fixture(scope="module")
def profiles() -> dict[str, MoAProfile]:
    """Profiles of the tiny llama and gemma2 (sliding layers left alone) on random tokens."""
    ids = torch.randint(0, 97, (1000,), generator=torch.Generator().manual_seed(0)).tolist()
    return {arch: moa.calibrate_profile(ModelProbe(tiny(arch).float()), ids, CAL, progress=False)
            for arch in ("llama", "gemma2")}


def hand_profile(model, rows: list[list[list[float]]], length: int = 256, block: int = 16) -> MoAProfile:
    """A one-length profile whose tails are given: rows[layer][head] (or None rows)."""
    return MoAProfile(ModelIdentity.of(model), block, (length,), (tuple(None if r is None else tuple(map(tuple, r))
                                                                        for r in rows),))


# -- the profile ----------------------------------------------------------------------------------
def test_influence_is_the_loss_change_of_masking_an_entry():
    """With a loss linear in the attention output (fixed d_out) the Taylor estimate is exact: each
    entry's influence (block 1) equals the loss change of masking it and renormalising its row."""
    gen = torch.Generator().manual_seed(1)
    L, D = 7, 4
    q, k, v = (torch.randn(1, L, D, generator=gen, dtype=torch.float64) for _ in range(3))
    d_out = torch.randn(L, 1, D, generator=gen, dtype=torch.float64)
    tiles = moa.influence(q, k, v, d_out, 0.5, block=1)[0]  # (L, L)
    a = torch.softmax(((q[0] @ k[0].T) * 0.5).masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf")), -1)
    base = (d_out[:, 0] * (a @ v[0])).sum()
    for i in range(1, L):
        for j in range(i + 1):
            m = a.clone()
            m[i, j] = 0
            m[i] /= m[i].sum()
            assert float(tiles[i, j]) == pytest.approx(float((d_out[:, 0] * (m @ v[0])).sum() - base), rel=1e-5, abs=1e-7)  # fp32 math
    assert float(tiles[0, 0]) == pytest.approx(float(-(d_out[0, 0] @ v[0, 0]) * 1.0))  # only key of row 0
    assert torch.all(tiles.triu(1) == 0)  # nothing above the diagonal


def test_tails_hand_built():
    t = torch.tensor([[1.0, 0, 0], [2.0, -3.0, 0], [4.0, 5.0, -6.0]])  # column 0: the sinks, never counted
    # distance 0: |-3| + |-6| = 9; distance 1 (J >= 1): |5| = 5; distance 2: only column 0
    assert moa.tails(t) == [14.0, 5.0, 0.0, 0.0]


def test_profile_of_a_tiny_model(profiles):
    llama, gemma = profiles["llama"], profiles["gemma2"]
    assert llama.lengths == (64, 128) and llama.block == 16
    for i, n in enumerate(llama.lengths):
        for row in llama.tails[i]:
            for t in row:
                assert len(t) == n // 16 + 1 and t[0] > 0 and t[-1] == 0
                assert all(a >= b for a, b in zip(t, t[1:]))
    assert [r is None for r in gemma.tails[0]] == [True, False, True]  # sliding layers are not profiled


# -- the search -----------------------------------------------------------------------------------
def test_search_gives_the_far_looking_head_the_wide_rule():
    """Head 0's influence lies at the largest distance, head 1's only on the diagonal: a budget
    with room for one wide head gives it to head 0; head 1 stays at the least span."""
    model = tiny("llama")
    far = [1.0] * 16 + [0.0]
    near = [1.0] + [0.0] * 16
    p = hand_profile(model, [[far, near], [near, near]])
    rules, summary = moa.search(p, 0.5, min_span=20, sinks=4)
    assert rules[0][0].span(256, 20) == 256  # full
    least = min(r.span(256, 20) for r in moa.rule_grid((256,), 1024))  # the grid's smallest span (alpha step 32)
    assert rules[0][1].span(256, 20) == least and rules[1][0].span(256, 20) == least
    assert all(v <= 0.5 + 1e-9 for v in summary["kept"].values())
    assert summary["lost"] == pytest.approx(0.0)


def test_search_full_budget_and_infeasible_budget():
    model = tiny("llama")
    p = hand_profile(model, [[[1.0] * 17, [1.0] * 17]] * 2)
    rules, _ = moa.search(p, 1.0, min_span=20, sinks=4)
    assert all(r == moa.FULL for row in rules for r in row)
    with pytest.raises(ValueError, match="below the least"):
        moa.search(p, 0.01, min_span=20, sinks=4)
    with pytest.raises(ValueError, match="density"):
        moa.search(p, 0.0, min_span=20, sinks=4)


def test_rule_span_and_band():
    r = Rule(alpha=32.0, beta=0.25)
    assert r.span(1000, 80) == 282 and r.band(1000, 80, 4) == 278
    assert r.span(100, 80) == 80  # the least span
    assert Rule(0.0, 1.0).band(100, 80, 4) == 100  # the whole prompt: dense


# -- the plan --------------------------------------------------------------------------------------
def test_plan_keeps_sinks_and_each_heads_own_band(profiles):
    m = MoA(profiles["llama"], density=0.4, **SMALL)
    B, KV, L, D = 2, 2, 150, 16
    k = torch.randn(B, KV, L, D)
    q = torch.randn(B, 6, L, D)
    ks = torch.tensor([0, 30])
    plan = m.plan(0, q, k, ks, 0.25)
    ls = plan.local_starts()
    for b in range(B):
        n = L - int(ks[b])
        for h, rule in enumerate(m.rules(0)):
            band = rule.band(n, 20, 4)
            assert int(plan.head_window[b, h]) == band
            expect = sorted({*range(int(ks[b]), int(ks[b]) + 4), *range(L - band, L)} & set(range(int(ks[b]), int(ls[b]))))
            assert plan.kept_idx[b, h, : int(plan.kept_len[b, h])].tolist() == expect
    assert len(set(plan.head_window.flatten().tolist())) > 1 or len({r for r in m.rules(0)}) == 1
    # the executors see each head's band: the reference equals an explicit per-head mask
    v = torch.randn(B, KV, L, D)
    out = R.sparse_prefill_ref(q, k, v, plan, 0.25)
    j = torch.arange(L)
    for b in range(B):
        for h in range(KV):
            w = int(plan.head_window[b, h])
            lo = torch.where(j >= ls[b], torch.minimum(j - w + 1, ls[b]), j - w + 1)
            kept = torch.zeros(L, dtype=torch.bool)
            kept[plan.kept_idx[b, h, : int(plan.kept_len[b, h])]] = True
            vis = (j[None] <= j[:, None]) & ((j[None] >= lo[:, None]) | kept[None]) & (j[None] >= ks[b])
            logits = (q[b, 3 * h] @ k[b, h].T * 0.25).masked_fill(~vis, float("-inf"))
            want = torch.softmax(logits, -1).nan_to_num() @ v[b, h]
            torch.testing.assert_close(out[b, int(ks[b]):, 3 * h], want[int(ks[b]):], atol=1e-5, rtol=1e-5)


def test_short_prompts_and_unprofiled_layers_stay_dense(profiles):
    m = MoA(profiles["gemma2"], density=0.4, **SMALL)
    k = torch.randn(1, 2, 150, 32)
    assert m.plan(0, k, k, torch.zeros(1, dtype=torch.long), 0.2) is None  # a sliding layer
    assert m.plan(1, k[:, :, :30], k[:, :, :30], torch.zeros(1, dtype=torch.long), 0.2) is None  # L <= window + block
    assert m.plan(1, k, k, torch.zeros(1, dtype=torch.long), 0.2) is not None


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_full_density_equals_dense(arch, profiles):
    assert_full_density_equals_dense(arch, MoA(profiles[arch], density=1.0, **SMALL))


def test_alone_equals_left_padded_batch(profiles):
    assert_alone_equals_batched(MoA(profiles["llama"], density=0.4, **SMALL))


def test_sparse_moa_keeps_less_and_changes_the_output(profiles):
    model = tiny("llama").float()
    ids = torch.randint(0, 97, (1, 150))
    from tca_attention.integration import enable
    from tca_attention.integration.adapter import cache_kwargs

    with torch.no_grad():
        dense = model(ids).logits
        with enable(model, MoA(profiles["llama"], density=0.4, **SMALL)) as s:
            cache = s.new_cache()
            sparse = model(ids, **cache_kwargs(cache)).logits
            kept = s.prefill_report()["kept_fraction"]
    assert kept < 0.6 and not torch.allclose(dense, sparse, atol=1e-4)
    assert cache.get_seq_length() == 150


# -- knobs, state, registry ----------------------------------------------------------------------
@pytest.mark.parametrize("bad", [dict(density=0.0), dict(density=1.5), dict(sinks=-1), dict(window=0),
                                 dict(block_size=0)])
def test_bad_knobs_raise(profiles, bad):
    with pytest.raises(ValueError):
        MoA(profiles["llama"], **{**SMALL, **bad})


def test_state_round_trip_and_validation(profiles, tmp_path):
    p = profiles["llama"]
    path = p.save(tmp_path / "p.json")
    assert MoAProfile.load(path, model=tiny("llama")) == p
    with pytest.raises(StateError, match="does not fit"):
        MoAProfile.load(path, model=tiny("llama", num_key_value_heads=3))
    with pytest.raises(StateError, match="does not fit"):
        MoA(p, **SMALL).check_model(tiny("qwen2", hidden_size=64))
    data = json.loads(path.read_text())
    cases = {
        "version": {**data, "version": 99},
        "format": {**data, "format": "tca-attention/head-scores"},
        "increasing": {**data, "tails": [[[[0.0, 1.0, 0, 0, 0]] * 2] * 2, data["tails"][1]]},
        "negative": {**data, "tails": [[[[-1.0, -1.0, -1.0, -1.0, -1.0]] * 2] * 2, data["tails"][1]]},
        "lengths": {**data, "lengths": [128, 64]},
        "layers": {**data, "tails": [data["tails"][0][:1], data["tails"][1]]},
        "block": {**data, "block": 0},
    }
    for why, bad in cases.items():
        path.write_text(json.dumps(bad))
        with pytest.raises(StateError):
            MoAProfile.load(path)
        assert why
    path.write_text("{not json")
    with pytest.raises(StateError, match="corrupt"):
        MoAProfile.load(path)


class _Tok:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 97 for c in text]}


def test_profile_once_then_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("TCA_CACHE_DIR", str(tmp_path))
    model = tiny("llama").float()
    text = "".join(chr(97 + i % 26) for i in range(500))
    cal = moa.Calibration(lengths=(64,), samples=1, block=16)
    first = moa.load_or_calibrate(ModelProbe(model), _Tok(), "tiny", cal, text=text, announce=False)
    assert moa.profile_path_for(model, "tiny", cal).exists()
    monkeypatch.setattr(moa, "calibrate_profile", lambda *a, **k: pytest.fail("profiled twice"))
    assert moa.load_or_calibrate(ModelProbe(model), _Tok(), "tiny", cal, text=text, announce=False) == first


def test_registry(profiles, tmp_path):
    registry._check_params_match_fields()
    assert registry.normalize("moa:density=0.30,sinks=4") == "moa:density=0.3,sinks=4"
    assert registry.at_density("moa:sinks=4", 0.25, 4096) == "moa:density=0.25,sinks=4"
    path = profiles["llama"].save(tmp_path / "p.json")
    m = registry.create(f"moa:density=0.5,sinks=4,window=16,block_size=16,profile={path}", model=tiny("llama"))
    assert isinstance(m, MoA) and m.density == 0.5 and m.profile == profiles["llama"]
    assert registry.create("moa:window=16,block_size=16,sinks=4", profile=profiles["llama"]).profile is profiles["llama"]
    with pytest.raises(ValueError, match="needs an influence profile"):
        registry.create("moa")
    from tca_attention.benchmarks import bench_methods

    assert bench_methods.PEER_SWEEPS["moa"] == "moa:density=0.25|0.5"
    synthetic = bench_methods.SYNTHETIC["moa"](tiny("llama"))
    assert isinstance(registry.create("moa:density=0.25", **synthetic), MoA)


def test_report_states_the_budget(profiles):
    rep = MoA(profiles["llama"], density=0.4, **SMALL).report()["moa"]
    assert rep["density"] == 0.4 and all(v <= 0.4 + 1e-9 for v in rep["kept"].values())
    assert dataclasses.is_dataclass(MoA)


def test_static_decode_equals_dynamic(profiles):
    """The graph-safe static decode path (run eagerly on the CPU) gives the same tokens."""
    from tca_attention.integration import enable

    model = tiny("llama").float()
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 97, (2, 150), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :40] = 0
    with torch.no_grad(), enable(model, MoA(profiles["llama"], density=0.4, **SMALL)) as s:
        want = s.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0,
                          eos_token_id=None)
        got = s.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, cuda_graph=True)
    assert torch.equal(got, want)


def test_tensor_parallel_rank_takes_its_heads_rules(profiles):
    """A rank holding KV head 1 of 2 gets that head's rules, searched over the whole model."""
    from tca_attention.integration.tensor_parallel import HeadShard, shard_method

    m = MoA(profiles["llama"], density=0.4, **SMALL)
    rank1 = shard_method(m, HeadShard(1, 2, (1, 2), (3, 6), 2, 6))
    assert [r for r in rank1._rules] == [row[1:] for row in m._rules]
    assert rank1.profile is m.profile and rank1._summary == m._summary
    k = torch.randn(1, 1, 150, 16)
    plan = rank1.plan(0, torch.randn(1, 3, 150, 16), k, torch.zeros(1, dtype=torch.long), 0.25)
    assert int(plan.head_window[0, 0]) == m.rules(0)[1].band(150, 20, 4)
