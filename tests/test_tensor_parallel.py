"""Tensor parallelism (docs/tensor_parallel.md): every method under transformers' own tensor
parallelism (tp_plan="auto", torchrun, gloo on the CPU, 2 ranks) answers as it does in one process.

One torchrun launch (tests/tp_worker.py) runs every case of tests/tp_cases.py on a tiny Llama (6
query heads, 2 KV heads: one KV head and three query heads per rank) with per-head state made by
hand so that neighbouring heads differ, then tries a model whose 3 KV heads do not divide by 2.
The same cases run in this process are the reference. float64 weights: the ranks' sums in the
row-parallel projections differ from one process's only in rounding, far below the tolerance;
the sparse executors accumulate in float32 (engine/reference.py), hence a float32 tolerance.
SpAtten, Token Sparse and DHSA (their plans combine the heads of a layer) run their sums over the
ranks: in the torchrun launch, and in this process over 2 simulated ranks (threads) on hand-made
inputs; both with a negative control (the sums over a rank's heads alone answer otherwise).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import tp_cases
from tca_attention.integration import adapter, enable, tensor_parallel
from tca_attention.integration.adapter import LOAD_KWARGS, AdapterError
from tca_attention.integration.tensor_parallel import HeadShard, TensorParallelError, shard_method
from tca_attention.methods.base import ONE_PROCESS, HeadGroup
from tca_attention.methods.head_split import HeadSplit
from tca_attention.methods.streaming import StreamingLLM
from tca_attention.methods.tca.method import TCA
from tiny_models import ARCHS, tiny

TESTS = Path(__file__).parent
WORLD = 2
# methods whose cache layout does not depend on which heads share a layer: the ranks' KV bytes add
# up to one process's exactly. TCA and the head split store a layer whose heads are all dense on a
# rank as a plain cache on that rank (prefill by SDPA, left padding held, as one process does for a
# layer that is dense as a whole): the same answers, a slightly different byte count.
SAME_LAYOUT = ("full", "full-budget", "minference", "streaming", "quest", "xattention", "flexprefill", "blasst", "hip",
               "longheads", *tp_cases.COMBINING)
# families whose tp_plan gathers q/k/v (q/k norms over all heads; a fused qkv projection)
WHOLE_HEADS = ("phi3", "olmo2")


@dataclass(frozen=True)
class Runs:
    ref: dict  # case -> outputs in one process
    whole: dict  # TCA on the model whose every rank sees every head, in one process
    families: dict  # architecture -> the family sweep's outputs in one process
    ranks: list  # per rank: {"cases": case -> outputs, "whole": outputs, "bad": (error type, message)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    root = tmp_path_factory.mktemp("tp")
    tiny("llama").save_pretrained(root / "llama")
    tp_cases.calibrate(tiny("llama"), root / "budgets.json")  # in one process; every rank loads the file
    for arch in ARCHS:
        tiny(arch).save_pretrained(root / "families" / arch)
    tiny("olmo2").save_pretrained(root / "olmo2")  # q/k norms over all heads: its tp_plan gathers q, k, v
    tiny("llama", num_key_value_heads=3).save_pretrained(root / "llama_kv3")  # 3 KV heads over 2 ranks
    out = root / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           str(TESTS / "tp_worker.py"), *(str(root / m) for m in ("llama", "olmo2", "llama_kv3")), str(out),
           str(root / "budgets.json"), str(root / "families")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    model = AutoModelForCausalLM.from_pretrained(root / "llama", dtype=torch.float64, **LOAD_KWARGS).eval()
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, **LOAD_KWARGS).eval()  # noqa: E731
    whole = load(root / "olmo2")
    families = {a: tp_cases.run_case(load(root / "families" / a), a, tp_cases.family_method()) for a in ARCHS}
    return Runs(tp_cases.run_all(model, root / "budgets.json"), tp_cases.run_case(whole, "tca", tp_cases.methods(whole)["tca"]),
                families, ranks)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    bound = 64 * torch.finfo(torch.float32).eps * float(want.abs().max())
    assert float((got - want).abs().max()) <= bound


@pytest.mark.parametrize("name", (*tp_cases.NAMES, tp_cases.CALIBRATED))
def test_tensor_parallel_equals_one_process(runs: Runs, name: str) -> None:
    ref = runs.ref[name]
    for rank, r in enumerate(runs.ranks):
        got = r["cases"][name]
        assert got["shard"] == {"rank": rank, "world": WORLD, "kv_heads": [rank, rank + 1],
                                "query_heads": [3 * rank, 3 * rank + 3]}
        _close(got["prefill"], ref["prefill"])  # left-padded batch, every real position
        _close(got["decode"], ref["decode"])  # teacher-forced decode over the rank's own cache
        assert torch.equal(got["generate"], ref["generate"])
        assert torch.equal(got["alone"], ref["alone"])  # one unpadded prompt
        rep, want = got["report"], ref["report"]
        assert rep["tensor_parallel"] == {"world": WORLD, "heads_sharded": True}
        numbers = {"kept_fraction": 1e-12, "retained": 1e-5, "retained_min": 1e-5,  # the certificate: float32
                   "error_bound": 1e-5, "error_bound_mean": 1e-5}
        for key, rel in numbers.items():
            assert (rep[key] is None) == (want[key] is None), key  # None: plain attention, or no scores
            if want[key] is not None:
                assert rep[key] == pytest.approx(want[key], rel=rel, abs=1e-9), key
        assert {k: v for k, v in rep.items() if k not in {*numbers, "tensor_parallel"}} == \
               {k: v for k, v in want.items() if k not in numbers}
    for key in ("prefill", "decode", "generate"):  # every rank answers the same (the logits are gathered)
        assert torch.equal(runs.ranks[0]["cases"][name][key], runs.ranks[1]["cases"][name][key])


@pytest.mark.parametrize("name", (*tp_cases.NAMES, tp_cases.CALIBRATED))
def test_kv_bytes_are_per_rank_and_summed(runs: Runs, name: str) -> None:
    local = [r["cases"][name]["local_kv_bytes"] for r in runs.ranks]
    total = runs.ranks[0]["cases"][name]["cache"]
    assert runs.ranks[1]["cases"][name]["cache"] == total
    assert total["kv_bytes"] == sum(local)  # the report sums the ranks' own caches
    assert all(0 < b < total["kv_bytes"] for b in local)  # each rank holds only its heads' KV
    ref = runs.ref[name]["cache"]
    assert total["dense_kv_bytes"] == ref["dense_kv_bytes"]
    if name in SAME_LAYOUT:
        assert total == ref
        assert local[0] == local[1] == ref["kv_bytes"] // WORLD
    else:  # see SAME_LAYOUT: within the left padding a plain cache holds
        assert ref["kv_bytes"] * 0.95 <= total["kv_bytes"] < total["dense_kv_bytes"]


def test_each_rank_runs_its_own_heads_state(runs: Runs) -> None:
    """The per-head state each rank ran is its slice of the one state every rank loaded."""
    model = tiny("llama")
    full = tp_cases.methods(model)
    for rank, r in enumerate(runs.ranks):
        tca = r["cases"]["tca"]["method"]
        assert tca.budgets.layers == tuple(row[rank:rank + 1] for row in full["tca"].budgets.layers)
        calibrated = r["cases"][tp_cases.CALIBRATED]["method"].budgets  # the file, loaded and checked on the rank
        assert calibrated.layers == tuple(row[rank:rank + 1] for row in runs.ref[tp_cases.CALIBRATED]["method"].budgets.layers)
        split = r["cases"]["head-split"]["method"]
        # retrieval heads ranked over the whole model: KV head 0 of both layers, both on rank 0
        assert split.kinds(0) == split.kinds(1) == (("dense",) if rank == 0 else ("streaming",))
        mi = r["cases"]["minference"]["method"]
        assert mi.state.layers == tuple(row[3 * rank:3 * rank + 3] for row in full["minference"].state.layers)


def test_per_head_state_changes_the_answer() -> None:
    """The equality above can fail: a rank running the other rank's heads' state answers otherwise."""
    m = tiny("llama").double()
    swapped = TCA(tp_cases.tca_budgets(m, tuple(row[::-1] for row in tp_cases.TCA_CHOICES)), dense_below=0)
    got = tp_cases.run_case(m, "tca", swapped)
    base = tp_cases.run_case(m, "tca", tp_cases.methods(m)["tca"])
    assert float((got["prefill"] - base["prefill"]).abs().max()) > 1e-3


def test_a_plan_that_gathers_the_heads_runs_every_head_on_every_rank(runs: Runs) -> None:
    """OLMo2's tp_plan gathers q/k/v (its q/k norms span all heads): every rank attends over every
    head with the whole state and holds the whole cache (the summed bytes count every copy)."""
    for rank, r in enumerate(runs.ranks):
        got = r["whole"]
        assert got["shard"] == {"rank": rank, "world": WORLD, "kv_heads": [0, 2], "query_heads": [0, 6]}
        assert got["report"]["tensor_parallel"] == {"world": WORLD, "heads_sharded": False}
        _close(got["prefill"], runs.whole["prefill"])
        _close(got["decode"], runs.whole["decode"])
        assert torch.equal(got["generate"], runs.whole["generate"])
        assert got["local_kv_bytes"] == runs.whole["cache"]["kv_bytes"]
        assert got["cache"]["kv_bytes"] == WORLD * runs.whole["cache"]["kv_bytes"]
        assert got["method"].budgets == runs.whole["method"].budgets  # nothing sliced


@pytest.mark.parametrize("arch", ARCHS)
def test_every_tested_architecture_runs_tensor_parallel(runs: Runs, arch: str) -> None:
    """Each family of the architecture table under its own tp_plan: Llama, Qwen2/3, Mistral and
    Gemma2/3 (sliding-window layers left to SDPA) split the heads; Phi-3 and OLMo2 gather them."""
    ref = runs.families[arch]
    whole = arch in WHOLE_HEADS
    for rank, r in enumerate(runs.ranks):
        got = r["families"][arch]
        assert got["shard"]["kv_heads"] == ([0, 2] if whole else [rank, rank + 1])
        _close(got["prefill"], ref["prefill"])
        _close(got["decode"], ref["decode"])
        assert torch.equal(got["generate"], ref["generate"])
        assert got["cache"]["kv_bytes"] == (WORLD if whole else 1) * ref["cache"]["kv_bytes"]


@pytest.mark.parametrize("name", list(tp_cases.COMBINING))
def test_a_method_combining_the_heads_needs_its_sums_over_the_ranks(runs: Runs, name: str) -> None:
    """The negative control of the combining methods: a rank summing (and ranking) over its own heads
    alone answers otherwise than one process (the equality above comes from the reductions)."""
    ref = runs.ref[name]["prefill"]
    for r in runs.ranks:
        assert float((r["alone"][name] - ref).abs().max()) > 1e-3


@pytest.mark.parametrize("name", list(tp_cases.COMBINING))
def test_a_method_combining_the_heads_is_sparse_on_the_cases(runs: Runs, name: str) -> None:
    """The cases exercise the combined selection: each method drops something on the padded batch."""
    assert runs.ref[name]["report"]["kept_fraction"] < 1


def test_a_method_combining_the_heads_runs_in_one_process_when_every_rank_has_them(monkeypatch) -> None:
    """With a tp_plan that gathers the heads, every rank runs the whole method over its own heads:
    nothing to reduce (the session lends ONE_PROCESS)."""
    from tca_attention import registry

    model = tiny("llama")
    layout = adapter.TensorParallelLayout(rank=1, world=WORLD, heads_sharded=False, style="colwise_gather_output")
    monkeypatch.setattr(adapter, "tensor_parallel_layout", lambda m: layout)
    with torch.no_grad(), enable(model, registry.create(tp_cases.COMBINING["spatten"], model=model)) as session:
        assert session.shard == HeadShard(1, WORLD, (0, 2), (0, 6), 2, 6)
        assert session.heads is ONE_PROCESS
        model(torch.randint(0, 97, (1, 40)), **session.cache_kwargs(session.new_cache()))


def test_heads_of_a_split_shard_reduce_over_the_tp_group() -> None:
    """The HeadGroup a session lends: the TP group's when the heads are split, else this process."""

    assert tensor_parallel.heads_of(None) is ONE_PROCESS
    assert tensor_parallel.heads_of(HeadShard(0, WORLD, (0, 2), (0, 6), 2, 6)) is ONE_PROCESS
    heads = tensor_parallel.heads_of(shard(1))
    assert isinstance(heads, tensor_parallel.RankHeads) and (heads.rank, heads.world) == (1, WORLD)
    whole = torch.arange(12).view(2, 6)
    assert torch.equal(heads.own(whole, 1), whole[:, 3:])


