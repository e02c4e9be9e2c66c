"""TCA's per-request quality certificate, adaptive mode and selection options (issue 13 items 1-3),
on hand-built inputs where the right answer is known.

- certificate: retained mass equals a hand computation from the softmax rows and the plan's kept
  set, and the bound 2 gamma ||V||_inf holds against the measured error of the sparse attention's
  output against dense attention for the selection queries;
- adaptive (floor): every head's retained mass reaches the floor or keeps everything; it grows a
  cheap budget on spread attention and shrinks a dense one on concentrated attention;
- last_q / gqa=union: keeping every token equals dense; cases where each keeps the key the
  paper's rule misses.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tca_attention import registry
from tca_attention.engine import certificate
from tca_attention.engine.reference import sparse_prefill_ref
from tca_attention.integration import enable
from tca_attention.methods.state import ModelIdentity
from tca_attention.methods.tca.budgets import Budgets, HeadBudget
from tca_attention.methods.tca.candidates import candidate_ladder, keep_counts
from tca_attention.methods.tca.config import TCAConfig
from tca_attention.methods.tca.method import TCA
from tiny_models import tiny

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SCALE = 0.125


def budgets_with(config: TCAConfig, KV: int, layers: int, choice, ladder: torch.Tensor | None = None,
                 heads: int | None = None) -> Budgets:
    """Budgets without a model: head h of layer l picks candidate choice(l, h) (None = dense)."""
    ladder = candidate_ladder(config.block_size) if ladder is None else ladder
    C = ladder.shape[0]
    per_layer = []
    for li in range(layers):
        row = []
        for h in range(KV):
            c = choice(li, h)
            c = C if c is None else c
            sc = tuple(0.0 if i < c else 1.0 for i in range(C))
            row.append(HeadBudget(sc, sc))
        per_layer.append(tuple(row))
    H = heads or 2 * KV
    ident = ModelIdentity("llama", "fake", layers, H, KV, 64, H * 64, 97, (0.0,) * 8)
    return Budgets(ident, config, tuple(tuple(r) for r in ladder.tolist()), tuple(per_layer))


def one_hot_ladder(block_size: int, keep: int) -> torch.Tensor:
    """A one-candidate ladder: every block keeps `keep` tokens."""
    ks = keep_counts(block_size)
    return torch.tensor([[1.0 if k == keep else 0.0 for k in ks]], dtype=torch.float64)


def dense_out(q, k, v, key_start):
    """Causal attention in fp64, padding keys masked. q (B, H, L, D), k/v (B, KV, L, D) -> (B, H, L, D)."""
    B, H, L, D = q.shape
    g = H // k.shape[1]
    kk, vv = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    logits = q.double() @ kk.transpose(-1, -2) * SCALE
    ar = torch.arange(L)
    ok = (ar[None, :] <= ar[:, None])[None] & (ar[None, None, :] >= key_start[:, None, None])  # (B, L, L)
    logits = logits.masked_fill(~ok[:, None], float("-inf"))
    return torch.nan_to_num(torch.softmax(logits, -1)) @ vv


def kept_sets(plan, L: int) -> torch.Tensor:
    """(B, KV, L) bool: what the last query sees under the plan (kept global + local region)."""
    B, KV, _ = plan.kept_idx.shape
    mask = torch.zeros(B, KV, L + 1, dtype=torch.bool)
    idx = torch.where(torch.arange(plan.kept_idx.shape[-1])[None, None] < plan.kept_len[..., None].long(),
                      plan.kept_idx.cpu(), L)
    mask.scatter_(2, idx, True)
    mask = mask[..., :L]
    ls = plan.local_starts().cpu()
    return mask | (torch.arange(L)[None, :] >= ls[:, None])[:, None, :]


def lumpy_inputs(B, H, KV, L, D, gen):
    """Keys in a few heavy clusters so the last query's attention is spread unevenly."""
    q = torch.randn(B, H, L, D, generator=gen)
    k = torch.randn(B, KV, L, D, generator=gen)
    hot = torch.randint(0, L - 200, (B, KV, 12), generator=gen)
    for b in range(B):
        for h in range(KV):
            k[b, h, hot[b, h]] += 2.5 * q[b, 2 * h, -1]
    v = torch.randn(B, KV, L, D, generator=gen) * 2
    return q, k, v


