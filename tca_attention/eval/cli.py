"""`tca eval`: run the long-context suite for one or more models and write the report.

Wired into the `tca` command by the CLI module: add_eval_parser(subparsers) and run_eval(args).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from ..clihelp import HelpFormatter
from ..methods.tca.config import PRESETS
from .methods import DEFAULT_METHODS, SDPA_BACKENDS, SEPARATOR, split_methods
from .tasks import TASKS

if TYPE_CHECKING:
    from .runner import EvalConfig

log = logging.getLogger(__name__)


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_run_options(p: argparse.ArgumentParser, methods_default: str, methods_help: str) -> None:
    """The options of a suite run (models, methods, tasks, lengths, TCA calibration, devices,
    run folders), shared by `tca eval` and `tca leaderboard`."""
    p.add_argument("--model", action="append",
                   help="packaged model key or local path (repeatable; default: smollm2)")
    p.add_argument("--methods", default=methods_default, help=methods_help)
    p.add_argument("--tasks", default="all", help=f"comma list or 'all' ({', '.join(TASKS.names())})")
    p.add_argument("--lengths", default="4096", help="comma list of target prompt lengths in tokens")
    p.add_argument("--samples", type=int, default=20, help="samples per task and length")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated samples")
    p.add_argument("--batch-size", type=int, default=1,
                   help="samples of one task run together, left-padded (GPU throughput)")
    p.add_argument("--sdpa-backend", default="auto", choices=SDPA_BACKENDS,
                   help="torch SDPA kernel for the attention transformers runs itself (auto: torch's choice)")
    p.add_argument("--sliding-kernel", action="store_true",
                   help="the model's sliding-window layers (Gemma3) prefilled by the engine's windowed kernel, exact, "
                        "for every method; results go to a run folder of their own")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="model dtype (default: the loader's choice, float32 on the CPU and bfloat16 on CUDA; "
                   "float16 on the CPU runs as float32)")
    p.add_argument("--tca-preset", default="small-context", choices=sorted(PRESETS),
                   help="TCA config preset (small-context: window 512)")
    p.add_argument("--tca-score", default=None, choices=["observation", "column_mean"],
                   help="calibration score choosing TCA's budgets (default: the preset's)")
    p.add_argument("--tau", type=float, default=0.9, help="calibrated tau of method 'tca'")
    p.add_argument("--budgets", type=Path, default=None,
                   help="existing budget file of the model (skips calibration; copied into the run folder; "
                   "default: the per-model cache, calibrating once)")
    p.add_argument("--calibration-length", type=int, default=None,
                   help="calibration tokens (default: min(8192, the model's trained length))")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "reference"],
                   help="TCA executor: auto picks the Triton kernels on CUDA and the PyTorch reference on the CPU")
    p.add_argument("--cuda-graph", action="store_true",
                   help="decode the sparse methods that support it with static steps captured in CUDA graphs "
                   "(same greedy tokens as model.generate(), far less time per step on a GPU; docs/decode.md)")
    p.add_argument("--no-chat-template", action="store_true", help="raw prompts even when the model has a template")
    p.add_argument("--results-dir", type=Path, default=Path("results/eval"), help="root of run folders")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_models(args: argparse.Namespace, methods: list[str]) -> Iterator[tuple[EvalConfig, Path, list]]:
    """Run (or resume) `methods` for each model of `args` (add_run_options), one run folder per
    configuration under --results-dir; yields (config, run folder, every result of it) per model."""
    from .methods import ModelBackend
    from .runner import evaluate

    if args.dtype == "float16" and args.device == "cpu":
        # the loader would upcast anyway; the run's records must name the dtype that ran
        print("note: float16 on the CPU is not supported (it was seen answering empty strings); "
              "running in float32", file=sys.stderr)
        args.dtype = "float32"
    if args.budgets is not None and len(args.model or []) > 1:
        raise SystemExit("--budgets belongs to one model; run the models one at a time")
    configs = configs_of(args, methods)  # every configuration checked before any work
    for config in configs:
        backend = ModelBackend(config.model, device=args.device, dtype=args.dtype, tca_preset=args.tca_preset,
                               tca_score=args.tca_score, tca_tau=args.tau,
                               calibration_length=args.calibration_length, backend=args.backend,
                               budgets_path=args.budgets, sdpa_backend=args.sdpa_backend,
                               cuda_graph=args.cuda_graph, sliding_kernel=args.sliding_kernel)
        run_dir = args.results_dir / config.run_name()
        yield config, run_dir, evaluate(config, backend, run_dir, progress=not args.no_progress)


def configs_of(args: argparse.Namespace, methods: list[str]) -> list:
    """One EvalConfig per model of `args` (add_run_options) with these methods."""
    from .runner import EvalConfig

    tasks = TASKS.names() if args.tasks == "all" else _csv(args.tasks)
    return [EvalConfig(
        model=model, methods=tuple(methods), tasks=tuple(tasks),
        lengths=tuple(int(x) for x in _csv(args.lengths)), samples=args.samples, seed=args.seed,
        chat_template=not args.no_chat_template, tca_preset=args.tca_preset, tca_score=args.tca_score,
        tca_tau=args.tau, dtype=args.dtype, batch_size=args.batch_size, sdpa_backend=args.sdpa_backend,
        sliding_kernel=args.sliding_kernel,
    ) for model in args.model or ["smollm2"]]


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="long-context accuracy suite (needles, aggregation, QA, perplexity)",
        description="Run the long-context task suite for each model and method; resumable. "
        "Writes per-sample JSONL, summary.json, report.md and PNG plots.",
        formatter_class=HelpFormatter,
    )
    add_run_options(p, methods_default=f"{SEPARATOR} ".join(DEFAULT_METHODS), methods_help=(
        f"methods separated by '{SEPARATOR}': registry specs (`tca methods`), e.g. "
        "'full; tca:tau=0.7; streaming:window=1024'; NAME@match=SPEC sets NAME's density knob to keep "
        "what SPEC keeps at each length, NAME@kept=F to keep the fraction F; key=a|b|c sweeps a parameter "
        "(docs/eval.md)"))
    p.add_argument("--report-dir", type=Path, default=None, help="combined report folder (default: --results-dir)")
    p.add_argument("--report-prefix", default="", help="prefix of the combined report's file names, e.g. eval_ (default: none)")
    p.add_argument("--report-only", type=Path, nargs="+", default=None, metavar="RUN_DIR",
                   help="only rebuild the report from existing run folders (default: run the suite)")
    p.set_defaults(func=run_eval)
    return p


def run_eval(args: argparse.Namespace) -> int:
    from .report import load_results, write_report

    if args.report_only:
        out = args.report_dir or args.report_only[0]
        files = write_report(load_results(args.report_only), out, prefix=args.report_prefix)
        print(f"report: {files['report']}")
        return 0
    run_dirs: list[Path] = []
    t0 = time.perf_counter()
    for config, run_dir, results in run_models(args, split_methods(args.methods)):
        files = write_report(results, run_dir, title=f"Long-context accuracy: {config.model}")
        print(f"{config.model}: {len(results)} results in {time.perf_counter() - t0:.0f} s -> {files['report']}")
        run_dirs.append(run_dir)
        t0 = time.perf_counter()
    if len(run_dirs) > 1 or args.report_dir is not None:
        out = args.report_dir or args.results_dir
        files = write_report(load_results(run_dirs), out, prefix=args.report_prefix)
        print(f"combined report: {files['report']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: `python -m tca_attention.eval [options]` (same as `tca eval`)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="tca", formatter_class=HelpFormatter)  # usage reads "tca eval ..."
    sub = parser.add_subparsers(dest="command")
    add_eval_parser(sub)
    args = parser.parse_args(["eval", *(sys.argv[1:] if argv is None else argv)])
    return run_eval(args)