def test_heads_that_do_not_divide_by_the_world_size_are_refused(runs: Runs) -> None:
    for r in runs.ranks:
        kind, message = r["bad"]
        assert kind == "TensorParallelError", r.get("bad_traceback")
        assert "2 ranks" in message and "3 KV heads" in message


# -- in one process: the slicing and the checks ----------------------------------------------------
def shard(rank: int, kv: int = 2, heads: int = 6) -> HeadShard:
    k, q = kv // WORLD, heads // WORLD
    return HeadShard(rank, WORLD, (rank * k, rank * k + k), (rank * q, rank * q + q), kv, heads)


def test_shard_method_slices_declared_per_head_state_only() -> None:
    model = tiny("llama")
    full = tp_cases.methods(model)
    streaming = full["streaming"]
    assert shard_method(streaming, shard(1)) is streaming  # nothing per head: the method as it is
    whole = HeadShard(0, WORLD, (0, 2), (0, 6), 2, 6)  # every rank holds every head (a gathered k_proj)
    assert shard_method(full["tca"], whole) is full["tca"]
    tca = shard_method(full["tca"], shard(1))
    assert isinstance(tca, TCA) and tca.budgets.layers == tuple(r[1:] for r in full["tca"].budgets.layers)
    assert tca.budgets.model == full["tca"].budgets.model  # identity of the whole model (checked once, whole)
    assert tca.decode_keep(0, 1).shape == (1,)
    assert full["tca"].budgets.layers[0] is not None and len(full["tca"].budgets.layers[0]) == 2  # untouched
    split = shard_method(full["head-split"], shard(1))
    assert isinstance(split, HeadSplit) and split.scores == full["head-split"].scores  # ranked whole
    assert [split.kinds(i) for i in (0, 1)] == [("streaming",), ("streaming",)]