# ---------------------------------------------------------------------------------------------
# 1. the certificate
@pytest.mark.parametrize("backend,opts", [
    ("reference", {}), ("reference", {"floor": 0.8}), ("reference", {"gqa": "union"}), ("reference", {"last_q": 6}),
    ("triton", {}), ("triton", {"floor": 0.8}), ("triton", {"gqa": "union"}), ("triton", {"last_q": 6}),
    ("triton", {"last_q": 5, "gqa": "union"}), ("triton", {"last_q": 6, "floor": 0.8}),
    ("reference", {"span": 5}), ("triton", {"span": 5}), ("triton", {"last_q": 6, "span": 3}),
    ("triton", {"gqa": "union", "span": 3}),
])
def test_certificate_hand_computed_and_bound_holds(backend, opts):
    B, KV, g, L, D = 2, 2, 2, 640, 64
    H, r = KV * g, opts.get("last_q", 1)
    cfg = TCAConfig(block_size=32, window=96)
    gen = torch.Generator().manual_seed(3)
    budgets = budgets_with(cfg, KV, 1, lambda l, h: (2, 5)[h], heads=H)
    q, k, v = lumpy_inputs(B, H, KV, L, D, gen)
    key_start = torch.tensor([0, 70])
    m = TCA(budgets, **opts)
    plan = m.plan(0, q.to(DEV), k.to(DEV), key_start.to(DEV), SCALE, backend=backend)  # selection: `backend`
    plan = dataclasses.replace(plan, **{f: getattr(plan, f).cpu() for f in ("kept_idx", "kept_len", "key_start",
                                                                          "decode_keep", "retained")},
                               row_local_start=plan.row_local_start.cpu())
    out = sparse_prefill_ref(q, k, v, plan, SCALE).double().transpose(1, 2)  # (B, H, L, D) the sparse attention
    ref = dense_out(q, k, v, key_start)
    bound = certificate.error_bound(plan.retained, v, key_start).double()

    # hand computation: the selection queries' causal softmax rows, their mass on what each attends:
    # the kept global keys, the local region, and its own window (which, for r > 1, may reach a
    # few keys before the local region)
    pos = torch.arange(L)
    qpos = L - r + torch.arange(r)
    in_window = pos[None, :] > qpos[:, None] - cfg.window  # (r, L)
    seen = kept_sets(plan, L)[:, :, None, :] | in_window[None, None]  # (B, KV, r, L)
    logits = q[:, :, -r:].double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2) * SCALE  # (B, H, r, L)
    ok = (pos[None, None, :] <= qpos[None, :, None]) & (pos[None, None, :] >= key_start[:, None, None])  # (B, r, L)
    a = torch.softmax(logits.masked_fill(~ok[:, None], float("-inf")), -1)
    kept_mass = (a * seen.repeat_interleave(g, 1)).sum(-1)  # (B, H, r): 1 - gamma_i per query
    if r > 1:  # some window really reaches before the local region here: the case is exercised
        assert bool((qpos[0] - cfg.window + 1 < plan.local_starts()).any())  # row 0 (row 1 has its blocks shifted by its padding)
    torch.testing.assert_close(plan.retained.double(), kept_mass.view(B, KV, g * r).mean(-1), rtol=0, atol=2e-6)
    assert float(kept_mass.min()) < 0.999  # the selection drops real mass: a test that can fail

    vinf = torch.stack([torch.stack([v[b, h, int(key_start[b]):].double().abs().sum(-1).max() for h in range(KV)])
                        for b in range(B)])  # (B, KV) ||V||_inf by hand
    err = (out[:, :, -r:] - ref[:, :, -r:]).abs().sum(-1)  # (B, H, r) ||Att_i - Att~_i||_1 of the selection queries
    assert bool((err > 1e-4).any())
    vq = vinf.repeat_interleave(g, 1)[..., None]  # (B, H, 1)
    per_query = 2 * (1 - kept_mass) * vq  # the paper's bound, query by query
    assert bool((err <= per_query + 1e-4 * vq).all()), (err, per_query)  # slack: fp32 attention vs fp64
    # the reported bound: on the mean over the selection queries of each KV head
    assert bool((err.view(B, KV, g * r).mean(-1) <= bound + 1e-4 * vinf).all())
    torch.testing.assert_close(bound, 2 * (1 - plan.retained.double()) * vinf, rtol=1e-5, atol=1e-5)


