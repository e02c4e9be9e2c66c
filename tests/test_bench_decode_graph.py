"""`tca bench decode-graph` on the CPU: its options and its plot (the timing itself needs CUDA)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tca_attention.benchmarks import bench_decode_graph as bench


def _row(cells, tokens: int) -> dict:
    return {"model": "m", "tokens": tokens, "batch": 1,
            **{c: {"batch_tokens_per_s": 10.0 + i, "bandwidth_limit_tokens_per_s": 50.0} for i, c in enumerate(cells)}}


def test_compile_layers_option_and_plot(tmp_path: Path) -> None:
    assert bench.build_parser().parse_args(["--out", "x", "--compile-layers"]).compile_layers
    assert not bench.build_parser().parse_args(["--out", "x"]).compile_layers
    assert set(bench.COMPILED_CELLS).isdisjoint(bench.CELLS)
    assert all(a in bench.CELLS + bench.COMPILED_CELLS and b in bench.CELLS + bench.COMPILED_CELLS
               for a, b in bench.RATIOS)
    meta = {"device": "cpu", "bandwidth_tbs": 1.0, "torch": "x"}
    for cells in (bench.CELLS, bench.CELLS + bench.COMPILED_CELLS):  # a run without and with the option
        out = tmp_path / f"p{len(cells)}.png"
        bench.plot([_row(cells, 8192), _row(cells, 32768)], meta, str(out))
        assert out.stat().st_size > 1000


def test_compile_prefill_option_needs_compile_layers(capsys) -> None:


    args = bench.build_parser().parse_args(["--out", "x", "--compile-layers", "--compile-prefill"])
    assert args.compile_prefill and args.compile_layers
    assert all(a in bench.CELLS + bench.COMPILED_CELLS and b in bench.CELLS + bench.COMPILED_CELLS
               for a, b in bench.TTFT_RATIOS)
    with pytest.raises(SystemExit):
        bench.main(["--out", "x", "--lengths", "", "--model", "smollm2", "--compile-prefill"])
    assert "--compile-prefill needs --compile-layers" in capsys.readouterr().err


def test_compile_tuning_needs_compile_layers_and_reaches_the_compiled_cells(monkeypatch, capsys) -> None:
    assert bench.build_parser().parse_args(["--out", "x", "--compile-layers", "--compile-tuning"]).compile_tuning
    with pytest.raises(SystemExit):
        bench.main(["--out", "x", "--lengths", "", "--model", "smollm2", "--compile-tuning"])
    assert "--compile-tuning needs --compile-layers" in capsys.readouterr().err
    import torch

    for name in ("empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    for name in ("memory_allocated", "max_memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: 0)
    seen = []

    def record(model, ids, steps, session=None, **kw):
        seen.append(kw)
        return {"ttft_s": 1.0, "decode_tokens_per_s": 1.0, "kv_bytes": 0, "graphs": 1}

    monkeypatch.setattr(bench, "graph_cell", record)
    ids = torch.zeros(1, 4, dtype=torch.long)
    for cell in ("dense-graph-compiled", "dense-graph"):  # (no sliding layers to ask the model about)
        bench.run_cell(cell, object(), ids, 2, None, weights=1, bw_tbs=1.0, sliding_kernel=False, compile_tuning=True)
    assert seen == [{"compile_layers": True, "compile_prefill": False, "compile_tuning": True}, {}]


def test_ttft_repeats_take_the_median_and_refuse_zero(capsys) -> None:


    one = {"ttft_s": 5.0, "decode_tokens_per_s": 10.0}
    assert bench.median_ttft(one, []) is one
    r = bench.median_ttft(one, [4.0, 9.0])
    assert r["ttft_s"] == 5.0 and r["ttft_s_all"] == [5.0, 4.0, 9.0] and r["decode_tokens_per_s"] == 10.0
    assert bench.median_ttft(one, [4.0])["ttft_s"] == 4.5
    assert bench.build_parser().parse_args(["--out", "x"]).ttft_repeats == 1
    with pytest.raises(SystemExit):
        bench.main(["--out", "x", "--lengths", "", "--model", "smollm2", "--ttft-repeats", "0"])
    assert "--ttft-repeats must be >= 1" in capsys.readouterr().err


def test_cells_option_refuses_unknown_cells(capsys) -> None:


    with pytest.raises(SystemExit):
        bench.main(["--out", "x", "--lengths", "", "--model", "smollm2", "--cells", "tca-graph-compiled"])
    err = capsys.readouterr().err
    assert "unknown ['tca-graph-compiled']" in err and "need --compile-layers" in err
    with pytest.raises(SystemExit):
        bench.main(["--out", "x", "--lengths", "", "--model", "smollm2", "--cells", "dense-graph,tca-grap"])
    assert "unknown ['tca-grap']" in capsys.readouterr().err


def test_tca_options_are_typed_selection_options(capsys) -> None:


    assert bench._tca_options("last_q=16,span=7") == {"last_q": 16, "span": 7}
    assert bench._tca_options("") == {}
    with pytest.raises(SystemExit):  # tau sets the budgets (calibration), not the timed selection
        bench.main(["--out", "x", "--lengths", "", "--model", "smollm2", "--tca-options", "tau=0.7"])
    assert "['tau'] are not selection options" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--out", "x", "--lengths", "", "--model", "smollm2", "--tca-options", "span=x"])
    assert "span='x' is not a valid int" in capsys.readouterr().err


def test_kernel_times_counts_kernels_not_the_ops_that_launch_them() -> None:
    """The profilers' kernel filter (profile_step, profile_prefill_layer): device kernels keep their
    time and launches, summed by name; aten ops (which report their kernels' time again) and host-only
    events drop out."""
    from types import SimpleNamespace as Event

    from tca_attention.benchmarks.profile_step import kernel_times

    events = [Event(key="aten::mm", self_device_time_total=5.0, count=1),
              Event(key="gemm_kernel", self_device_time_total=3.0, count=2),
              Event(key="gemm_kernel", self_device_time_total=1.0, count=1),
              Event(key="cudaLaunchKernel", self_device_time_total=0.0, count=4)]
    assert kernel_times(Event(key_averages=lambda: events)) == {"gemm_kernel": (4.0, 3)}


def test_profile_step_kinds_and_flags() -> None:
    """profile_step files inductor's fused kernels (compiled layers) under their own kind, not by
    the op names inside theirs (an index_copy fusion is not decode selection), and takes the
    compiled / graph-replay flags."""
    from tca_attention.benchmarks.profile_step import build_parser, kind_of

    assert kind_of("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0") == "compiled (inductor) fusions"
    assert kind_of("triton_poi_fused_index_copy_1") == "compiled (inductor) fusions"
    assert kind_of("_decode_split_kernel") == "attention decode"
    assert kind_of("nvjet_sm90_tst_64x8_64x16_2x1_v_bz_TNT") == "weights (GEMM/GEMV)"
    args = build_parser().parse_args(["--budgets", "b.json", "--out", "o.json", "--compile-layers", "--graph"])
    assert args.compile_layers and args.graph
    args = build_parser().parse_args(["--budgets", "b.json", "--out", "o.json"])
    assert not args.compile_layers and not args.graph


def test_profile_step_profiles_the_steady_steps_on_the_cpu(monkeypatch) -> None:
    """profile() runs its three static decodes on the CPU (no device kernels there: empty sums) and
    profiles exactly the steady steps it asked for."""
    import torch
    from tiny_models import tiny

    from tca_attention.benchmarks import profile_step
    from tca_attention.methods.full_budget import FullBudget

    events = []
    monkeypatch.setattr(profile_step, "kernel_times", lambda prof: events.append(prof) or {"k": (6.0, 3)})
    model = tiny("llama")
    ids = torch.randint(0, 97, (1, 200), generator=torch.Generator().manual_seed(0))
    out = profile_step.profile(model, FullBudget(window=32, block_size=16), ids, steps=3)
    assert out["steady_steps_profiled"] == 3 and len(events) == 2  # the prefill run, then the steady steps
    assert out["top_kernels"] == [{"us_per_step": 2.0, "name": "k"}] and out["kernel_launches_per_step"] == 1.0
    assert out["prefill_kernel_ms"] == 0.006


@pytest.mark.parametrize("dense_below,sparse", [(0, True), (10**6, False)])
def test_tca_cells_record_the_prefill_policy(monkeypatch, dense_below, sparse) -> None:
    """A TCA cell's row says what the policy did with its prompt: the prefill's kept fraction and
    the dense_below it used (the measured crossover under "auto"); keep-all cells do not."""
    import torch
    from test_batch_invariance import B_, W_, mixed_budgets
    from tiny_models import tiny

    from tca_attention.integration.adapter import cache_kwargs
    from tca_attention.methods.state import ModelIdentity
    from tca_attention.methods.tca.config import TCAConfig
    from tca_attention.methods.tca.method import TCA

    for name in ("empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    for name in ("memory_allocated", "max_memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: 0)

    def prefill_only(model, ids, steps, session=None, **kw):  # graph_cell's prefill, on the CPU
        cache = session.new_cache()
        model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(cache))
        return {"ttft_s": 1.0, "decode_tokens_per_s": 1.0, "kv_bytes": 0, "graphs": 1}

    monkeypatch.setattr(bench, "graph_cell", prefill_only)
    model = tiny("llama")
    tca = TCA(mixed_budgets(TCAConfig(block_size=B_, window=W_), ModelIdentity.of(model)), dense_below=dense_below)
    ids = torch.randint(0, 97, (1, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        row = bench.run_cell("tca-graph", model, ids, 2, tca, weights=1, bw_tbs=1.0)
        keep_all = bench.run_cell("keep-all-graph", model, ids, 2, tca, weights=1, bw_tbs=1.0)
    assert row["dense_below_used"] == dense_below
    assert (row["prefill_kept_fraction"] < 0.99) == sparse and (sparse or row["prefill_kept_fraction"] == 1.0)
    assert "dense_below_used" not in keep_all and "error" not in keep_all


def test_prefill_flops_by_hand() -> None:
    """The prefill's compute limit counts linear layers, causal pairs (sliding layers within their
    window) and a sparse prefill's share of the full layers' pairs; checked against a hand count."""
    from types import SimpleNamespace

    import torch

    assert bench._causal_pairs(4) == 10 and bench._causal_pairs(4, window=2) == 3 + 2 * 2
    assert bench._causal_pairs(3, window=8) == 6
    cfg = SimpleNamespace(num_attention_heads=2, hidden_size=8, head_dim=4, num_hidden_layers=2, vocab_size=10,
                          layer_types=["sliding_attention", "full_attention"], sliding_window=2)
    L, B, lin = 4, 3, 100
    dense = B * (2 * lin * L + 2 * 8 * 10 + 4 * 2 * 4 * (7 + 10))
    assert bench.prefill_flops(cfg, lin, B, L) == dense
    assert bench.prefill_flops(cfg, lin, B, L, attended=0.5) == dense - B * 4 * 2 * 4 * 5
    plain = SimpleNamespace(num_attention_heads=2, hidden_size=8, num_hidden_layers=3, vocab_size=10)  # no types
    assert bench.prefill_flops(plain, 0, 1, L) == 2 * 8 * 10 + 3 * 4 * 2 * 4 * 10

    model = torch.nn.Sequential(torch.nn.Linear(8, 4, bias=False), torch.nn.Linear(4, 10, bias=False))
    model.get_output_embeddings = lambda: model[1]
    assert bench._linear_params(model) == 32
    row = {"model": "m", "tokens": L, "batch": B, "dense-graph": {"ttft_s": 2.0},
           "tca-graph": {"ttft_s": 1.0, "prefill_kept_fraction": 0.5}, "tca-graph / dense-graph": 2.0}
    bench.add_compute_limits(row, cfg, lin, peak_tflops=1e-12)  # 1 FLOP/s: the limit in seconds is the count
    assert row["dense-graph"]["ttft_compute_limit_s"] == pytest.approx(dense)
    assert row["tca-graph"]["ttft_compute_limit_s"] == pytest.approx(dense - B * 4 * 2 * 4 * 5)
    assert row["tca-graph"]["ttft_fraction_of_limit"] == pytest.approx(row["tca-graph"]["ttft_compute_limit_s"])
    assert bench.build_parser().parse_args(["--out", "x", "--peak-tflops", "500"]).peak_tflops == 500


def test_plot_with_compute_limits(tmp_path: Path) -> None:
    rows = [_row(bench.CELLS, 8192)]
    for c in bench.CELLS:
        rows[0][c].update(ttft_s=0.5, ttft_compute_limit_s=0.1)
    out = tmp_path / "p.png"
    bench.plot(rows, {"device": "cpu", "bandwidth_tbs": 1.0, "torch": "x"}, str(out))
    assert out.stat().st_size > 1000
