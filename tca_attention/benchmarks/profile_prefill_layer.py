"""Where one layer's TCA prefill time goes: the selection (TCA.plan's fused Triton path, in the
chosen options), the compaction of the kept K/V with the per-tile bounds (prepare_prefill) and the
sparse attention kernel, each timed alone (CUDA events) and profiled by kernel (torch.profiler),
on the Llama-3.1-8B head shape with random bf16 inputs. A step whose wall time is well above the
sum of its kernels is bound by launches, one whose kernels are well above the bytes they must read
(`bound_us`: K once per pass at the GPU's bandwidth) is worth a kernel change.

python -m tca_attention.benchmarks.profile_prefill_layer --tokens 131072 --fraction 0.10 \
    --last-q 16 --span 7 --out profile_prefill_layer.json
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from ..clihelp import HelpFormatter
from . import require_cuda
from .profile_step import kernel_times


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    ap.add_argument("--tokens", type=int, default=131072, help="prompt tokens")
    ap.add_argument("--fraction", type=float, default=0.10, help="kept fraction of the keys (random per-head budgets)")
    ap.add_argument("--window", type=int, default=4096, help="local window w in tokens")
    ap.add_argument("--block", type=int, default=128, help="block size b in tokens")
    ap.add_argument("--last-q", type=int, default=16, help="TCA option last_q (1: the paper's rule)")
    ap.add_argument("--span", type=int, default=7, help="TCA option span (1: the paper's rule)")
    ap.add_argument("--reps", type=int, default=5, help="profiled calls of each step")
    ap.add_argument("--bandwidth-tbs", type=float, default=None,
                    help="device memory bandwidth for the bounds (default: bench_decode_graph's table by device name)")
    ap.add_argument("--out", required=True, help="result JSON path")
    return ap


def kernel_us(fn, reps: int) -> tuple[dict[str, float], dict[str, int]]:
    """Device microseconds and launches per call of fn, by kernel name (averaged over reps calls)."""
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    times = kernel_times(prof)
    return {k: us / reps for k, (us, _) in times.items()}, {k: max(1, n // reps) for k, (_, n) in times.items()}


def step_report(name: str, fn, reps: int, bound_us: float | None) -> dict:
    from ..engine.timing import bench_ms

    wall = bench_ms(fn, target_ms=100)["median_ms"]
    us, calls = kernel_us(fn, reps)
    total = sum(us.values())
    row = {"wall_ms": wall, "kernel_ms": total / 1e3, "launches": sum(calls.values()),
           "kernels": [{"us": round(u, 2), "launches": calls[k], "name": k[:140]}
                       for u, k in sorted(((u, k) for k, u in us.items()), reverse=True)]}
    if bound_us is not None:
        row["bound_us"] = bound_us
    print(f"{name}: wall {wall:.3f} ms, kernels {total / 1e3:.3f} ms in {row['launches']} launches"
          + (f", bandwidth bound {bound_us:.0f} us" if bound_us else ""), flush=True)
    for k in row["kernels"][:12]:
        print(f"  {k['us']:9.1f} us  x{k['launches']:<3d} {k['name']}", flush=True)
    return row


@torch.no_grad()
def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(prog).parse_args(argv)
    if (rc := require_cuda("profile_prefill_layer")) is not None:
        return rc
    from ..engine.triton_common import next_pow2
    from ..engine.triton_prefill import default_config, prepare_prefill, sparse_prefill_triton
    from .bench_decode_graph import BANDWIDTH_TBS
    from .bench_kernels import D, KV, H, Selector, head_budgets

    name = torch.cuda.get_device_name()
    tbs = args.bandwidth_tbs or next((v for key, v in BANDWIDTH_TBS if key in name), None)
    if tbs is None:
        build_parser(prog).error(f"no bandwidth known for {name!r}: pass --bandwidth-tbs")

    L, dev, dt = args.tokens, torch.device("cuda"), torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, H, L, D, device=dev, dtype=dt)
    k = torch.randn(1, KV, L, D, device=dev, dtype=dt)
    v = torch.randn(1, KV, L, D, device=dev, dtype=dt)
    scaling = D ** -0.5
    p = head_budgets(args.fraction, L, args.window, args.block, gen).to(dev)
    sel = Selector(p, L, args.window, args.block, 0.5, "triton", args.last_q, span=args.span)
    plan = sel(q, k, scaling)
    cfg = default_config(D, dev)
    block_p = max(cfg.block_m, next_pow2(H // KV)) // next_pow2(H // KV)
    gbps = 1e3 * tbs
    k_bytes = k.numel() * k.element_size()
    kept = int(plan.kept_len.sum())
    result = {"device": name, "torch": torch.__version__, "tokens": L,
              "fraction": args.fraction, "kept_global_fraction": kept / (KV * L), "last_q": args.last_q, "span": args.span,
              "window": args.window, "block": args.block, "prefill_config": str(cfg), "bandwidth_gbps": gbps,
              "command": "profile_prefill_layer " + " ".join(argv)}
    # selection: two passes over K (the stats, the importance); compaction: kept K and V read and written
    result["selection"] = step_report("selection", lambda: sel(q, k, scaling), args.reps, 2 * k_bytes / gbps / 1e3)
    result["compaction"] = step_report("compaction", lambda: prepare_prefill(k, v, plan, block_p), args.reps,
                                       4 * kept * D * k.element_size() / gbps / 1e3)
    result["attention"] = step_report("attention", lambda: sparse_prefill_triton(q, k, v, plan, scaling, config=cfg),
                                      min(args.reps, 3), None)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
