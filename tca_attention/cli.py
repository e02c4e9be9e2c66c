"""The `tca` command line: a thin layer over the library's configs and functions."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

from .calibration_cache import budgets_path_for, load_or_calibrate
from .config import PRESETS, TCAConfig

log = logging.getLogger("tca")


def _config_from(args) -> TCAConfig:
    base = PRESETS[args.preset]
    keys = ("block_size", "window", "tau", "alpha", "score", "mass_norm")
    changes = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    return base.with_(**changes)


def _add_config_args(p: argparse.ArgumentParser, preset: str = "default") -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default=preset, help="named config (default %(default)s)")
    p.add_argument("--block-size", type=int, dest="block_size")
    p.add_argument("--window", type=int)
    p.add_argument("--tau", type=float)
    p.add_argument("--alpha", type=float)
    p.add_argument("--score", choices=["observation", "column_mean"])
    p.add_argument("--mass-norm", dest="mass_norm", choices=["sum", "max"])


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="packaged model key, .gguf file or HF directory")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "reference"])


def _print_budget_summary(b) -> None:
    print(f"\nBudgets: tau={b.config.tau} score={b.config.score} b={b.config.block_size} w={b.config.window}")
    print(f"{'layer':>5}  {'mean kept (global region)':>26}  {'dense heads':>11}")
    for r in b.summary_rows():
        if r["kind"] != "tca":
            print(f"{r['layer']:>5}  {'sliding (untouched)':>26}")
        else:
            print(f"{r['layer']:>5}  {r['mean_kept']:>26.3f}  {r['dense_heads']:>11}")
    print(f"mean kept fraction {b.mean_kept_fraction:.3f}, dense heads {b.dense_heads}")


def cmd_calibrate(args) -> int:
    from .calibration import calibrate
    from .models import load_model

    config = _config_from(args)
    model, tok = load_model(args.model, device=args.device)
    text = Path(args.text_file).read_text() if args.text_file else None
    b = calibrate(model, tok, config, text=text, length=args.length)
    out = Path(args.out) if args.out else budgets_path_for(args.model, config, args.length)
    b.save(out)
    _print_budget_summary(b)
    print(f"\nwrote {out}")
    return 0


def _read_prompt(args) -> str:
    if args.prompt_file == "-":
        context = sys.stdin.read()
    elif args.prompt_file:
        context = Path(args.prompt_file).read_text()
    else:
        context = ""
    return context + (("\n\n" + args.question) if args.question else "")


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _print_results(results, prompt_tokens: int) -> None:
    print(f"\nprompt: {prompt_tokens} tokens")
    hdr = f"{'method':<8} {'prefill s':>9} {'decode tok/s':>12} {'KV held':>11} {'KV dense':>11} {'ratio':>6} {'retained':>8}  answer"
    print(hdr)
    for r in results:
        tps = f"{r.decode_tokens_per_s:.1f}" if r.decode_tokens_per_s else "-"
        ret = f"{r.retained_last_query:.3f}" if r.retained_last_query is not None else "-"
        print(f"{r.method:<8} {r.prefill_s:>9.2f} {tps:>12} {_fmt_bytes(r.kv_bytes):>11} "
              f"{_fmt_bytes(r.dense_kv_bytes):>11} {r.kv_ratio:>6.2f} {ret:>8}  {r.answer.strip()!r}")


def cmd_generate(args) -> int:
    from .data.passkey import passkey_prompt
    from .generation import run_prompt
    from .methods.tca import TCA
    from .models import load_model

    config = _config_from(args)
    model, tok = load_model(args.model, device=args.device)
    if args.passkey:
        pk = passkey_prompt(tok, args.passkey, depth=args.depth, seed=args.seed)
        prompt, expected = pk.text, pk.answer
    else:
        prompt, expected = _read_prompt(args), None
    if not prompt.strip():
        raise SystemExit("error: empty prompt (give --prompt-file, stdin, --question or --passkey N)")
    budgets = load_or_calibrate(model, tok, args.model, config, args.budgets, args.calibration_length)
    runs = []
    if args.mode in ("both", "full"):
        runs.append(run_prompt(model, tok, prompt, None, args.max_new_tokens, args.backend))
    if args.mode in ("both", "tca"):
        runs.append(run_prompt(model, tok, prompt, TCA(budgets), args.max_new_tokens, args.backend))
    if args.json:
        print(json.dumps({"expected": expected, "config": asdict(config), "runs": [r.to_dict() for r in runs]}, indent=1))
    else:
        _print_results(runs, runs[0].prompt_tokens)
        if expected:
            for r in runs:
                print(f"{r.method}: passkey {expected} {'found' if expected in r.answer else 'MISSED'}")
    return 0


def cmd_demo(args) -> int:
    """The main job: calibrate the embedded model once, then full vs TCA on a 4K passkey prompt."""
    args.passkey = args.passkey or 4096
    print(f"Demo: {args.model}, TCA preset '{args.preset}' (w={_config_from(args).window}, suited to an "
          f"8K-context model; the paper's w=4096 is the 'default' preset), passkey at {args.passkey} tokens")
    return cmd_generate(args)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tca", description="TCA-Attention: context-adaptive sparse attention")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("calibrate", help="calibrate a model once and write its budget file")
    _add_model_args(p)
    _add_config_args(p)
    p.add_argument("--text-file", help="calibration text (default: the packaged essays)")
    p.add_argument("--length", type=int, help="calibration tokens (default min(8192, trained length))")
    p.add_argument("--out", help="budget file path (default: the per-model cache)")
    p.set_defaults(func=cmd_calibrate)

    for name, func, preset, help_ in (
        ("generate", cmd_generate, "default", "run a long prompt with full attention and/or TCA"),
        ("demo", cmd_demo, "small-context", "the main job on the embedded model: calibrate + passkey, full vs TCA"),
    ):
        p = sub.add_parser(name, help=help_)
        _add_model_args(p)
        _add_config_args(p, preset)
        p.add_argument("--budgets", help="budget file (default: cached calibration, made once)")
        p.add_argument("--calibration-length", type=int)
        p.add_argument("--prompt-file", help="long prompt file, or - for stdin")
        p.add_argument("--question", help="appended after the prompt")
        p.add_argument("--passkey", type=int, help="build a passkey prompt of this many tokens instead")
        p.add_argument("--depth", type=float, default=0.5)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--mode", choices=["both", "tca", "full"], default="both")
        p.add_argument("--max-new-tokens", type=int, default=16)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(func=func)

    try:
        from .eval.cli import add_eval_parser

        add_eval_parser(sub)
    except ImportError:  # pragma: no cover - eval extras missing
        pass
    try:
        from .bench import add_bench_parser

        add_bench_parser(sub)
    except ImportError:  # pragma: no cover
        pass
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
