"""MInference: hand-built vertical and slash lines found, slash lines as blocks, the three patterns at
full counts = dense attention (prefill + decode, left padding), the offline search and its state
(round trip, refusal), batch invariance, and the registry (small blocks: 16)."""
from __future__ import annotations

import json

import pytest
import torch

from tca_attention import registry
from tca_attention.integration import enable
from tca_attention.integration.probe import ModelProbe
from tca_attention.methods import minference as mi
from tca_attention.methods.minference import (FORCED, PATTERNS, Calibration, MInference, PatternState,
                                              slash_blocks, vertical_slash_scores)
from tca_attention.methods.state import StateError
from test_head_split import CharTok
from method_checks import run
from tiny_models import tiny

BS = 16


def plan_lists(plan, b: int, h: int) -> list[list[int]]:
    ptr = plan.indptr[b, h].tolist()
    return [plan.indices[b, h, ptr[i]:ptr[i + 1]].tolist() for i in range(len(ptr) - 1)]


def lines_qk(n: int, offset: int, column: int, D: int = 80, A: float = 12.0):
    """q (1, 1, n, D), k (1, 1, n, D) with q_t . k_u = A [t - u = offset mod 64] + A [u = column]."""
    q, k = torch.zeros(1, 1, n, D), torch.zeros(1, 1, n, D)
    t = torch.arange(n)
    q[0, 0, t, t % 64] = A ** 0.5
    k[0, 0, t, (t + offset) % 64] = A ** 0.5
    q[0, 0, :, 70] = A ** 0.5
    k[0, 0, column, 70] = A ** 0.5
    return q, k


