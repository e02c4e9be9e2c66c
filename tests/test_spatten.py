"""SpAtten cascade token pruning: cumulative importance against a brute force of its definition,
hand-built inputs, the cascade (each layer's kept set inside the previous one), the per-prefill
reset, alone equals batched (plan and model), keep = 1 equals dense, the KV saving, the density
knob, bad knobs and the registry."""
from __future__ import annotations

import math
import types
from dataclasses import replace

import pytest
import torch

from tca_attention import registry
from tca_attention.engine.plan import TokenPlan, band_start
from tca_attention.integration import enable
from tca_attention.methods.spatten import SpAtten, keep_for
from method_checks import assert_alone_equals_batched, assert_full_density_equals_dense
from tiny_models import tiny


def bound(m: SpAtten, n_layers: int) -> SpAtten:
    m.check_model(types.SimpleNamespace(config=types.SimpleNamespace(num_hidden_layers=n_layers)))
    return m


def layer_inputs(B, H, KV, L, D, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, L, D, generator=g) * 1.5, torch.randn(B, KV, L, D, generator=g)


def plan_kept(plan: TokenPlan, b: int) -> set[int]:
    return set(plan.kept_idx[b, 0, : int(plan.kept_len[b, 0])].tolist())


def brute_scores(q, k, ks, ls, kept, window, scaling, dense):
    """sum over heads h and counted queries j of softmax_j(q_j . k_s)[s] over the keys j sees."""
    B, H, L, D = q.shape
    g = H // k.shape[1]
    out = torch.zeros(B, L, dtype=torch.float64)
    for b in range(B):
        s0, l0 = int(ks[b]), int(ls[b])
        for j in range(s0, L):
            if not dense and not (kept[b, j] or j >= l0):
                continue  # a pruned token's query no longer exists
            lo = int(band_start(torch.tensor(j), window, l0))
            keys = [s for s in range(s0, j + 1) if dense or kept[b, s] or s >= lo]
            for h in range(H):
                logits = torch.stack([q[b, h, j].double() @ k[b, h // g, s].double() for s in keys]) * scaling
                out[b, keys] += torch.softmax(logits, 0)
    return out


def test_cumulative_importance_matches_the_definition():
    m = bound(SpAtten(keep=0.4, window=8, block_size=4), n_layers=3)
    B, H, KV, L, D = 2, 4, 2, 37, 8
    ks = torch.tensor([0, 6])
    q0, k0 = layer_inputs(B, H, KV, L, D, 1)
    assert m.plan(0, q0, k0, ks, 0.3) is None  # the first layer is dense: it only scores
    st = m._state
    ls = torch.tensor([L - 8 - 1, L - 8 - 3])  # local starts: blocks of 4 counted from key_start
    glob = st["kept"].clone()
    want = brute_scores(q0, k0, ks, ls, glob, 8, 0.3, dense=True)
    torch.testing.assert_close(st["score"].double(), want, atol=1e-4, rtol=1e-5)
    q1, k1 = layer_inputs(B, H, KV, L, D, 2)
    plan = m.plan(1, q1, k1, ks, 0.3)
    assert torch.equal(plan.local_starts(), ls)
    kept = m.kept_sets()
    for b in range(B):  # the top of the scores after layer 0, ceil(f n) tokens with the local region
        n = L - int(ks[b])
        want_n = math.ceil(m.fraction(1) * n) - (L - int(ls[b]))
        order = sorted(range(int(ks[b]), int(ls[b])), key=lambda s: (-float(want[b, s]), s))
        assert plan_kept(plan, b) == set(order[:want_n])
    want = want + brute_scores(q1, k1, ks, ls, kept, 8, 0.3, dense=False)
    torch.testing.assert_close(st["score"].double(), want, atol=1e-4, rtol=1e-5)


def test_hand_built_importance_keeps_the_attended_tokens():
    """Every query attends (almost) only to keys 3 and 11 (large keys along the queries): after the
    dense first layer, the pruning layer keeps exactly those two of the global region."""
    L, D = 40, 8
    e = torch.eye(D)
    k = torch.randn(1, 1, L, D) * 0.01
    k[0, 0, 3], k[0, 0, 11] = 8 * e[0], 8 * e[0]
    q = e[0].expand(1, 2, L, D).clone()
    m = bound(SpAtten(keep=0.0, window=4, block_size=4), n_layers=2)
    ks = torch.zeros(1, dtype=torch.long)
    m.plan(0, q, k, ks, 1.0)
    local = L - 4  # L - window is a multiple of the block: the local region is the last 4 tokens
    m2 = bound(SpAtten(keep=(2 + 4) / L, window=4, block_size=4), n_layers=2)  # 6 tokens: 2 + the local 4
    m2.plan(0, q, k, ks, 1.0)
    plan = m2.plan(1, q, k, ks, 1.0)
    assert plan.local_start == local and plan_kept(plan, 0) == {3, 11}
    assert plan_kept(m.plan(1, q, k, ks, 1.0), 0) == set()  # keep 0: the local region alone


def test_cascade_pruned_tokens_stay_pruned():
    N, B, H, KV, L, D = 6, 2, 4, 2, 70, 8
    ks = torch.tensor([0, 11])
    m = bound(SpAtten(keep=0.2, window=8, block_size=8), n_layers=N)
    prev, sizes = None, []
    for layer in range(N):
        q, k = layer_inputs(B, H, KV, L, D, 10 + layer)  # new activations every layer
        plan = m.plan(layer, q, k, ks, 0.3)
        if layer == 0:
            assert plan is None
            continue
        sets = [plan_kept(plan, b) for b in range(B)]
        assert torch.equal(plan.kept_idx[:, 0], plan.kept_idx[:, 1])  # one set shared by the KV heads
        if prev is not None:
            assert all(sets[b] <= prev[b] for b in range(B)), layer  # the cascade
        prev = sets
        n = L - ks
        local = L - plan.local_starts()
        f = 0.2 ** (layer / (N - 1))
        assert [len(s) for s in sets] == (torch.ceil(f * n.double()).long() - local).clamp_min(0).tolist()
        sizes.append(len(sets[0]))
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
    assert m.fraction(N - 1) == pytest.approx(0.2)


def test_state_is_reset_per_prefill_and_rows_are_independent():
    N, H, KV, D = 3, 4, 2, 8
    m = bound(SpAtten(keep=0.3, window=8, block_size=8), n_layers=N)
    lengths, L = (64, 41), 64
    layers = [layer_inputs(2, H, KV, L, D, 20 + i) for i in range(N)]
    ks = torch.tensor([0, L - 41])
    batched = [m.plan(i, q, k, ks, 0.3) for i, (q, k) in enumerate(layers)]
    for r, n in enumerate(lengths):  # each row alone (a new prefill each time: the state resets)
        alone = [m.plan(i, q[r:r + 1, :, L - n:], k[r:r + 1, :, L - n:], torch.zeros(1, dtype=torch.long), 0.3,
                        padded=False) for i, (q, k) in enumerate(layers)]
        for a, p in zip(alone[1:], batched[1:]):
            assert {s + L - n for s in plan_kept(a, 0)} == plan_kept(p, r)
    # the same prompt twice gives the same plans (nothing carried over from the previous prefill)
    again = [m.plan(i, q, k, ks, 0.3) for i, (q, k) in enumerate(layers)]
    assert all(torch.equal(a.kept_idx, b.kept_idx) for a, b in zip(again[1:], batched[1:]))


def test_short_prompts_and_depth():
    q, k = layer_inputs(1, 2, 1, 12, 8, 0)
    ks = torch.zeros(1, dtype=torch.long)
    m = bound(SpAtten(window=8, block_size=4), n_layers=4)
    assert m.plan(1, q, k, ks, 0.3) is None  # 12 <= window + block: all recent
    late = bound(SpAtten(keep=0.5, start=0.5, window=4, block_size=4), n_layers=4)  # prunes from layer 2
    q, k = layer_inputs(1, 2, 1, 40, 8, 0)
    assert [late.plan(i, q, k, ks, 0.3) is None for i in range(4)] == [True, True, False, False]
    assert late.fraction(1) == 1 and late.fraction(3) == pytest.approx(0.5)
    with pytest.raises(RuntimeError, match="check_model"):
        SpAtten(window=4, block_size=4).plan(1, q, k, ks, 0.3)


@pytest.mark.parametrize("bad, match", [
    (dict(keep=1.5), "keep"), (dict(keep=-0.1), "keep"), (dict(start=-1.0), "start"),
    (dict(window=0), "window"), (dict(block_size=0), "block_size"), (dict(heads=0.0), "heads"),
    (dict(heads=1.5), "heads"),
])
def test_bad_knobs_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        SpAtten(**bad)


# -- model path ------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen3"])  # (gemma3's one full layer is dense: nothing to plan)
def test_keep_all_equals_dense(arch):
    assert_full_density_equals_dense(arch, SpAtten(keep=1.0, window=16, block_size=16))


def test_alone_equals_batched():
    assert_alone_equals_batched(SpAtten(keep=0.3, window=16, block_size=16))


def test_the_cache_keeps_only_the_kept_tokens():
    model = tiny("llama", num_hidden_layers=4).float()
    ids = torch.randint(0, 97, (1, 160))
    m = SpAtten(keep=0.25, window=16, block_size=16)
    with torch.no_grad(), enable(model, m) as session:
        session.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False, pad_token_id=0)
        layers = session.cache.tca_layers()
        kept = [layer.kept_tokens() // 2 for layer in layers]  # tokens per KV head (2 heads, the same set)
    assert kept[0] == 160  # the dense first layer keeps everything
    assert kept == sorted(kept, reverse=True)
    assert kept[-1] == math.ceil(0.25 * 160)  # the last layer keeps ceil(keep x n)
    assert session.cache.kept_fraction() < 0.7


def test_density_knob():
    assert registry.density_param("spatten") == "keep"
    spec = registry.at_density("spatten:window=16,block_size=16", 0.5, 4096)
    keep = registry.parse_spec(spec)[1]["keep"]
    assert 0 < keep < 0.5
    # the discrete schedule on a 32-layer model keeps about the asked fraction, averaged over layers
    m = bound(SpAtten(keep=keep, window=16, block_size=16), n_layers=32)
    mean = sum(max(m.fraction(i), (16 + 0) / 4096) for i in range(32)) / 32
    assert mean == pytest.approx(0.5, abs=0.02)
    assert keep_for(0.3, 4096, {}) < keep_for(0.6, 4096, {}) <= 1
    assert keep_for(1.0, 4096, {}) == 1.0


def test_registry_builds_it():
    m = registry.create("spatten:keep=0.4,window=32")
    assert isinstance(m, SpAtten) and m == SpAtten(keep=0.4, window=32)
    assert registry.normalize("spatten:block_size=16, keep=0.50") == "spatten:keep=0.5,block_size=16"
    with pytest.raises(ValueError, match="keep"):
        registry.create("spatten:keep=2")


def test_bench_methods_takes_the_sweeps():
    """The peers' sweeps of `tca bench methods --methods peers` expand into valid specs, these two included."""
    from tca_attention.benchmarks import bench_methods

    assert bench_methods.PEER_SWEEPS["token-sparse"] == "token-sparse:keep=0.25|0.5"
    assert bench_methods.PEER_SWEEPS["spatten"] == "spatten:keep=0.25|0.5"
    text = "token-sparse:coverage=0.005|0.05,min_tokens=1024; peers"
    args = bench_methods.parse_args(["--methods", text, "--out", "r.json"])
    assert args.specs[:2] == ["token-sparse:coverage=0.005,min_tokens=1024", "token-sparse:coverage=0.05,min_tokens=1024"]
    assert {"token-sparse:keep=0.25", "token-sparse:keep=0.5", "spatten:keep=0.25", "spatten:keep=0.5"} <= set(args.specs)


def test_hybrid_model_first_full_layer_is_dense():
    """gemma3 (sliding, full, sliding): the only full layer has no importance yet, so it stays dense."""
    model = tiny("gemma3").float()
    ids = torch.randint(0, 97, (1, 120))
    with torch.no_grad(), enable(model, SpAtten(keep=0.2, window=16, block_size=16)) as session:
        session.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False, pad_token_id=0)
        assert session.last_prefill[1]["kept_fraction"] is None  # planned nothing: dense


def test_eval_runs_both_new_methods(tmp_path, smol_tokenizer, monkeypatch):
    """`tca eval` on a tiny llama: spatten saves KV, token-sparse keeps it all but attends less."""
    from tca_attention.eval.methods import ModelBackend
    from tca_attention.eval.runner import EvalConfig, evaluate
    from test_eval_pipeline import tiny_llama

    monkeypatch.setenv("TCA_CACHE_DIR", str(tmp_path / "cache"))
    backend = ModelBackend("tiny-llama", device="cpu", model=tiny_llama(len(smol_tokenizer)), tokenizer=smol_tokenizer)
    tsa, sp = "token-sparse:keep=0.3,min_tokens=16,recent=32,start=0.0", "spatten:keep=0.3,window=32,block_size=16"
    cfg = EvalConfig(model="tiny-llama", methods=(tsa, sp), tasks=("niah_single",), lengths=(512,), samples=1)
    by = {r.method: r for r in evaluate(cfg, backend, tmp_path, progress=False)}
    assert by[tsa].kept_fraction == 1.0 and 0 < by[tsa].metadata["prefill_kept_fraction"] < 1
    assert 0 < by[sp].kept_fraction < 1 and by[sp].kv_bytes < by[sp].dense_kv_bytes


# -- cascade head pruning (an option, off by default) ------------------------------------------------
def test_head_keep_zeroes_dropped_heads():
    from tca_attention.engine import dispatch
    from tca_attention.methods.full_budget import FullBudget

    B, H, KV, L, D = 2, 4, 2, 48, 8
    q, k = layer_inputs(B, H, KV, L, D, 3)
    v = torch.randn(B, KV, L, D)
    ks = torch.tensor([0, 5])
    plan = FullBudget(window=8, block_size=8).plan(0, q, k, ks, 0.3)
    keep = torch.tensor([[True, False, True, True], [False, False, True, False]])
    full = dispatch.prefill(q, k, v, plan, 0.3, backend="reference")
    pruned = dispatch.prefill(q, k, v, replace(plan, head_keep=keep), 0.3, backend="reference")
    assert torch.equal(pruned[:, :, ~keep[0]][0], torch.zeros_like(pruned[0][:, ~keep[0]]))
    assert torch.equal(pruned.transpose(1, 2)[keep], full.transpose(1, 2)[keep])
    assert float(pruned.transpose(1, 2)[~keep].abs().max()) == 0


def test_head_pruning_is_a_cascade_by_output_magnitude():
    N, B, H, KV, L, D = 5, 1, 4, 2, 40, 8
    m = bound(SpAtten(keep=0.5, heads=0.25, window=8, block_size=8), n_layers=N)
    assert SpAtten().heads == 1  # off by default
    ks = torch.zeros(1, dtype=torch.long)
    sizes, prev = [], torch.ones(B, H, dtype=torch.bool)
    for layer in range(N):
        q, k = layer_inputs(B, H, KV, L, D, 30 + layer)
        plan = m.plan(layer, q, k, ks, 0.3)
        if layer == 0:
            assert plan is None
        else:
            assert bool((plan.head_keep <= prev).all())  # a dropped head stays dropped
            prev = plan.head_keep
            sizes.append(int(plan.head_keep.sum()))
            if layer == 1:  # chosen by the magnitudes of layer 0's outputs: head 1 is the weakest
                assert plan.head_keep[0].tolist() == [True, False, True, True]
        out = torch.ones(B, L, H, D) * torch.tensor([4.0, 1.0, 3.0, 2.0])[:, None] * (prev[0][:, None] if plan else 1)
        m.observe_prefill(layer, out)
    assert sizes == [math.ceil(0.25 ** (i / 4) * H) for i in range(1, 5)] and sizes[-1] == 1
    assert prev[0].tolist() == [True, False, False, False]


def test_head_pruning_model_path():
    m = SpAtten(keep=0.3, heads=0.5, window=16, block_size=16)
    assert_alone_equals_batched(m)
    model = tiny("llama", num_hidden_layers=3).float()
    ids = torch.randint(0, 97, (2, 100))
    with torch.no_grad(), enable(model, m) as session:
        session.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert m._state["heads"].sum(-1).tolist() == [3, 3]  # half of the 6 query heads at the last layer
