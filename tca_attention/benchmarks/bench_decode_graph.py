"""Decode tokens/s where users feel it: dense vs TCA, eager vs CUDA-graph-captured static steps.

Four ways to decode greedily after the same prefill, per model, prompt length and batch size:
  dense-eager  plain attention, transformers' DynamicCache, one Python forward per token;
  dense-graph  plain attention, transformers' StaticCache, decode steps replayed from CUDA graphs;
  tca-eager    TCA on its ragged cache (the dynamic path), one Python forward per token;
  tca-graph    TCA on its static ragged cache, decode steps replayed from CUDA graphs
(integration/static_decode.py runs both graph cells: one runner, so the comparison is fair).
Models: (a) the Llama-3.1-8B shape with random bf16 weights (bench_e2e.build_model) and a budget
file mapped onto its 32 x 8 heads, at --lengths; (b) a packaged real model (--model), TCA budgets
calibrated once and cached, at --model-lengths. Each cell records time to first token, decode
tokens/s (per batch row and for the batch), peak memory, KV held, and the device's memory-bandwidth
limit of that decode step (weights + KV held, read once per step), the compute limit of its prefill
(the prompt's matmul FLOPs at the device's dense bf16 peak, `prefill_flops`); eager cells also give
the median single step (engine/timing.py's CUDA-event timing). JSON + PNG with device, versions,
shapes and command.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from ..clihelp import HelpFormatter
from ..engine.timing import bench_ms
from ..registry import DEFAULT_METHOD
from . import inductor_env, require_cuda

CELLS = ("dense-eager", "dense-graph", "keep-all-graph", "tca-eager", "tca-graph")
# --compile-layers: the three graph cells again with the decoder layers compiled (torch.compile;
# integration/compiled_layers.py), norms/rotary/MLP fused, attention and cache eager
COMPILED_CELLS = ("dense-graph-compiled", "keep-all-graph-compiled", "tca-graph-compiled")
RATIOS = (("tca-graph", "dense-graph"), ("tca-graph", "keep-all-graph"), ("tca-eager", "dense-eager"),
          ("tca-graph", "tca-eager"), ("dense-graph", "dense-eager"), ("keep-all-graph", "dense-graph"),
          ("tca-graph-compiled", "keep-all-graph-compiled"), ("tca-graph-compiled", "dense-graph-compiled"),
          ("tca-graph-compiled", "tca-graph"), ("keep-all-graph-compiled", "keep-all-graph"))
# time-to-first-token speed-ups (dense TTFT / TCA TTFT); with --compile-prefill the compiled cells' prefill is compiled
TTFT_RATIOS = (("dense-eager", "tca-eager"), ("dense-graph-compiled", "tca-graph-compiled"))
# keep-all-graph: the engine with nothing dropped (FullBudget) in the same graph runner: a dense
# split-K flash-decoding over a GQA cache, no repeat_kv and no mask, so the graph-captured dense
# figure does not rest on transformers' SDPA path alone (which expands KV heads under a mask)
# HBM bandwidth (TB/s) by device name substring, first match wins (vendor figures; --bandwidth-tbs overrides)
BANDWIDTH_TBS = (("H200", 4.8), ("H100 PCIe", 2.0), ("H100", 3.35), ("A100-SXM4-80GB", 2.04), ("A100", 1.56),
                 ("L40S", 0.864), ("4090", 1.01))
# dense bf16 tensor-core peak (no sparsity), TFLOP/s: the prefill's compute limit
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0),
                    ("4090", 165.0))


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    ap.add_argument("--lengths", default="8192,32768",
                    help="comma list of prompt lengths for the Llama-3.1-8B-shaped model ('' to skip it)")
    ap.add_argument("--budgets", default=None,
                    help="budget file mapped onto the 8B shape (from `tca calibrate --out FILE`, e.g. "
                    "docs/results/budgets/smollm2-default-8k.json); required with --lengths")
    ap.add_argument("--layers", type=int, default=32, help="decoder layers of the 8B-shaped model")
    ap.add_argument("--model", default="",
                    help="a packaged model to time too (qwen2.5-coder-0.5b, gemma3-270m, smollm2; '' to skip)")
    ap.add_argument("--model-lengths", default="8192", help="comma list of prompt lengths for --model")
    ap.add_argument("--batch", default="1", help="comma list of batch sizes")
    ap.add_argument("--decode-steps", type=int, default=64, help="decode steps timed per cell (after warm-up)")
    ap.add_argument("--dense-below", default="0",
                    help="TCA's dense_below: a token count or 'auto' (0: TCA always sparse, what is timed)")
    ap.add_argument("--compile-layers", action="store_true",
                    help="also time the graph cells with the decoder layers compiled by torch.compile "
                    "(cells *-graph-compiled; the compilation is outside the timed steps)")
    ap.add_argument("--compile-prefill", action="store_true",
                    help="with --compile-layers: the compiled cells compile the prefill too (dynamic shapes, "
                    "compiled in the warm-up cells), so their TTFT shows it")
    ap.add_argument("--compile-tuning", action="store_true",
                    help="with --compile-layers: compile with inductor's GEMM autotuning and coordinate-descent "
                    "tuning (greedy_static's compile_tuning; longer compiles), dense and TCA cells alike")
    ap.add_argument("--cells", default="",
                    help="comma list of the cells to time (default: all; e.g. 'dense-graph-compiled,"
                         "tca-graph-compiled' for the TTFT ratio alone)")
    ap.add_argument("--ttft-repeats", type=int, default=1,
                    help="prefills timed per cell: TTFT is their median (the first comes with the decode run; "
                    "each further one is a prefill and one step)")
    ap.add_argument("--tca-options", default=DEFAULT_METHOD.partition(":")[2],
                    help="TCA selection options of the timed method, as in a spec (default: those of the "
                    "library's default configuration, %(default)s; 'last_q=1,span=1' or '' for the paper's "
                    "rule); budgets and dense_below come from the other flags")
    ap.add_argument("--bandwidth-tbs", type=float, default=None,
                    help="the device's memory bandwidth in TB/s for the limits (default: a table by device name)")
    ap.add_argument("--sliding-kernel", action=argparse.BooleanOptionalAction, default=True,
                    help="every cell (the dense ones included) prefills the model's sliding-window layers with the "
                         "engine's windowed kernel (exact; the library's default, enable(sliding_kernel=True)); "
                         "--no-sliding-kernel: transformers' SDPA over an (L, L) mask, in every cell")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's dense bf16 peak in TFLOP/s for the prefill's compute limit (default: a table "
                         "by device name; none known: no limit recorded)")
    ap.add_argument("--out", required=True, help="result JSON path (the plot goes next to it as .png); required")
    return ap


def _sync() -> None:
    torch.cuda.synchronize()


def _kv_bytes(cache) -> int:
    if hasattr(cache, "kv_bytes"):
        return cache.kv_bytes()
    return sum(l.keys.nbytes + l.values.nbytes for l in cache.layers if getattr(l, "keys", None) is not None)


def _weight_bytes(model) -> int:
    """Bytes a decode step reads from the weights: every parameter once, less the input embedding
    table when the output head does not share it (a lookup reads B rows)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if emb.data_ptr() != head.data_ptr():
        total -= emb.numel() * emb.element_size()
    return total