def test_session_report_per_layer_and_generate_fields():
    model = tiny("llama").float()
    cfg = TCAConfig(block_size=16, window=32)
    ident = ModelIdentity.of(model)
    budgets = budgets_with(cfg, ident.num_kv_heads, ident.num_layers, lambda l, h: (None if (l, h) == (0, 0) else 1),
                           heads=ident.num_heads)
    budgets = Budgets(ident, budgets.config, budgets.candidates, budgets.layers)
    ids = torch.randint(0, 97, (1, 150))
    with torch.no_grad(), enable(model, TCA(budgets)) as session:
        model(input_ids=ids, **session.cache_kwargs(session.new_cache()))
        rep = session.report()
    assert len(rep["layers"]) == ident.num_layers
    for row in rep["layers"]:
        assert 0.0 < row["retained_min"] <= row["retained_mean"] <= 1.0 + 1e-6
        assert 0.0 <= row["bound_mean"] <= row["bound_max"]
        assert len(row["heads"]["retained"]) == 1 and len(row["heads"]["retained"][0]) == ident.num_kv_heads
    assert rep["retained_min"] == min(r["retained_min"] for r in rep["layers"])
    assert rep["error_bound"] == max(r["bound_max"] for r in rep["layers"]) > 0
    assert rep["retained_min"] < 1  # the one-token-per-block budget drops mass


# ---------------------------------------------------------------------------------------------
# 2. adaptive mode
@pytest.mark.parametrize("floor", [0.75, 0.9, 0.99])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_floor_is_reached_or_everything_kept(floor, backend):
    B, KV, g, L, D = 2, 2, 2, 640, 64
    cfg = TCAConfig(block_size=32, window=96)
    gen = torch.Generator().manual_seed(5)
    q, k, _ = lumpy_inputs(B, KV * g, KV, L, D, gen)
    key_start = torch.tensor([0, 45])
    budgets = budgets_with(cfg, KV, 1, lambda l, h: 0)  # the cheapest candidate everywhere
    plain = TCA(budgets).plan(0, q, k, key_start, SCALE, backend="reference")
    plan = TCA(budgets, floor=floor).plan(0, q.to(DEV), k.to(DEV), key_start.to(DEV), SCALE, backend=backend)
    n_r = (L - key_start - cfg.window) // cfg.block_size
    everything = plan.kept_len.cpu() == (n_r * cfg.block_size)[:, None]
    assert bool(((plan.retained.cpu() >= floor - 1e-5) | everything).all())
    assert bool((plain.retained < floor).any())  # the calibrated budget falls short somewhere: it grew
    assert bool((plan.kept_len.cpu() >= plain.kept_len).all())
    if backend == "triton":  # the same selection as the reference
        ref = TCA(budgets, floor=floor).plan(0, q, k, key_start, SCALE, backend="reference")
        assert torch.equal(plan.kept_len.cpu(), ref.kept_len)
        M = int(ref.kept_len.max())
        assert torch.equal(plan.kept_idx.cpu()[..., :M], ref.kept_idx[..., :M])


