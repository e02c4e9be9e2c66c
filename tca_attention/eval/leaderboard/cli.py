"""`tca leaderboard`: run a set of methods (density sweeps, or fixed kept fractions) on models over
the accuracy suite at several lengths, then write leaderboard.json, leaderboard.md and PNG plots.

The runs are `tca eval`'s: one resumable run folder per configuration under --results-dir (the
same folders `tca eval` writes, so either command resumes the other's work). Prefill times come
from a `tca bench methods` JSON measured on a GPU (--timings); this command needs no GPU itself.
Wired into the `tca` command by the CLI module: add_leaderboard_parser(subparsers).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ...clihelp import HelpFormatter
from ..cli import add_run_options, run_models
from ..methods import KEPT, SEPARATOR, split_methods
from .matching import DEFAULT_FOCUS, DEFAULT_TARGETS, DEFAULT_TOLERANCE
from .timings import DEFAULT_KEYS

if TYPE_CHECKING:
    from ..runner import EvalConfig

BARE_KEPT = KEPT[:-1]  # NAME@kept: the method at each target fraction
# TCA (its default configuration and the paper's rule) swept by tau, the peers without a registry
# density knob by their own thresholds, and those with one at the target fractions themselves (a
# method's measured fraction decides where it counts)
DEFAULT_METHODS = ("full", "tca:tau=0.5|0.7|0.9,last_q=16,span=7", "tca:tau=0.5|0.7|0.9",
                   "streaming:block_size=16@kept", "xattention:threshold=0.5|0.7|0.9", "flexprefill:gamma=0.5|0.7|0.9",
                   "hip@kept", "longheads@kept", "dhsa@kept", "spatten@kept", "quest@kept", "head-split@kept",
                   "razor@kept")  # duo: list it (its one-time gate optimisation is ~100 backward passes)


def add_leaderboard_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "leaderboard", help="methods side by side at matched kept fractions: accuracy (Pareto plots), "
        "the best method per fraction, prefill times",
        description="Run methods (density sweeps) over the accuracy suite for each model and length (resumable "
        "`tca eval` run folders), then write leaderboard.json, leaderboard.md and PNG plots: accuracy vs attended "
        "fraction per task family, accuracy at matched kept fractions (the best method and its margin), and "
        "prefill times from a `tca bench methods` JSON.",
        formatter_class=HelpFormatter,
    )
    add_run_options(p, methods_default=f"{SEPARATOR} ".join(DEFAULT_METHODS), methods_help=(
        f"methods separated by '{SEPARATOR}': registry specs (`tca methods`) with sweeps key=a|b|c; "
        f"NAME{BARE_KEPT} runs a method with a density knob at each --targets fraction, NAME{KEPT}F at F; "
        "NAME@match=SPEC as in tca eval (docs/eval.md)"))
    p.add_argument("--targets", default=",".join(f"{t:g}" for t in DEFAULT_TARGETS),
                   help="matched kept fractions, a comma list in (0, 1]")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help="a method's sweep point counts at a target only within this distance (fraction units)")
    p.add_argument("--within", default="1,2",
                   help="accuracy bounds in points below full attention, a comma list: the report gives each method's "
                   "least KV within each")
    p.add_argument("--focus", default=DEFAULT_FOCUS,
                   help="the method whose losses to a peer the report lists (a registry name)")
    p.add_argument("--timings", type=Path, default=None,
                   help="JSON of `tca bench methods` (GPU prefill times at 32K-128K; default: none, no timing section)")
    p.add_argument("--timing-key", default=",".join(DEFAULT_KEYS),
                   help="the timing rows' fields to report, a comma list (ttft_s: prefill time matched on the prefill "
                   "fraction; decode_tokens_per_s: decode speed matched on the decode fraction, i.e. bytes read)")
    p.add_argument("--out", type=Path, default=Path("results/leaderboard"),
                   help="folder of leaderboard.json, leaderboard.md and the PNGs")
    p.add_argument("--title", default="Leaderboard", help="title of leaderboard.md")
    p.add_argument("--note", default=None, help="a note shown at the top of leaderboard.md (e.g. what kind of run)")
    p.add_argument("--report-only", type=Path, nargs="+", default=None, metavar="RUN_DIR",
                   help="only rebuild the leaderboard from existing run folders (every result in them; "
                   "default: run the methods first)")
    p.set_defaults(func=run_leaderboard)
    return p


def parse_targets(text: str) -> list[float]:
    try:
        targets = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--targets {text!r}: a comma list of fractions in (0, 1], e.g. 0.25,0.4,0.6") from None
    if not targets or not all(0.0 < t <= 1.0 for t in targets):
        raise ValueError(f"--targets {text!r}: a comma list of fractions in (0, 1], e.g. 0.25,0.4,0.6")
    return targets


def parse_within(text: str) -> list[float]:
    """--within: points (e.g. '1,2') -> fraction units."""
    try:
        points = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        points = []
    if not points or not all(0.0 <= x < 100.0 for x in points):
        raise ValueError(f"--within {text!r}: a comma list of points in [0, 100), e.g. 1,2")
    return [x / 100.0 for x in points]


def leaderboard_methods(text: str, targets: list[float]) -> list[str]:
    """The methods of the command line, NAME@kept spelled out at the targets."""
    values = "|".join(repr(t) for t in targets)
    return [f"{m}={values}" if m.endswith(BARE_KEPT) else m for m in split_methods(text)]


def run_leaderboard(args: argparse.Namespace) -> int:
    from ..report import load_results
    from . import report
    from .timings import load_timings, summarize_timings

    targets = parse_targets(args.targets)
    within = parse_within(args.within)
    if not 0.0 < args.tolerance < 1.0:
        raise ValueError(f"--tolerance {args.tolerance}: a fraction in (0, 1)")
    timings = None
    if args.timings is not None:  # read before any run: a bad file fails now, not after hours
        data = load_timings(args.timings)
        timings = [summarize_timings(data, targets, args.tolerance, key.strip(), source=str(args.timings),
                                     focus=args.focus) for key in args.timing_key.split(",") if key.strip()]
    results, run_info = [], {}
    if args.report_only:
        results = load_results(args.report_only)
        run_info = {"run folders": [str(d) for d in args.report_only]}
    else:
        methods = leaderboard_methods(args.methods, targets)
        t0 = time.perf_counter()
        dirs = []
        for config, run_dir, rs in run_models(args, methods):
            results += _of_config(rs, config)
            dirs.append(str(run_dir))
            print(f"{config.model}: {len(rs)} results in {run_dir} ({time.perf_counter() - t0:.0f} s)")
            t0 = time.perf_counter()
        run_info = {"models": args.model or ["smollm2"], "methods": f"{SEPARATOR} ".join(methods), "tasks": args.tasks,
                    "lengths": args.lengths, "samples per task and length": args.samples, "seed": args.seed,
                    "TCA preset": args.tca_preset, "device": args.device, "dtype": args.dtype or "the loader's",
                    "decode": "static steps in CUDA graphs where a method supports them" if args.cuda_graph
                    else "model.generate()",
                    "run folders": dirs}
    if not results:
        raise ValueError("no results to rank (empty run folders?)")
    board = report.build(results, targets, args.tolerance, args.focus, timings, run_info, within)
    files = report.write(board, args.out, title=args.title, note=args.note)
    print(f"leaderboard: {files['md']}")
    for line in report.least_kv_lines(board):
        print(f"  {line}")
    for line in board["findings"]:
        print(f"  {line}")
    return 0


def _of_config(results: list, config: EvalConfig) -> list:
    """The results of this configuration's methods, tasks, lengths and samples (a run folder may
    hold more, from other invocations)."""
    labels = {s.label for s in config.specs()}
    ids = {f"{t}-{L}-{i:04d}" for t in config.tasks for L in config.lengths for i in range(config.samples)}
    return [r for r in results if r.method in labels and r.sample_id in ids]
