"""End-to-end timing on a GPU: time to first token, decode tokens/s and peak memory, dense vs a method.

A model of Llama-3.1-8B shape with random weights (TCA's cost is set by its budgets, not by the
weights), budgets from a real calibration of a packaged model mapped onto its 32 x 8 heads.
Usage: tca bench e2e --budgets BUDGETS.json --out r.json   (a budget file from `tca calibrate`, e.g.
docs/results/budgets/smollm2-paper.json of a source checkout), or any registry method:
tca bench e2e --method streaming:window=4096 --out r.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicCache

from .. import registry
from ..methods.tca.budgets import Budgets
from ..clihelp import HelpFormatter
from ..integration import enable
from . import parse_method, require_cuda

LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=262144,
                rope_theta=500000.0, tie_word_embeddings=False)


def build_model(layers: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(**{**LLAMA_8B, "num_hidden_layers": layers})
    torch.manual_seed(0)
    with torch.device("cuda"):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        model = LlamaForCausalLM(cfg)
        torch.set_default_dtype(prev)
    model.config._attn_implementation = "sdpa"
    return model.eval()


@torch.no_grad()
def time_one(model, ids: torch.Tensor, method, decode_steps: int) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with enable(model, method) as session:
        cache = session.new_cache() if method is not None else DynamicCache(config=model.config)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, **session.cache_kwargs(cache), logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        kv_prefill = _kv_bytes(cache, method)  # the cache the prefill peak held (decode may grow it)
        t1_decode = time.perf_counter()  # decode timing starts after the host-side count
        for _ in range(decode_steps):
            out = model(input_ids=nxt, use_cache=True, **session.cache_kwargs(cache))
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        kv = _kv_bytes(cache, method)
        dense_kv, kept = (kv, 1.0) if method is None else (cache.dense_kv_bytes(), cache.kept_fraction())
        report = session.prefill_report() if method is not None else {}
    del cache, out
    return {
        "ttft_s": t1 - t0,
        "decode_tokens_per_s": decode_steps / (t2 - t1_decode),
        "peak_mem_gib": (torch.cuda.max_memory_allocated() - base) / 2**30,
        "kv_gib": kv / 2**30,
        "kv_after_prefill_gib": kv_prefill / 2**30,
        "dense_kv_gib": dense_kv / 2**30,
        "kept_fraction": kept,
        "retained_last_query": report.get("retained"),
        # attended fractions: of the causal prefill pairs, and of the cache per decode step (a
        # method reading everything it keeps reads its kept fraction)
        "prefill_attended_fraction": report.get("kept_fraction", 1.0),
        "decode_attended_fraction": report.get("decode_kept_fraction", kept),
    }


def _kv_bytes(cache, method) -> int:
    if method is None:
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    return cache.kv_bytes()


def timed(model, ids: torch.Tensor, method, decode_steps: int, repeats: int) -> dict:
    """time_one `repeats` times; the run with the median TTFT, with every TTFT listed."""
    runs = sorted((time_one(model, ids, method, decode_steps) for _ in range(max(1, repeats))),
                  key=lambda r: r["ttft_s"])
    return {**runs[len(runs) // 2], "ttft_s_all": [r["ttft_s"] for r in runs]}


KERNEL_GROUPS = (  # (group, lower-case substrings of CUDA kernel names), first match wins
    ("tca attention (triton)", ("_prefill_kernel",)),
    ("tca selection (triton)", ("_select", "_score", "_stats", "_pack")),
    ("dense attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
    ("matmul (projections, MLP)", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "sm80_")),
    ("sort / scan / top-k", ("sort", "radix", "scan", "cumsum", "topk", "bitonic")),
    ("gather / scatter / index", ("gather", "scatter", "index", "masked")),
)


def kernel_group(name: str) -> str:
    low = name.lower()
    for group, keys in KERNEL_GROUPS:
        if any(k in low for k in keys):
            return group
    return "elementwise / other"


@torch.no_grad()
def profile_prefill(model, ids: torch.Tensor, method) -> dict:
    """One prefill under torch.profiler: CUDA kernel time per group, wall time, GPU busy share,
    and memory: peak over the weights, KV held after prefill, transient = peak - held."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    before = {id(t) for t in _cuda_tensors()}
    with enable(model, method) as session:
        cache = session.new_cache() if method is not None else DynamicCache(config=model.config)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, **session.cache_kwargs(cache), logits_to_keep=1)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        held = torch.cuda.memory_allocated() - base - out.logits.nbytes
        peak = torch.cuda.max_memory_allocated() - base
        # live tensors created by the prefill that are neither the cache nor the logits
        in_cache = {t.untyped_storage().data_ptr() for t in _cache_tensors(cache)}
        extra = sorted(((tuple(t.shape), str(t.dtype), t.untyped_storage().nbytes()) for t in _cuda_tensors()
                        if id(t) not in before and t.untyped_storage().data_ptr() not in in_cache
                        and t.untyped_storage().data_ptr() != out.logits.untyped_storage().data_ptr()),
                       key=lambda x: -x[2])
    groups: dict[str, float] = {}
    top: list[tuple[str, float]] = []
    for ev in prof.key_averages():
        us = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0.0)
        if us <= 0 or ev.key.startswith(("ProfilerStep", "aten::")):
            continue
        g = kernel_group(ev.key)
        groups[g] = groups.get(g, 0.0) + us / 1e3
        top.append((ev.key[:90], us / 1e3))
    del cache, out
    busy = sum(groups.values())
    return {
        "wall_ms_profiled": wall * 1e3,
        "kernel_ms_by_group": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
        "kernel_ms_total": busy,
        "gpu_idle_ms": wall * 1e3 - busy,
        "top_kernels_ms": sorted(top, key=lambda kv: -kv[1])[:12],
        "peak_mem_gib": peak / 2**30, "held_after_prefill_gib": held / 2**30,
        "transient_gib": (peak - held) / 2**30,
        "other_live_tensors": {"count": len(extra), "mib": sum(e[2] for e in extra) / 2**20, "largest": extra[:8]},
    }