@torch.no_grad()
def eager_cell(model, ids: torch.Tensor, steps: int, session=None) -> dict:
    """Prefill, 2 untimed decode steps, then `steps` timed steps, one Python forward each."""
    from transformers.cache_utils import DynamicCache

    from ..integration.adapter import cache_kwargs

    cache = session.new_cache() if session is not None else DynamicCache(config=model.config)
    _sync()
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(cache))
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync()
    t1 = time.perf_counter()
    for _ in range(2):
        nxt = model(input_ids=nxt, use_cache=True, **cache_kwargs(cache)).logits[:, -1].argmax(-1, keepdim=True)
    _sync()
    t2 = time.perf_counter()
    for _ in range(steps):
        nxt = model(input_ids=nxt, use_cache=True, **cache_kwargs(cache)).logits[:, -1].argmax(-1, keepdim=True)
    _sync()
    t3 = time.perf_counter()
    kv = _kv_bytes(cache)
    state = {"nxt": nxt}

    def one_step() -> None:
        out = model(input_ids=state["nxt"], use_cache=True, **cache_kwargs(cache))
        state["nxt"] = out.logits[:, -1].argmax(-1, keepdim=True)

    # the median single step (CUDA events, engine/timing.py), next to the loop's mean
    per_step = bench_ms(one_step, target_ms=200.0, min_reps=3, max_reps=max(3, steps // 2), warmup=0, flush="none")
    return {"ttft_s": t1 - t0, "decode_tokens_per_s": steps / (t3 - t2), "step_ms_median": per_step["median_ms"],
            "kv_bytes": kv}


@torch.no_grad()
def graph_cell(model, ids: torch.Tensor, steps: int, session=None, compile_layers: bool = False,
               compile_prefill: bool = False, compile_tuning: bool = False) -> dict:
    """greedy_static with CUDA graphs: 1 eager step, 1 warm-up, capture, then `steps` replays
    (compile_layers: the decoder layers compiled, during the eager steps; compile_prefill: the
    prompt's forward too; compile_tuning: with inductor's tuning)."""
    from ..integration.static_decode import greedy_static

    run = greedy_static(model, ids, max_new_tokens=steps + 3, session=session, compile_layers=compile_layers,
                        compile_prefill=compile_prefill, compile_tuning=compile_tuning)
    assert run.graphs >= 1 and run.steady_steps >= steps, (run.graphs, run.steady_steps)
    return {"ttft_s": run.prefill_s, "decode_tokens_per_s": run.decode_tokens_per_s, "kv_bytes": _kv_bytes(run.cache),
            "graphs": run.graphs}


def _causal_pairs(tokens: int, window: int | None = None) -> int:
    """Query-key pairs of one causal attention over `tokens` (each query sees at most `window` keys)."""
    if window is None or window >= tokens:
        return tokens * (tokens + 1) // 2
    return window * (window + 1) // 2 + (tokens - window) * window


def prefill_flops(config, linear_params: int, batch: int, tokens: int, attended: float = 1.0) -> float:
    """Matmul FLOPs of one prefill: every decoder linear layer over every prompt token (2 per
    weight per token; the output head on the last token only) plus attention (QK^T and PV: 4 per
    head dimension per query-key pair), its full-attention layers' pairs scaled by `attended` (the
    share a sparse prefill computes; sliding-window layers are dense within their window)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None)
    pairs = sum(_causal_pairs(tokens, window) if t == "sliding_attention" else attended * _causal_pairs(tokens)
                for t in types)
    head = 2 * cfg.hidden_size * cfg.vocab_size
    return batch * (2.0 * linear_params * tokens + head + 4.0 * heads * head_dim * pairs)


def _linear_params(model) -> int:
    """Weights of the decoder's linear layers (the output head excluded: prefill computes one row)."""
    head = model.get_output_embeddings()
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)


def add_compute_limits(row: dict, config, linear_params: int, peak_tflops: float) -> dict:
    """Each timed cell of `row` with its prefill's compute limit (seconds at the peak) and the share
    of it its time to first token reached; a sparse cell's attention counts its prefill_kept_fraction."""
    for cell, r in row.items():
        if isinstance(r, dict) and "ttft_s" in r:
            kept = r.get("prefill_kept_fraction")
            flops = prefill_flops(config, linear_params, row["batch"], row["tokens"], 1.0 if kept is None else kept)
            r["ttft_compute_limit_s"] = flops / (peak_tflops * 1e12)
            r["ttft_fraction_of_limit"] = r["ttft_compute_limit_s"] / r["ttft_s"]
    return row


def median_ttft(result: dict, more: list[float]) -> dict:
    """result with ttft_s the median of its own and `more` prefill times (all kept in ttft_s_all)."""
    if not more:
        return result
    times = [result["ttft_s"], *more]
    return {**result, "ttft_s": statistics.median(times), "ttft_s_all": times}


def run_cell(cell: str, model, ids: torch.Tensor, steps: int, method, weights: int, bw_tbs: float,
             compile_prefill: bool = False, ttft_repeats: int = 1, sliding_kernel: bool = True,
             compile_tuning: bool = False) -> dict:
    from ..integration import enable
    from ..introspect import layer_kinds
    from ..methods.full_budget import FullBudget

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    compiled = ({"compile_layers": True, "compile_prefill": compile_prefill, "compile_tuning": compile_tuning}
                if cell.endswith("-compiled") else {})
    fn = eager_cell if cell.endswith("eager") else graph_cell
    try:
        if cell.startswith("dense"):  # plain transformers; with sliding layers and the kernel, a plain-attention session
            windowed = sliding_kernel and "sliding" in layer_kinds(model)
            with enable(model, None) if windowed else contextlib.nullcontext():
                r = fn(model, ids, steps, **compiled)
                more = [fn(model, ids, 1, **compiled)["ttft_s"] for _ in range(ttft_repeats - 1)]
        else:
            if cell.startswith("keep-all"):
                method = FullBudget(window=method.window, block_size=method.block_size)
            with enable(model, method, sliding_kernel=sliding_kernel) as session:
                r = fn(model, ids, steps, session, **compiled)
                more = [fn(model, ids, 1, session, **compiled)["ttft_s"] for _ in range(ttft_repeats - 1)]
                if not cell.startswith("keep-all"):  # the policy's choice for this prompt, visible in the row
                    report = session.prefill_report()
                    r["prefill_kept_fraction"] = report.get("kept_fraction")
                    used = report.get("dense_below_used")  # set under "auto": the measured crossover
                    r["dense_below_used"] = report.get("dense_below") if used is None else used
        r = median_ttft(r, more)
    except torch.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        return {"error": f"OOM: {e}".splitlines()[0]}
    except Exception as e:  # a failing cell is recorded in its row; the other cells still run
        import traceback

        traceback.print_exc()
        torch.cuda.empty_cache()
        return {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
    B, kv = ids.shape[0], r.pop("kv_bytes")
    limit = bw_tbs * 1e12 / (weights + kv)  # steps/s if the step only read weights + KV once
    return {**r, "batch_tokens_per_s": r["decode_tokens_per_s"] * B, "kv_gib": kv / 2**30,
            "peak_mem_gib": (torch.cuda.max_memory_allocated() - base) / 2**30,
            "bandwidth_limit_tokens_per_s": limit, "fraction_of_limit": r["decode_tokens_per_s"] / limit}


def time_model(label: str, model, method, lengths: list[int], batches: list[int], steps: int, bw_tbs: float,
               vocab: int, cells: tuple[str, ...] = CELLS, compile_prefill: bool = False,
               ttft_repeats: int = 1, peak_tflops: float | None = None, sliding_kernel: bool = True,
               compile_tuning: bool = False) -> list[dict]:
    weights, linear = _weight_bytes(model), _linear_params(model)
    warm = torch.randint(0, vocab, (1, min(*lengths, 8192)), device="cuda")
    for cell in cells:  # kernel compilation, cuBLAS handles, allocator (a short prompt: 128K would cost a minute)
        run_cell(cell, model, warm, 4, method, weights, bw_tbs, compile_prefill, sliding_kernel=sliding_kernel,
                 compile_tuning=compile_tuning)
    rows = []
    for L in lengths:
        for B in batches:
            ids = torch.randint(0, vocab, (B, L), device="cuda")
            row = {"model": label, "tokens": L, "batch": B}
            for cell in cells:
                row[cell] = run_cell(cell, model, ids, steps, method, weights, bw_tbs, compile_prefill, ttft_repeats,
                                     sliding_kernel, compile_tuning)
            for a, b in RATIOS:
                if "decode_tokens_per_s" in row.get(a, {}) and "decode_tokens_per_s" in row.get(b, {}):
                    row[f"{a} / {b}"] = row[a]["decode_tokens_per_s"] / row[b]["decode_tokens_per_s"]
            for a, b in TTFT_RATIOS:
                if "ttft_s" in row.get(a, {}) and "ttft_s" in row.get(b, {}):
                    row[f"ttft {a} / {b}"] = row[a]["ttft_s"] / row[b]["ttft_s"]
            if peak_tflops:
                add_compute_limits(row, model.config, linear, peak_tflops)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


# spec parameters that describe the timed TCA's selection (budgets, dense_below: other flags)
SELECTION_OPTIONS = ("last_q", "gqa", "floor", "span", "dense_layers")


def _tca_options(text: str) -> dict:
    """'last_q=16,span=7' -> typed TCA selection options (the spec parser's types and errors)."""
    from .. import registry

    _, params = registry.parse_spec(f"tca:{text}")
    if bad := [k for k in params if k not in SELECTION_OPTIONS]:
        raise ValueError(f"{bad} are not selection options ({', '.join(SELECTION_OPTIONS)} are)")
    return params


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = build_parser(prog)
    args = ap.parse_args(argv)
    lengths, model_lengths, batches = _ints(args.lengths), _ints(args.model_lengths), _ints(args.batch)
    if lengths and not args.budgets:
        ap.error("--lengths times the 8B-shaped model, whose TCA budgets come from --budgets FILE")
    if not lengths and not args.model:
        ap.error("nothing to time: give --lengths (8B shape) and/or --model")
    if not batches:
        ap.error("--batch needs at least one batch size")
    if args.compile_prefill and not args.compile_layers:
        ap.error("--compile-prefill needs --compile-layers")
    if args.compile_tuning and not args.compile_layers:
        ap.error("--compile-tuning needs --compile-layers")
    if args.ttft_repeats < 1:
        ap.error("--ttft-repeats must be >= 1")
    dense_below = args.dense_below if args.dense_below == "auto" else int(args.dense_below)
    try:
        tca_options = _tca_options(args.tca_options)
    except (KeyError, ValueError) as err:
        ap.error(f"--tca-options: {err}")
    cells = CELLS + (COMPILED_CELLS if args.compile_layers else ())
    if args.cells:
        wanted = [c.strip() for c in args.cells.split(",") if c.strip()]
        if unknown := [c for c in wanted if c not in cells]:
            ap.error(f"--cells: unknown {unknown}; available {list(cells)}"
                     + ("" if args.compile_layers else " (the *-compiled cells need --compile-layers)"))
        cells = tuple(c for c in cells if c in wanted)
    if (rc := require_cuda("tca bench decode-graph")) is not None:
        return rc
    import transformers
    import triton

    from ..methods.tca.budgets import Budgets
    from ..methods.tca.method import TCA
    from .bench_e2e import LLAMA_8B, build_model

    name = torch.cuda.get_device_name()
    bw = args.bandwidth_tbs or next((v for k, v in BANDWIDTH_TBS if k in name), None)
    if bw is None:
        ap.error(f"no bandwidth known for {name!r}: pass --bandwidth-tbs")
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS if k in name), None)
    rows, models = [], {}
    if lengths:
        model = build_model(args.layers)
        budgets = Budgets.load(args.budgets).mapped_onto(model)
        method = TCA(budgets, dense_below=dense_below, **tca_options)
        rows += time_model("llama-3.1-8b-shape", model, method, lengths, batches, args.decode_steps, bw,
                           LLAMA_8B["vocab_size"], cells, args.compile_prefill, args.ttft_repeats, peak,
                           args.sliding_kernel, args.compile_tuning)
        models["llama-3.1-8b-shape"] = {**LLAMA_8B, "num_hidden_layers": args.layers, "weights": "random bf16",
                                        "budgets": args.budgets, "mean_kept_fraction": budgets.mean_kept_fraction}
        del model
        torch.cuda.empty_cache()
    if args.model:
        from .. import registry
        from ..models import load_model

        model, tok = load_model(args.model, device="cuda")
        method = registry.create("tca", model=model, tokenizer=tok)  # calibrates once, then cached
        method = TCA(method.budgets, dense_below=dense_below, **tca_options)
        rows += time_model(args.model, model, method, model_lengths, batches, args.decode_steps, bw,
                           model.config.get_text_config().vocab_size, cells, args.compile_prefill,
                           args.ttft_repeats, peak, args.sliding_kernel, args.compile_tuning)
        cfg = model.config.get_text_config()
        models[args.model] = {"model_type": cfg.model_type, "layers": cfg.num_hidden_layers,
                              "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
                              "dtype": str(next(model.parameters()).dtype), "weights": "pretrained",
                              "mean_kept_fraction": method.budgets.mean_kept_fraction,
                              "tca_config": dict(method.budgets.config.__dict__)}
    meta = {
        "device": name, "torch": torch.__version__, "transformers": transformers.__version__,
        "triton": triton.__version__, "python": platform.python_version(), "cuda": torch.version.cuda,
        "bandwidth_tbs": bw, "peak_bf16_tflops": peak, "models": models, "decode_steps": args.decode_steps,
        "dense_below": dense_below, "sliding_kernel": args.sliding_kernel,
        "compile_prefill": args.compile_prefill, "compile_tuning": args.compile_tuning,
        "ttft_repeats": args.ttft_repeats,
        "prefill_config_env": os.environ.get("TCA_PREFILL_CONFIG"),
        "decode_config_env": os.environ.get("TCA_DECODE_CONFIG"), "tca_options": tca_options,
        "inductor_env": inductor_env(),
        "cells": {"dense-eager": "SDPA + DynamicCache, a Python forward per token",
                  "dense-graph": "SDPA + StaticCache, CUDA-graph replay (integration/static_decode.py)",
                  "keep-all-graph": "FullBudget (every token kept) + StaticRaggedCache, CUDA-graph replay: "
                                    "dense split-K decode over the GQA cache, no mask",
                  "tca-eager": "TCA + RaggedCache (dynamic), a Python forward per token",
                  "tca-graph": "TCA + StaticRaggedCache, CUDA-graph replay",
                  **({c: c.removesuffix("-compiled") + " with the decoder layers compiled (torch.compile): norms, "
                      "rotary, MLP and residual adds fused; attention and cache eager"
                      + ("; the prefill compiled too (dynamic shapes)" if args.compile_prefill else "")
                      + ("; inductor's GEMM autotuning and coordinate-descent tuning" if args.compile_tuning else "")
                      for c in COMPILED_CELLS}
                     if args.compile_layers else {})},
        "command": "tca bench decode-graph " + " ".join(argv),
    }
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    plot(rows, meta, args.out.rsplit(".", 1)[0] + ".png")
    return 0