def test_floor_shrinks_where_mass_is_concentrated():
    B, KV, g, L, D = 1, 2, 2, 512, 64
    cfg = TCAConfig(block_size=32, window=64)
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(B, KV * g, L, D, generator=gen)
    k = torch.randn(B, KV, L, D, generator=gen) * 0.1
    for h in range(KV):  # the last queries of both query heads look at key 40 only
        q[0, 2 * h:2 * h + 2, -1] = q[0, 2 * h, -1]
        k[0, h, 40] = 8 * q[0, 2 * h, -1]
    budgets = budgets_with(cfg, KV, 1, lambda l, h: None)  # dense by calibration
    dense_plan = TCA(budgets, dense_below=0).plan(0, q, k, torch.zeros(1, dtype=torch.long), SCALE, backend="reference")
    assert dense_plan is None  # every head dense: the plain method does not plan
    plan = TCA(budgets, floor=0.95).plan(0, q, k, torch.zeros(1, dtype=torch.long), SCALE, backend="reference")
    n = (L - cfg.window) // cfg.block_size
    assert bool((plan.kept_len < n * cfg.block_size).all())  # shrunk below dense
    assert bool((plan.retained >= 0.95).all())
    assert 40 in plan.kept_idx[0, 0].tolist()


# ---------------------------------------------------------------------------------------------
# 3. selection options
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("opts", [{"last_q": 8}, {"gqa": "union"}, {"last_q": 5, "gqa": "union"}, {"floor": 0.5},
                                  {"span": 7}, {"last_q": 4, "span": 15}])