def _cuda_tensors() -> list[torch.Tensor]:
    import gc

    out = []
    for o in gc.get_objects():
        try:
            if torch.is_tensor(o) and o.is_cuda:
                out.append(o)
        except Exception:  # noqa: BLE001 - objects that fail isinstance checks
            pass
    return out


def _cache_tensors(cache) -> list[torch.Tensor]:
    out = []
    for layer in cache.layers:
        for name in ("keys", "values", "g_keys", "g_values", "g_pos", "g_offsets", "t_keys", "t_values",
                     "key_start", "decode_keep"):
            t = getattr(layer, name, None)
            if torch.is_tensor(t):
                out.append(t)
    return out


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    ap.add_argument("--method", default="tca", metavar="SPEC",
                    help="the method timed against dense attention: a registry spec (`tca methods`); the options "
                    "--budgets, --tau, --score, --dense-below, --also-dense-below are tca's")
    ap.add_argument("--budgets",
                    help="budget file to map onto the Llama-3.1-8B shape (from `tca calibrate --out FILE`); "
                    "required for tca")
    ap.add_argument("--lengths", default="4096,8192,32768,65536,131072", help="comma list of prompt lengths in tokens")
    ap.add_argument("--layers", type=int, default=32, help="decoder layers of the model")
    ap.add_argument("--decode-steps", type=int, default=32, help="decode steps timed after each prefill")
    ap.add_argument("--tau", type=float, default=None, help="re-select the budgets at this tau (default: as calibrated)")
    ap.add_argument("--score", default=None, choices=["observation", "column_mean"],
                    help="re-select the budgets with this score (default: as calibrated)")
    ap.add_argument("--dense-below", type=int, default=None, help="TCA keeps prompts shorter than this dense (default 0)")
    ap.add_argument("--also-dense-below", type=int, default=None,
                    help="also time TCA(dense_below=N) at lengths below N (a short-prompt policy), same run; default: off")
    ap.add_argument("--repeats", type=int, default=1,
                    help="prefills per method below 32K tokens; the row keeps the run with the median TTFT")
    ap.add_argument("--profile", default="",
                    help="comma list of lengths to profile one prefill of, both methods (default: none)")
    ap.add_argument("--out", required=True, help="result JSON path (the plot goes next to it as .png); required")
    return ap


TCA_OPTIONS = ("budgets", "tau", "score", "dense_below", "also_dense_below")


def parse_args(argv: list[str], prog: str | None = None) -> argparse.Namespace:
    """The options, with --method checked: tca needs --budgets and takes tau/score/dense_below from
    its spec or the options (not both); another method refuses the tca options."""
    ap = build_parser(prog)
    args = ap.parse_args(argv)
    name, params = parse_method(ap, args.method)
    if name == registry.FULL:
        ap.error("--method full is the dense attention every method is timed against")
    if name == "tca":
        for key in ("tau", "score", "dense_below"):
            if key in params and getattr(args, key) is not None:
                ap.error(f"--{key.replace('_', '-')} and --method {args.method} both set {key}")
            setattr(args, key, params.get(key, getattr(args, key)))
        if isinstance(args.dense_below, str) and args.dense_below != "auto":
            if not args.dense_below.isdigit():
                ap.error(f"--method {args.method}: dense_below is 'auto' or a token count")
            args.dense_below = int(args.dense_below)
        if set(params) - {"tau", "score", "dense_below"}:
            ap.error(f"--method {args.method}: only tau, score and dense_below apply to a budget file")
        if not args.budgets:
            ap.error("--method tca needs --budgets FILE")
    else:
        given = [f"--{k.replace('_', '-')}" for k in TCA_OPTIONS if getattr(args, k) is not None]
        if given:
            ap.error(f"{', '.join(given)}: tca's options, but --method is {name}")
    args.name = name
    return args