def test_per_head_table_of_the_wrong_size_is_refused() -> None:
    model = tiny("llama")
    with pytest.raises(TensorParallelError, match="has 2 entries; the model has 4 KV heads"):
        shard_method(tp_cases.methods(model)["tca"], shard(0, kv=4, heads=12))


def test_single_process_model_has_no_shard() -> None:
    assert tensor_parallel.shard_of(tiny("llama")) is None


def test_attention_with_other_heads_than_the_shard_raises(monkeypatch) -> None:
    """A rank whose attention gets other heads than its tp_plan says is refused on the first call."""
    model = tiny("llama")
    layout = adapter.TensorParallelLayout(rank=1, world=WORLD, heads_sharded=True, style="colwise")
    monkeypatch.setattr(adapter, "tensor_parallel_layout", lambda m: layout)
    with enable(model, StreamingLLM(sinks=4, window=16, block_size=16)) as session:
        assert session.shard == shard(1)
        with pytest.raises(AdapterError, match="got 6 query and 2 KV heads; .* holds query heads \\[3, 6\\]"), \
                torch.no_grad():
            model(torch.randint(0, 97, (1, 20)), **session.cache_kwargs(session.new_cache()))


def test_calibration_under_tensor_parallelism_is_refused(monkeypatch) -> None:
    from tca_attention.integration.hf import Session

    model = tiny("llama")
    layout = adapter.TensorParallelLayout(rank=0, world=WORLD, heads_sharded=True, style="colwise")
    monkeypatch.setattr(adapter, "tensor_parallel_layout", lambda m: layout)
    with pytest.raises(TensorParallelError, match="calibrate in one process"):
        Session(model, None, observer=lambda *a: None)


