"""Where a decode step's GPU time goes: the static step's kernels (the ones a CUDA graph replays),
profiled with torch.profiler around the steady decode steps only and summed by kind, for dense
(keep-all, the engine's split-K decode) and TCA on the Llama-3.1-8B shape with random weights.
The prefill's kernels come with it (`prefill_*`: a profiled run of the prefill and one decode
step, by kind and the top kernels), so a time to first token can be read the same way.

python -m tca_attention.benchmarks.profile_step --budgets docs/results/budgets/smollm2-default-8k.json \
    --tokens 131072 --out profile_step.json [--compile-layers] [--graph]

--compile-layers profiles the steps the compiled graph runs (`tca bench decode-graph
--compile-layers`: inductor's fused kernels instead of the eager norms and rotary); --graph
profiles the CUDA-graph replays themselves instead of eager steps (the same kernels, without the
host's launch gaps between them).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

import torch

from ..clihelp import HelpFormatter
from . import inductor_env, require_cuda

# kernel name substrings -> kind (first match wins)
KINDS = (
    ("attention decode", ("_decode_split", "_decode_combine")),
    ("compiled (inductor) fusions", ("triton_poi_", "triton_red_", "triton_per_", "triton_tem_")),
    ("attention prefill", ("_prefill_kernel", "flash", "fmha", "attention", "cudnn")),
    ("prefill selection", ("_logits_kernel", "_importance_kernel", "_window_", "_row_lse", "_select_kernel",
                           "_pack_kernel", "softmax")),
    ("decode compression / selection", ("select", "compress", "_pack", "topk", "sort", "scatter", "gather", "index")),
    ("weights (GEMM/GEMV)", ("gemm", "gemv", "cutlass", "xmma", "nvjet", "cublas", "splitk")),
    ("norms / rotary / elementwise", ("elementwise", "reduce", "norm", "mul", "add", "copy", "cat", "pow", "rsqrt",
                                      "silu", "neg", "fill", "where", "arange")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    ap.add_argument("--budgets", required=True, help="budget file mapped onto the 8B shape")
    ap.add_argument("--tokens", type=int, default=131072, help="prompt tokens")
    ap.add_argument("--layers", type=int, default=32, help="decoder layers")
    ap.add_argument("--steps", type=int, default=8, help="decode steps profiled")
    ap.add_argument("--compile-layers", action="store_true",
                    help="decoder layers compiled (torch.compile), as `tca bench decode-graph --compile-layers`")
    ap.add_argument("--graph", action="store_true",
                    help="profile the CUDA-graph replays (default: the same static steps run eagerly)")
    ap.add_argument("--out", required=True, help="result JSON path")
    return ap


@torch.no_grad()
def profile(model, method, ids: torch.Tensor, steps: int, compile_layers: bool = False, graph: bool = False) -> dict:
    from ..integration import enable
    from ..integration.static_decode import greedy_static

    with enable(model, method) as session:
        kw = dict(session=session, compile_layers=compile_layers)
        greedy_static(model, ids[:, :8192], max_new_tokens=4, cuda_graph=graph, **kw)  # compile, warm
        run = greedy_static(model, ids, max_new_tokens=steps + 2, cuda_graph=True, **kw)
        graph_ms = 1e3 * run.steady_s / max(run.steady_steps, 1)
        del run
        torch.cuda.empty_cache()
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:  # the prefill and one decode step
            greedy_static(model, ids, max_new_tokens=2, cuda_graph=graph, **kw)
        prefill = {k: us for k, (us, _) in kernel_times(prof).items()}
        torch.cuda.empty_cache()
        # the steady decode steps alone (replays, or eager steps): no prefill kernel in the sums
        steady = torch.profiler.profile(activities=acts)
        eager = 2 if graph and ids.is_cuda else 1  # greedy_static's eager steps (+1 warm-up before a capture)
        run = greedy_static(model, ids, max_new_tokens=steps + 1 + eager, cuda_graph=graph, steady_context=steady, **kw)
        n_steady = run.steady_steps
        del run
        torch.cuda.empty_cache()
    times = kernel_times(steady)
    step = {k: us / n_steady for k, (us, _) in times.items()}
    launches = sum(n for _, n in times.values()) / n_steady
    return {"graph_step_ms": graph_ms, "kernel_ms_per_step": sum(step.values()) / 1e3,
            "kernel_launches_per_step": launches, "steady_steps_profiled": n_steady,
            "kernel_ms_per_step_by_kind": _by_kind(step),
            "top_kernels": [{"us_per_step": u, "name": n[:120]} for u, n in _top(step, 80)],
            "prefill_kernel_ms": sum(prefill.values()) / 1e3, "prefill_kernel_ms_by_kind": _by_kind(prefill),
            "prefill_top_kernels": [{"ms": u / 1e3, "name": n[:120]} for u, n in _top(prefill, 15)]}


def kernel_times(prof) -> dict[str, tuple[float, int]]:
    """A torch.profiler run's device kernels: name -> (self device microseconds, launches).
    Kernels carry their own (self) device time; aten/autograd ops report their kernels' too: left out."""
    out: dict[str, tuple[float, int]] = {}
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
        if us > 0 and not e.key.startswith(("aten::", "autograd::")):
            t, n = out.get(e.key, (0.0, 0))
            out[e.key] = (t + us, n + e.count)
    return out


def _by_kind(us_by_kernel: dict[str, float]) -> dict[str, float]:
    """Milliseconds per kind."""
    out: dict[str, float] = defaultdict(float)
    for k, us in us_by_kernel.items():
        out[kind_of(k)] += us / 1e3
    return dict(out)


def _top(us_by_kernel: dict[str, float], n: int) -> list[tuple[float, str]]:
    return sorted(((us, k) for k, us in us_by_kernel.items()), reverse=True)[:n]


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(prog).parse_args(argv)
    if (rc := require_cuda("profile_step")) is not None:
        return rc
    from ..methods.full_budget import FullBudget
    from ..methods.tca.budgets import Budgets
    from ..methods.tca.method import TCA
    from .bench_e2e import LLAMA_8B, build_model

    model = build_model(args.layers)
    budgets = Budgets.load(args.budgets).mapped_onto(model)
    tca = TCA(budgets, dense_below=0)
    ids = torch.randint(0, LLAMA_8B["vocab_size"], (1, args.tokens), device="cuda")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": args.tokens,
              "steps": args.steps, "compile_layers": args.compile_layers, "graph": args.graph,
              "inductor_env": inductor_env(),
              "command": "profile_step " + " ".join(argv)}
    for label, method in (("tca", tca), ("keep-all", FullBudget(window=tca.window, block_size=tca.block_size))):
        result[label] = profile(model, method, ids, args.steps, args.compile_layers, args.graph)
        print(label, json.dumps({k: v for k, v in result[label].items() if k != "top_kernels"}), flush=True)
        for t in result[label]["top_kernels"][:12]:
            print(f"  {t['us_per_step']:9.1f} us/step  {t['name']}", flush=True)
        for t in result[label]["prefill_top_kernels"][:10]:
            print(f"  {t['ms']:9.1f} ms/prefill  {t['name']}", flush=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