def build_method(args: argparse.Namespace, model: LlamaForCausalLM):
    """The --method for `model` (tca: the budget file re-selected and mapped onto it)."""
    if args.name != "tca":
        return registry.create(args.method, model=model), None
    src = Budgets.load(args.budgets)
    changes = {k: v for k, v in (("tau", args.tau), ("score", args.score)) if v is not None}
    budgets = src.at(**changes).mapped_onto(model) if changes else src.mapped_onto(model)
    return registry.create(f"tca:dense_below={args.dense_below or 0}", budgets=budgets), budgets


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv, prog)
    if (rc := require_cuda("tca bench e2e")) is not None:
        return rc
    model = build_model(args.layers)
    method, budgets = build_method(args, model)
    name = args.name
    rows = []
    # warm-up (compilation of kernels, cuBLAS handles)
    warm = torch.randint(0, 1000, (1, 8192), device="cuda")
    time_one(model, warm, None, 2)
    time_one(model, warm, method, 2)
    for L in (int(x) for x in args.lengths.split(",")):
        ids = torch.randint(0, LLAMA_8B["vocab_size"], (1, L), device="cuda")
        row = {"tokens": L}
        for key, m in (("dense", None), (name, method)):
            try:
                time_one(model, ids, m, 2)  # warm-up at this shape (kernel compilation, allocator)
                row[key] = timed(model, ids, m, args.decode_steps, args.repeats if L < 32768 else 1)
            except torch.OutOfMemoryError as e:
                row[key] = {"error": f"OOM: {e}".splitlines()[0]}
                torch.cuda.empty_cache()
        if args.also_dense_below and L < args.also_dense_below:
            policy = registry.create(f"tca:dense_below={args.also_dense_below}", budgets=budgets)
            time_one(model, ids, policy, 2)
            row["tca_dense_below"] = timed(model, ids, policy, args.decode_steps, args.repeats)
            row["tca_dense_below"]["dense_below"] = args.also_dense_below
        if "ttft_s" in row["dense"] and "ttft_s" in row[name]:
            row["ttft_speedup"] = row["dense"]["ttft_s"] / row[name]["ttft_s"]
            row["decode_speedup"] = row[name]["decode_tokens_per_s"] / row["dense"]["decode_tokens_per_s"]
            row["peak_mem_drop_gib"] = row["dense"]["peak_mem_gib"] - row[name]["peak_mem_gib"]
            row["kv_saving_gib"] = row["dense"]["kv_gib"] - row[name]["kv_gib"]
            # the saving the prefill peak can show: both caches as they were when prefill ended
            row["kv_saving_at_prefill_gib"] = row["dense"]["kv_after_prefill_gib"] - row[name]["kv_after_prefill_gib"]
        if "tca_dense_below" in row and "ttft_s" in row["dense"]:
            row["ttft_speedup_dense_below"] = row["dense"]["ttft_s"] / row["tca_dense_below"]["ttft_s"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    profiles = {}
    for L in (int(x) for x in args.profile.split(",") if x):
        ids = torch.randint(0, LLAMA_8B["vocab_size"], (1, L), device="cuda")
        profiles[L] = {key: profile_prefill(model, ids, m) for key, m in (("dense", None), (name, method))}
        print(json.dumps({"profile": L, **profiles[L]}), flush=True)
    meta = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
        "model": {"shape": "Llama-3.1-8B", **LLAMA_8B, "num_hidden_layers": args.layers, "weights": "random bf16"},
        "method": registry.normalize(args.method),
        "budgets": None if budgets is None else {
            "file": args.budgets, "mean_kept_fraction": budgets.mean_kept_fraction,
            "dense_heads": budgets.dense_heads, **{k: v for k, v in budgets.config.__dict__.items()}},
        "dense_attention": "transformers sdpa (torch's default backend choice)",
        "decode_steps": args.decode_steps,
        "dense_below": args.dense_below,
        "command": "tca bench e2e " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                               if k not in ("out", "name") and v is not None),
    }
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows, "profiles": profiles}, f, indent=1)
    plot(rows, meta, args.out.rsplit(".", 1)[0] + ".png")
    return 0


def plot(rows: list[dict], meta: dict, path: str) -> None:
    """TTFT, decode tokens/s and peak memory vs prompt length, dense vs the method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = registry.parse_spec(meta["method"])[0]
    ok = [r for r in rows if "ttft_s" in r["dense"] and "ttft_s" in r[name]]
    x = [r["tokens"] // 1024 for r in ok]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, label in zip(axes, ("ttft_s", "decode_tokens_per_s", "peak_mem_gib"),
                              ("time to first token (s)", "decode tokens/s", "peak GPU memory over weights (GiB)")):
        for series in ("dense", name):
            ax.plot(x, [r[series][key] for r in ok], marker="o",
                    label="dense SDPA" if series == "dense" else meta["method"])
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [f"{v}K" for v in x])
        ax.set_xlabel("prompt tokens")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend()
    for r, xv in zip(ok, x):
        axes[0].annotate(f"{r['ttft_speedup']:.2f}x", (xv, r[name]["ttft_s"]), textcoords="offset points",
                         xytext=(0, -14), ha="center", fontsize=8)
    b = meta["budgets"]
    what = f"budgets: {b['file'].rsplit('/', 1)[-1]} tau={b['tau']}" if b else f"method: {meta['method']}"
    fig.suptitle(f"End to end, {meta['device']}, {meta['model']['shape']} shape ({meta['model']['weights']}), "
                 f"{what}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