@pytest.mark.slow
def test_bench_tp_runs_on_two_cpu_ranks(tmp_path) -> None:
    """`bench_tp` (the GPU benchmark) end to end on 2 gloo ranks with a tiny shape: the figures of
    every rank are gathered, the KV of the ranks adds up, TCA keeps less than dense, the plot draws."""
    budgets = tmp_path / "budgets.json"
    tp_cases.calibrate(tiny("llama"), budgets)  # any calibration: mapped onto the bench's shape
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    out = tmp_path / "tp2.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", "-m",
           "tca_attention.benchmarks.bench_tp", "--shape", "tiny", "--lengths", "256", "--decode-steps", "2",
           "--budgets", str(budgets), "--tau", "0.5", "--workdir", str(tmp_path), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = json.loads(out.read_text())
    assert result["meta"]["world"] == WORLD and result["meta"]["backend"] == "gloo"
    (row,) = result["rows"]
    for key in ("dense", "tca"):
        assert len(row[key]["kv_gib_per_rank"]) == WORLD
        assert sum(row[key]["kv_gib_per_rank"]) == pytest.approx(row[key]["kv_gib"])
    assert row["tca"]["kv_gib"] < row["dense"]["kv_gib"] and row["tca"]["kept_fraction"] < 1
    from tca_attention.benchmarks import bench_tp

    bench_tp.plot(str(tmp_path / "tp.png"), [str(out)])
    assert (tmp_path / "tp.png").stat().st_size > 10_000


