"""`tca bench`: the GPU benchmark scripts of a source checkout (benchmarks/), run by name.

Benchmarks are scripts, not timed tests; results go to JSON (+ PNG) with device, versions,
shapes and the command recorded. See docs/kernels.md and docs/results/.
"""
from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

SCRIPTS = {
    "kernels": ("bench_kernels.py", "per-layer prefill/decode attention: dense SDPA backends vs TCA kernels"),
    "e2e": ("bench_e2e.py", "time to first token, decode tokens/s, peak memory on a Llama-3.1-8B-shaped model"),
    "passkey": ("passkey_sweep.py", "passkey retrieval on a real model: full vs TCA variants"),
}


def _scripts_dir() -> Path:
    here = Path(__file__).resolve().parent.parent / "benchmarks"
    if not here.is_dir():
        raise FileNotFoundError("tca bench needs a source checkout (the benchmarks/ folder next to tca_attention/)")
    return here


def cmd_bench(args: argparse.Namespace) -> int:
    script = _scripts_dir() / SCRIPTS[args.which][0]
    sys.argv = [str(script), *args.script_args]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="GPU benchmarks (kernels, e2e, passkey); args after the name go to the script")
    p.add_argument("which", choices=sorted(SCRIPTS), help="; ".join(f"{k}: {v[1]}" for k, v in SCRIPTS.items()))
    p.add_argument("script_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)