def plot(rows: list[dict], meta: dict, path: str) -> None:
    """One column per (model, batch size), prompt lengths along x: batch decode tokens/s per cell
    (bars) with each cell's bandwidth limit (dashes) on top, time to first token per cell below
    with its compute limit (black dashes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["model"], r["batch"]) for r in rows})
    fig, axes = plt.subplots(2, len(panels), figsize=(6 * len(panels), 7.6), squeeze=False)
    for col, (model, B) in enumerate(panels):
        sub = [r for r in rows if r["model"] == model and r["batch"] == B]
        cells = [c for c in CELLS + COMPILED_CELLS if any(c in r for r in sub)]
        w = 0.8 / len(cells)
        top, bottom = axes[0][col], axes[1][col]
        for i, cell in enumerate(cells):
            xs = [j + (i - (len(cells) - 1) / 2) * w for j in range(len(sub))]
            ys = [r.get(cell, {}).get("batch_tokens_per_s", 0.0) for r in sub]
            bars = top.bar(xs, ys, w, label=cell)
            color = bars.patches[0].get_facecolor() if bars.patches else None
            lim = [r.get(cell, {}).get("bandwidth_limit_tokens_per_s", 0.0) * B for r in sub]
            top.scatter(xs, lim, marker="_", s=200, color=color)
            bottom.bar(xs, [1e3 * r.get(cell, {}).get("ttft_s", 0.0) for r in sub], w, color=color, label=cell)
            floor = [1e3 * r.get(cell, {}).get("ttft_compute_limit_s", 0.0) for r in sub]
            if any(floor):  # below the bar's top: drawn over it, in black
                bottom.scatter(xs, floor, marker="_", s=200, color="black", zorder=3)
        name = Path(model).name if "/" in model else model
        for ax, ylabel in ((top, "decode tokens/s (batch, log)"), (bottom, "time to first token, ms (log)")):
            ax.set_xticks(range(len(sub)), [f"{r['tokens'] / 1024:g}K" for r in sub])
            ax.set_xlabel("prompt tokens")
            ax.set_ylabel(ylabel)
            ax.set_yscale("log")
            ax.grid(alpha=0.3, axis="y")
        top.set_title(f"{name}, batch {B}: decode (dashes: bandwidth limit)", fontsize=9)
        bottom.set_title(f"{name}, batch {B}: prefill (black dashes: compute limit)", fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle(f"{meta['device']} ({meta['bandwidth_tbs']} TB/s), torch {meta['torch']}", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