# -- the combining methods' plans over simulated ranks (threads), hand-made inputs ------------------
class _Exchange:
    """What every simulated rank put in, once all of them have (a collective over threads)."""

    def __init__(self, world: int) -> None:
        import threading

        self.barrier, self.slots = threading.Barrier(world), [None] * world


@dataclass(frozen=True)
class ThreadHeads(HeadGroup):
    box: _Exchange | None = None

    def _all(self, t: torch.Tensor) -> list[torch.Tensor]:
        self.box.slots[self.rank] = t.clone()
        self.box.barrier.wait()
        out = list(self.box.slots)
        self.box.barrier.wait()  # nobody overwrites a slot before every rank has read them all
        return out

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return sum(self._all(t))

    def gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.cat(self._all(t), dim)


def _dense(q, k, v, ks) -> torch.Tensor:
    """Causal attention over the real keys (q (B, H, L, D), k/v (B, KV, L, D)) -> (B, L, H, D)."""
    g, L = q.shape[1] // k.shape[1], q.shape[2]
    pos = torch.arange(L)
    mask = (pos[None, :] <= pos[:, None])[None] & (pos[None, None, :] >= ks[:, None, None])
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=mask[:, None])
    return out.nan_to_num(0.0).transpose(1, 2)


def _prefill_layers(spec: str, inputs, heads=None, q_slice=slice(None), kv_slice=slice(None)) -> list[torch.Tensor]:
    """Every layer's prefill output (B, L, H, D) of a fresh method on the given heads of the inputs."""
    from tca_attention import registry
    from tca_attention.engine import dispatch

    method = registry.create(spec, model=tiny("llama"))
    method.check_model(tiny("llama"))
    kw = {} if heads is None else {"heads": heads}
    outs = []
    for idx, (q, k, v, ks) in enumerate(inputs):
        q, k, v = q[:, q_slice], k[:, kv_slice], v[:, kv_slice]
        plan = method.plan(idx, q, k, ks, q.shape[-1] ** -0.5, backend="reference", **kw)
        out = _dense(q, k, v, ks) if plan is None else dispatch.prefill(q, k, v, plan, q.shape[-1] ** -0.5, "reference")
        method.observe_prefill(idx, out)
        outs.append(out)
    return outs


