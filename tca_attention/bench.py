"""`tca bench NAME [ARGS]`: the GPU benchmarks of tca_attention.benchmarks, run by name.

Benchmarks are scripts, not timed tests; results go to JSON (+ PNG) with device, versions,
shapes and the command recorded. See docs/kernels.md and docs/results/. Building this parser
imports nothing heavy; a benchmark module (torch, transformers) is imported only to run it.
`tca bench NAME --help` shows that benchmark's own options.
"""
from __future__ import annotations

import argparse
import importlib

from .clihelp import HelpFormatter

SCRIPTS = {
    "kernels": ("bench_kernels", "per-layer prefill/decode attention: dense SDPA backends vs TCA kernels (CUDA)"),
    "e2e": ("bench_e2e", "time to first token, decode tokens/s, peak memory on a Llama-3.1-8B-shaped model (CUDA)"),
    "methods": ("bench_methods", "every registry method (density sweeps) vs dense: TTFT, decode tokens/s, attended fractions (CUDA)"),
    "passkey": ("passkey_sweep", "passkey retrieval on a real model: full vs TCA variants (CUDA by default)"),
    "decode-graph": ("bench_decode_graph", "decode tokens/s, dense vs TCA, eager vs CUDA-graph static steps (CUDA)"),
    "tp": ("bench_tp", "tensor parallel under torchrun: TTFT, decode tokens/s, per-GPU peak memory on N GPUs, dense vs a method"),
}


def cmd_bench(args: argparse.Namespace) -> int:
    module = importlib.import_module(f".benchmarks.{SCRIPTS[args.which][0]}", __package__)
    return module.main(list(args.script_args), prog=f"tca bench {args.which}")


def add_bench_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help="GPU benchmarks (kernels, e2e, methods, passkey, decode-graph, tp); arguments after the name go to the benchmark",
        description="Run a benchmark by name; `tca bench NAME --help` lists its options.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("which", choices=sorted(SCRIPTS), metavar="NAME",
                   help="; ".join(f"{k}: {v[1]}" for k, v in SCRIPTS.items()))
    p.add_argument("script_args", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="options of the benchmark (see tca bench NAME --help)")
    p.set_defaults(func=cmd_bench)