def test_full_budget_options_equal_dense(opts, backend):
    B, KV, g, L, D = 2, 2, 2, 400, 32
    cfg = TCAConfig(block_size=16, window=48)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(B, KV * g, L, D, generator=gen)
    k = torch.randn(B, KV, L, D, generator=gen)
    v = torch.randn(B, KV, L, D, generator=gen)
    key_start = torch.tensor([0, 33])
    budgets = budgets_with(cfg, KV, 1, lambda l, h: 0, ladder=one_hot_ladder(16, 16))  # every block keeps all
    plan = TCA(budgets, **opts).plan(0, q.to(DEV), k.to(DEV), key_start.to(DEV), SCALE, backend=backend)
    plan = dataclasses.replace(plan, **{f: getattr(plan, f).cpu() for f in ("kept_idx", "kept_len", "key_start",
                                                                          "decode_keep", "retained")},
                               row_local_start=plan.row_local_start.cpu())
    n_r = (L - key_start - cfg.window) // cfg.block_size
    assert torch.equal(plan.kept_len.long(), (n_r * cfg.block_size)[:, None].expand(B, KV))
    out = sparse_prefill_ref(q, k, v, plan, SCALE)
    ref = dense_out(q, k, v, key_start).float()
    valid = torch.arange(L)[None, :] >= key_start[:, None]
    torch.testing.assert_close(out[valid], ref.transpose(1, 2)[valid], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(plan.retained, torch.ones(B, KV), rtol=0, atol=1e-5)


def _single_block_case(D=16):
    """One KV head, 2 query heads, block 16, window 16, L = 80: four global blocks, one kept token
    per block. Key 5 (block 0) is what the queries before the last look at; key 9 what the last
    query of head 0 looks at; key 12 what the last query of head 1 looks at."""
    L, H = 80, 2
    cfg = TCAConfig(block_size=16, window=16)
    e = torch.eye(D)
    q = torch.zeros(1, H, L, D)
    k = torch.zeros(1, 1, L, D)
    k[0, 0, 5], k[0, 0, 9], k[0, 0, 12] = 6 * e[0], 6 * e[1], 6 * e[2]
    q[0, :, :-1] = e[0]  # every earlier query: key 5
    q[0, 0, -1] = 1.2 * e[1]  # last query, head 0: key 9, a little more sharply than head 1 on key 12
    q[0, 1, -1] = e[2]
    budgets = budgets_with(cfg, 1, 1, lambda l, h: 0, ladder=one_hot_ladder(16, 1), heads=H)
    return q, k, budgets


def _kept(plan) -> set[int]:
    return set(plan.kept_idx[0, 0, : int(plan.kept_len[0, 0])].tolist())


def test_last_q_keeps_what_the_last_query_misses():
    q, k, budgets = _single_block_case()
    ks = torch.zeros(1, dtype=torch.long)
    paper = _kept(TCA(budgets).plan(0, q, k, ks, 1.0, backend="reference"))
    pooled = _kept(TCA(budgets, last_q=8).plan(0, q, k, ks, 1.0, backend="reference"))
    assert 9 in paper and 5 not in paper  # the last query alone keeps its own key of block 0
    assert 5 in pooled and 9 not in pooled  # 7 of the 8 pooled queries look at key 5


def test_gqa_union_keeps_each_query_heads_key():
    q, k, budgets = _single_block_case()
    ks = torch.zeros(1, dtype=torch.long)
    shared = _kept(TCA(budgets).plan(0, q, k, ks, 1.0, backend="reference"))
    union = _kept(TCA(budgets, gqa="union").plan(0, q, k, ks, 1.0, backend="reference"))
    assert 9 in shared and 12 not in shared  # one token per block: the mean keeps head 0's key only
    assert {9, 12} <= union and shared <= union


def test_span_keeps_the_neighbours_of_a_peak():
    """Every block of 16 keeps 4 tokens: the paper's rule keeps the peak (key 20) and the three
    isolated lesser keys (24, 26, 29) of block 1; span=3 keeps the peak with its two neighbours
    (19, 21), whose own importance is small but whose neighbourhood holds the peak, and the
    strongest lesser key. The budget, and the other blocks' counts, do not change."""
    L, D = 80, 16
    cfg = TCAConfig(block_size=16, window=16)
    e = torch.eye(D)
    q = torch.zeros(1, 2, L, D)
    q[0, :, -1] = e[0]
    k = torch.zeros(1, 1, L, D)
    k[0, 0, 20], k[0, 0, 26], k[0, 0, 29] = 6 * e[0], 3 * e[0], 3 * e[0]
    k[0, 0, 19], k[0, 0, 21], k[0, 0, 24] = 0.3 * e[0], 0.5 * e[0], 2 * e[0]
    budgets = budgets_with(cfg, 1, 1, lambda l, h: 0, ladder=one_hot_ladder(16, 4), heads=2)
    ks = torch.zeros(1, dtype=torch.long)
    for backend in ("reference", "triton"):
        paper = TCA(budgets).plan(0, q.to(DEV), k.to(DEV), ks.to(DEV), 1.0, backend=backend)
        span = TCA(budgets, span=3).plan(0, q.to(DEV), k.to(DEV), ks.to(DEV), 1.0, backend=backend)
        assert _kept(paper) & set(range(16, 32)) == {20, 24, 26, 29}
        assert _kept(span) & set(range(16, 32)) == {19, 20, 21, 26}
        assert torch.equal(paper.kept_len, span.kept_len)  # same budget: 4 tokens in each of 4 blocks
        assert int(span.kept_len[0, 0]) == 16
        assert float(span.retained[0, 0]) < float(paper.retained[0, 0])  # what the last query loses, reported


def test_last_q_one_is_the_paper_rule_bit_for_bit():
    B, KV, g, L, D = 2, 2, 2, 300, 32
    cfg = TCAConfig(block_size=16, window=32)
    gen = torch.Generator().manual_seed(4)
    q, k = torch.randn(B, KV * g, L, D, generator=gen), torch.randn(B, KV, L, D, generator=gen)
    budgets = budgets_with(cfg, KV, 1, lambda l, h: 3)
    ks = torch.tensor([0, 21])
    a = TCA(budgets).plan(0, q, k, ks, SCALE, backend="reference")
    b = TCA(budgets, last_q=1, gqa="shared", floor=0.0).plan(0, q, k, ks, SCALE, backend="reference")
    assert torch.equal(a.kept_idx, b.kept_idx) and torch.equal(a.retained, b.retained)


def test_specs_and_validation():
    cfg = TCAConfig(block_size=16, window=32)
    budgets = budgets_with(cfg, 2, 1, lambda l, h: 3)
    m = registry.create("tca:last_q=16,gqa=union", budgets=budgets)
    assert (m.last_q, m.gqa, m.floor, m.fused) == (16, "union", 0.0, True)  # every option runs fused
    assert registry.normalize("tca:floor=0.9,last_q=4") == "tca:last_q=4,floor=0.9"
    assert registry.create("tca:floor=0.9", budgets=budgets).fused
    assert "selection" in registry.create("tca:last_q=4", budgets=budgets).report()
    # as `tca eval` builds its methods: the run's budgets handed in, dense_below pinned
    from tca_attention.eval.methods import expand_method

    labels = [m.label for m in expand_method("tca:last_q=16|1,gqa=union")]
    assert labels == ["tca:last_q=16,gqa=union", "tca:last_q=1,gqa=union"]
    m = registry.create(labels[0], model=None, tokenizer=None, budgets=budgets, dense_below=0)
    assert (m.last_q, m.gqa, m.dense_below) == (16, "union", 0)
    with pytest.raises(ValueError, match="do not combine"):
        registry.create("tca:gqa=union,floor=0.9", budgets=budgets)
    with pytest.raises(ValueError, match="last_q"):
        TCA(budgets, last_q=33)
    with pytest.raises(ValueError, match="gqa"):
        TCA(budgets, gqa="mean")
    with pytest.raises(ValueError, match="floor"):
        TCA(budgets, floor=1.5)
    assert registry.create("tca:span=7,last_q=4", budgets=budgets).span == 7
    for bad in (2, 0, 17, True):
        with pytest.raises(ValueError, match="span must be an odd int"):
            TCA(budgets, span=bad)
    with pytest.raises(ValueError, match="floor .* and span do not combine"):
        TCA(budgets, span=3, floor=0.9)


def test_eval_summary_carries_the_certificate():
    from tca_attention.eval.report import summarize
    from tca_attention.eval.schema import Result

    def res(method, sid, **meta):
        return Result(sid, "niah", 4096, method, "m", 1.0, "exact", "x", ("x",), 4096, 0.5, 10, 20, 0.1,
                      metadata=meta)

    rs = [res("tca", "a", retained=0.9, retained_min=0.7, error_bound=3.0),
          res("tca", "b", retained=0.8, retained_min=0.75, error_bound=5.0), res("full", "a"), res("full", "b")]
    cells = summarize(rs)["models"]["m"]["methods"]
    tca = cells["tca"]["lengths"]["4096"]
    assert tca["retained_mean"] == pytest.approx(0.85) and tca["retained_min"] == 0.7
    assert tca["error_bound_mean"] == pytest.approx(4.0) and tca["error_bound_max"] == 5.0
    assert "retained_mean" not in cells["full"]["lengths"]["4096"]


# ---------------------------------------------------------------------------------------------
# the options on the model path (tiny llama): keeping everything equals dense; alone equals batched
def _model_budgets(model, ladder: torch.Tensor | None, choice) -> Budgets:
    ident = ModelIdentity.of(model)
    b = budgets_with(TCAConfig(block_size=16, window=16), ident.num_kv_heads, ident.num_layers, choice,
                     ladder=ladder, heads=ident.num_heads)
    return Budgets(ident, b.config, b.candidates, b.layers)


OPTIONS = [{"last_q": 8}, {"gqa": "union"}, {"floor": 0.9}, {"span": 5}]


@pytest.mark.parametrize("opts", OPTIONS)
def test_options_keeping_everything_equal_dense_on_a_model(opts):
    from method_checks import assert_full_density_equals_dense

    budgets = _model_budgets(tiny("llama"), one_hot_ladder(16, 16), lambda l, h: 0)
    assert_full_density_equals_dense("llama", TCA(budgets, **opts))


@pytest.mark.parametrize("opts", [*OPTIONS[:2], {"floor": 0.5}, {"span": 5}])  # 0.9 keeps all on a random model
def test_options_alone_equals_batched(opts):
    from method_checks import assert_alone_equals_batched

    budgets = _model_budgets(tiny("llama"), None, lambda l, h: (1, 4)[h % 2])
    assert_alone_equals_batched(TCA(budgets, **opts))