@pytest.mark.parametrize("name", list(tp_cases.COMBINING))
def test_combining_plans_over_simulated_ranks_equal_one_process(name: str) -> None:
    """Each combining method planned by 2 ranks (threads, each holding 3 of 6 query heads and 1 of 2
    KV heads, sums and gathers through ThreadHeads) gives every head the output one process gives;
    with ONE_PROCESS on the same slices (no reduction) the outputs differ."""
    import threading

    gen = torch.Generator().manual_seed(11)
    B, H, KV, L, D = 2, 6, 2, 96, 16
    ks = torch.tensor([0, 13])
    inputs = []
    for _ in range(2):  # 2 layers; the heads' keys and queries differ in scale, so their sums do
        scale = torch.tensor([0.5, 3.0]).repeat_interleave(H // KV)[None, :, None, None]
        q = torch.randn(B, H, L, D, generator=gen) * scale
        k = torch.randn(B, KV, L, D, generator=gen) * scale[:, ::3]
        inputs.append((q, k, torch.randn(B, KV, L, D, generator=gen), ks))
    spec = tp_cases.COMBINING[name]
    whole = _prefill_layers(spec, inputs)
    box, got = _Exchange(WORLD), [None] * WORLD

    def rank(r: int) -> None:
        got[r] = _prefill_layers(spec, inputs, ThreadHeads(r, WORLD, box), slice(3 * r, 3 * r + 3), slice(r, r + 1))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(WORLD)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for layer, want in enumerate(whole):
        assert torch.allclose(torch.cat([got[r][layer] for r in range(WORLD)], 2), want, atol=1e-5)
    alone = [_prefill_layers(spec, inputs, None, slice(3 * r, 3 * r + 3), slice(r, r + 1))[-1] for r in range(WORLD)]
    assert float((torch.cat(alone, 2) - whole[-1]).abs().max()) > 1e-3


@pytest.mark.parametrize("spec,why", [("tokenselect:vote=all", "vote=all"), ("recycled:similarity=0.5", "similarity")])
def test_split_heads_refuse_a_decode_selection_over_every_head(monkeypatch, spec, why):
    """A rank holding half of the KV heads refuses a method whose decode selection combines every head
    of a layer (Method.split_heads_refusal), naming the setting to change; the per-head setting runs."""
    from tca_attention import registry
    from tca_attention.integration import enable, tensor_parallel

    model = tiny("llama")
    cfg = model.config
    half = tensor_parallel.HeadShard(0, 2, (0, cfg.num_key_value_heads // 2), (0, cfg.num_attention_heads // 2),
                                     cfg.num_key_value_heads, cfg.num_attention_heads)
    assert half.sharded
    monkeypatch.setattr(tensor_parallel, "shard_of", lambda m: half)
    with pytest.raises(tensor_parallel.TensorParallelError, match=why):
        enable(model, registry.create(spec))
    name = spec.split(":")[0]
    per_head = registry.create(f"{name}:vote=kv" if name == "tokenselect" else f"{name}:similarity=0.0")
    assert per_head.split_heads_refusal() is None