def test_hand_built_vertical_and_slash_lines_are_found():
    n, offset, column = 100, 40, 70  # keys u = t - 40 (one diagonal) and the column 70
    q, k = lines_qk(n, offset, column)
    col, diag = vertical_slash_scores(q, k, torch.tensor([n]), 1.0, last_q=64)
    assert torch.isinf(col[0, 0, :FORCED]).all() and torch.isinf(diag[0, 0, :FORCED]).all()
    assert int(col[0, 0, FORCED:].argmax()) + FORCED == column
    assert int(diag[0, 0, FORCED:].argmax()) + FORCED == offset
    # each of the 64 queries' attention sums to one: columns and diagonals both hold all of it
    assert float(col[0, 0, FORCED:].sum() + 0) < 64 and abs(float(diag[0, 0, FORCED:n].sum())) < 64
    m = MInference(pattern="vertical-slash", vertical=FORCED + 1, slash=FORCED + 1, block_size=BS)
    plan = m.plan(0, q, k, torch.zeros(1, dtype=torch.long), 1.0)
    plan.validate(1, 1, n)
    cols = plan.extra_cols[0, 0]
    assert all(sorted(c.tolist()) == list(range(FORCED)) + [column] for c in cols)
    # diagonals 0..29 cross block offsets 0, 1; diagonal 40 = 2 * 16 + 8 crosses offsets 2 and 3
    assert plan_lists(plan, 0, 0) == [list(range(max(0, i - 3), i + 1)) for i in range(-(-n // BS))]


def test_vertical_slash_scores_match_a_loop():
    gen = torch.Generator().manual_seed(0)
    H, KV, N, D, last_q = 4, 2, 48, 8, 16
    q, k = torch.randn(2, H, N, D, generator=gen), torch.randn(2, KV, N, D, generator=gen)
    n = torch.tensor([48, 11])  # the second row has fewer real tokens than last_q
    col, diag = vertical_slash_scores(q, k, n, 0.5, last_q)
    for b in range(2):
        for h in range(H):
            wc, wd = torch.zeros(N), torch.zeros(N)
            for t in range(max(0, int(n[b]) - last_q), int(n[b])):
                a = torch.softmax(q[b, h, t] @ k[b, h // 2, : t + 1].T * 0.5, 0)
                wc[: t + 1] += a
                for u in range(t + 1):
                    wd[t - u] += a[u]
            nb = int(n[b])
            torch.testing.assert_close(col[b, h, FORCED:nb], wc[FORCED:nb])
            torch.testing.assert_close(diag[b, h, FORCED:nb], wd[FORCED:nb])
            assert torch.isneginf(col[b, h, nb:]).all() and torch.isinf(col[b, h, :min(FORCED, nb)]).all()


def test_slash_blocks_cover_exactly_the_diagonals():
    nq, bs = 6, 16
    for offsets in ([0], [16], [17], [5, 40], [95]):
        got = slash_blocks(torch.tensor(offsets), nq, bs)
        want = torch.zeros(nq, nq, dtype=torch.bool)
        for i in range(nq):
            for t in range(i * bs, (i + 1) * bs):
                for o in offsets:
                    if t - o >= 0:
                        want[i, (t - o) // bs] = True
        assert torch.equal(got, want), offsets


def left_padded(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.randint(0, 97, (len(lengths), L), generator=gen)
    mask = torch.zeros(len(lengths), L, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, L - n:] = 1
    return ids, mask


@pytest.mark.parametrize("pattern", PATTERNS)
def test_full_counts_equal_dense(pattern):
    model = tiny("llama").double()
    ids, mask = left_padded((90, 83, 41))
    steps = torch.randint(0, 97, (3, 5), generator=torch.Generator().manual_seed(1))
    method = MInference(pattern=pattern, vertical=4096, slash=4096, last_q=16, block_size=BS)
    with torch.no_grad():
        ref = run(model, ids, mask, steps)
        with enable(model, method) as session:
            got = run(model, ids, mask, steps, session)
            report = session.prefill_report()
    assert report["kept_fraction"] == pytest.approx(1.0)
    valid = mask.bool()
    torch.testing.assert_close(got[0][valid], ref[0][valid], rtol=1e-5, atol=1e-6)  # the executor runs in fp32
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)


def test_small_counts_are_sparse_and_every_pattern_differs():
    gen = torch.Generator().manual_seed(4)
    q, k = torch.randn(1, 3, 160, 8, generator=gen), torch.randn(1, 3, 160, 8, generator=gen)
    ks = torch.zeros(1, dtype=torch.long)
    fracs, lists = {}, {}
    for p in PATTERNS:
        m = MInference(pattern=p, vertical=FORCED + 2, slash=FORCED + 4, last_q=16, block_size=BS)
        plan = m.plan(0, q, k, ks, 0.3)
        plan.validate(3, 3, 160)
        fracs[p] = float(plan.kept_fraction(160).mean())
        lists[p] = plan_lists(plan, 0, 0)
        assert fracs[p] < 0.9, p
        for i, blocks in enumerate(plan_lists(plan, 0, 0)):
            assert i in blocks  # the diagonal block: every query sees itself
    assert min(fracs.values()) > 0.2
    assert lists["a-shape"] != lists["vertical-slash"] != lists["block-sparse"] != lists["a-shape"]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_plan_alone_equals_plan_in_padded_batch(pattern, monkeypatch):
    gen = torch.Generator().manual_seed(7)
    lengths, H, KV, D = (150, 97, 40, 12), 4, 2, 8
    L = max(lengths)
    q, k = torch.randn(len(lengths), H, L, D, generator=gen) * 3, torch.randn(len(lengths), KV, L, D, generator=gen) * 3
    qs = [q[b, :, L - n:].clone() for b, n in enumerate(lengths)]
    kk = [k[b, :, L - n:].clone() for b, n in enumerate(lengths)]
    ks = torch.tensor([L - n for n in lengths])
    m = MInference(pattern=pattern, vertical=FORCED + 3, slash=FORCED + 5, last_q=16, block_size=BS)
    batched = m.plan(0, q, k, ks, 0.4)
    batched.validate(H, KV, L)
    monkeypatch.setattr(mi, "_CHUNK_ELEMENTS", 1)  # one query block per chunk: the same plan
    chunked = m.plan(0, q, k, ks, 0.4)
    assert torch.equal(chunked.indptr, batched.indptr) and torch.equal(chunked.indices, batched.indices)
    for r, n in enumerate(lengths):
        alone = m.plan(0, qs[r][None], kk[r][None], torch.zeros(1, dtype=torch.long), 0.4, padded=False)
        nb = -(-n // BS)
        for h in range(H):
            want = [list(range(i + 1)) for i in range(nb)] if alone is None else plan_lists(alone, 0, h)
            assert plan_lists(batched, r, h)[:nb] == want, (r, h)
            assert all(not x for x in plan_lists(batched, r, h)[nb:])
            if alone is not None and alone.extra_cols is not None:
                got, want_cols = batched.extra_cols[r, h, 0], alone.extra_cols[0, h, 0]
                assert sorted((got[got >= 0] - ks[r]).tolist()) == sorted(want_cols[want_cols >= 0].tolist())
        if alone is not None:
            torch.testing.assert_close(batched.kept_fraction(L)[r], alone.kept_fraction(n)[0])


def test_tiny_model_alone_equals_batched():
    model = tiny("qwen2").float()
    lengths = (120, 75)
    ids, mask = left_padded(lengths, seed=3)
    method = MInference(pattern="vertical-slash", vertical=FORCED + 2, slash=FORCED + 2, last_q=16, block_size=BS)
    with torch.no_grad(), enable(model, method) as session:
        batched = session.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert session.prefill_report()["kept_fraction"] < 1
        L = ids.shape[1]
        for r, n in enumerate(lengths):
            x = ids[r, L - n:][None]
            alone = session.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=5, do_sample=False,
                                     pad_token_id=0)
            assert torch.equal(batched[r, L:], alone[0, n:]), r


# -- the offline search and its state -----------------------------------------------------------
def test_choose_takes_the_highest_recall_with_the_tie_order():
    rec = torch.tensor([[0.9, 0.5, 0.7, 0.6], [0.8, 0.5, 0.7, 0.9], [0.7, 0.6, 0.7, 0.6]], dtype=torch.float64)
    assert mi.choose(rec) == ("a-shape", "block-sparse", "vertical-slash", "vertical-slash")


def test_search_on_a_tiny_model_round_trips_and_refuses_other_models(tmp_path, monkeypatch):
    monkeypatch.setenv("TCA_CACHE_DIR", str(tmp_path / "cache"))
    model = tiny("gemma3")  # sliding layers are left alone
    cal = Calibration(length=200, vertical=FORCED + 2, slash=FORCED + 10, last_q=16, block_size=BS, queries=32)
    state = mi.load_or_calibrate(ModelProbe(model), CharTok(), "tiny", cal, announce=False)
    assert state.layers[0] is None and state.layers[2] is None and len(state.layers[1]) == 6
    rec = state.calibration["recall"][1]
    for h, p in enumerate(state.layers[1]):  # the chosen pattern has the highest recall
        assert rec[h][PATTERNS.index(p)] == max(rec[h]) and 0 < max(rec[h]) <= 1
    path = mi.state_path_for(model, "tiny", cal)
    assert path.exists() and PatternState.load(path, model=model) == state
    assert mi.load_or_calibrate(ModelProbe(model), CharTok(), "tiny", cal, announce=False) == state  # cached
    with pytest.raises(StateError, match="do not fit"):
        PatternState.load(path, model=tiny("llama"))
    data = json.loads(path.read_text())
    for broken, match in (({**data, "version": 2}, "version"), ({**data, "format": "x"}, "not a"),
                          ({**data, "layers": data["layers"][:2]}, "one per layer"),
                          ({**data, "layers": [None, ["a-shape"] * 5 + ["diagonal"], None]}, "pattern names")):
        (tmp_path / "bad.json").write_text(json.dumps(broken))
        with pytest.raises(StateError, match=match):
            PatternState.load(tmp_path / "bad.json")
    # the calibrated method runs on the model, and refuses another one
    method = registry.create(f"minference:state={path},vertical=4096,slash=4096,last_q=16,block_size=16", model=model)
    assert method.state == state
    ids, mask = left_padded((90, 50))
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        with enable(model, method):
            got = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], rtol=1e-4, atol=1e-4)
    with pytest.raises(StateError):
        enable(tiny("llama"), method).__enter__()


def test_registry_grammar_and_the_scale_helper():
    m = registry.create("minference:pattern=a-shape,vertical=64,slash=256")
    assert isinstance(m, MInference) and m.counts == (64, 256) and m.state is None
    assert registry.normalize("minference: slash=100, pattern=block-sparse,scale=0.50") == \
        "minference:pattern=block-sparse,slash=100,scale=0.5"
    with pytest.raises(ValueError, match="needs head patterns"):
        registry.create("minference")
    with pytest.raises(ValueError, match="pattern must be"):
        registry.create("minference:pattern=diagonal")
    assert "minference" in registry.describe()
    with pytest.raises(ValueError, match="declares no density knob"):  # the cache keeps every token
        registry.at_density("minference:pattern=vertical-slash", 0.5, 1000)
    assert registry.expand("minference:pattern=a-shape,scale=0.5|1") == \
        ["minference:pattern=a-shape,scale=0.5", "minference:pattern=a-shape,scale=1"]
    assert 0 < mi.scale_for(0.1, 131072, {}) < mi.scale_for(0.4, 131072, {})
    # a-shape at that scale keeps about the target (token level; the blocks round up)
    for f in (0.1, 0.3, 0.6):
        scale = mi.scale_for(f, 4096, {"vertical": 64, "slash": 192})
        a = MInference(pattern="a-shape", vertical=64, slash=192, scale=scale, block_size=16)
        q = torch.zeros(1, 1, 4096, 8)
        got = float(a.plan(0, q, q, torch.zeros(1, dtype=torch.long), 1.0, padded=False).kept_fraction(4096))
        assert f <= got < f + 0.05, (f, got)


def test_plan_runs_on_the_triton_kernel():
    """Blocks and vertical columns through dispatch: the Triton kernel (interpreter) = the reference."""
    from kernel_helpers import DEV  # sets up the interpreter without CUDA
    from tca_attention.engine import dispatch

    gen = torch.Generator().manual_seed(9)
    H, KV, D, L = 4, 2, 16, 150
    q, k, v = (torch.randn(2, c, L, D, generator=gen) for c in (H, KV, KV))
    ks = torch.tensor([0, 37])
    q, k, v, ks = q.to(DEV), k.to(DEV), v.to(DEV), ks.to(DEV)
    m = MInference(pattern="vertical-slash", vertical=FORCED + 3, slash=FORCED + 2, last_q=16, block_size=BS)
    plan = m.plan(0, q, k, ks, D**-0.5)
    assert plan.extra_cols is not None and float(plan.kept_fraction(L).mean()) < 1
    tri = dispatch.prefill(q, k, v, plan, D**-0.5, backend="triton")
    ref = dispatch.prefill(q, k, v, plan, D**-0.5, backend="reference")
    assert float((tri - ref).abs().max()) <= 1e-4


def test_eval_sweeps_it(tmp_path, smol_tokenizer, monkeypatch):
    """Forced and searched patterns through `tca eval` (the search runs once, on the eval's model)."""
    from tca_attention.eval.methods import ModelBackend
    from tca_attention.eval.runner import EvalConfig, evaluate
    from test_eval_pipeline import tiny_llama

    monkeypatch.setenv("TCA_CACHE_DIR", str(tmp_path / "cache"))
    backend = ModelBackend("tiny-llama", device="cpu", model=tiny_llama(len(smol_tokenizer)), tokenizer=smol_tokenizer)
    sweep = "minference:pattern=vertical-slash|auto,vertical=32,slash=64,block_size=16"
    cfg = EvalConfig(model="tiny-llama", methods=("full", sweep), tasks=("niah_single",), lengths=(512,), samples=1)
    results = evaluate(cfg, backend, tmp_path, progress=False)
    assert len(results) == 3
    for r in results:
        if r.method.startswith("minference"):
            assert r.kept_fraction == 1.0 and r.kv_bytes == r.dense_kv_bytes  # the cache keeps everything
            assert 0 < r.metadata["prefill_kept_fraction"] < 1, r.method
    assert list((tmp_path / "cache" / "minference").glob("*.json"))  # the search's state, cached


def test_static_decode_equals_dynamic():
    """Decode is dense (the cache keeps everything): the static, graph-safe decode step gives the
    same greedy tokens as the dynamic one after a sparse prefill."""
    from tca_attention.integration.static_decode import greedy_static
    from test_batch_invariance import greedy

    model = tiny("llama")
    ids, mask = left_padded((150, 101, 45), seed=5)
    m = MInference(pattern="vertical-slash", vertical=FORCED + 2, slash=FORCED + 2, last_q=16, block_size=BS)
    assert m.supports_static_decode()
    with torch.no_grad(), enable(model, m, backend="reference") as session:
        _, _, want, _ = greedy(model, ids, mask, 10, session)
        assert session.prefill_report()["kept_fraction"] < 1
        run = greedy_static(model, ids, mask, max_new_tokens=11, session=session)
    assert torch.equal(run.sequences[:, ids.shape[1]: -1], want)


@pytest.mark.slow
def test_search_on_smollm2_finds_mostly_vertical_slash_heads():
    """The real default model (about a minute on 2 CPU cores): as in the paper's released configs,
    vertical-slash is the most common pattern, and the chosen pattern is never worse than the others."""
    from tca_attention.models import load_model

    model, tok = load_model("smollm2")
    state = mi.calibrate_patterns(ModelProbe(model), tok, Calibration(length=2048, vertical=16, slash=96))
    counts = state.counts()
    print("patterns:", counts)
    assert counts["vertical-slash"] > sum(counts.values()) / 2
    for layer, rec in zip(state.layers, state.calibration["recall"]):
        for p, r in zip(layer, rec):
            assert r[PATTERNS.index(p)] == max(r) and 0 < max(r) <= 1


def test_pattern_recall_is_one_at_full_counts_and_below_at_small_ones():
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(4, 200, 8, generator=gen) * 2, torch.randn(2, 200, 8, generator=gen) * 2
    full = mi.pattern_recall(q, k, 0.5, Calibration(vertical=400, slash=400, last_q=16, block_size=BS, queries=40))
    torch.testing.assert_close(full, torch.ones_like(full))
    small = mi.pattern_recall(q, k, 0.5, Calibration(vertical=FORCED + 1, slash=FORCED + 1, last_q=16, block_size=BS,
                                                     queries=40))
    assert small.shape == (3, 4) and bool(((small > 0) & (small < 1)).all())
