"""The `tca` command line: a thin layer over the library's configs and functions.

Building the parser imports neither torch nor transformers (`tca --help` answers at once); each
command imports what it needs when it runs. Results go to stdout, everything else (banners,
progress, what was chosen and why) to stderr, so `--json` output can be piped as it is.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .clihelp import HelpFormatter
from .methods.tca.config import AUTO, PRESETS, TCAConfig, auto_preset
from .registry import DEFAULT_METHOD

log = logging.getLogger("tca")
CONFIG_KEYS = ("block_size", "window", "tau", "alpha", "score", "mass_norm")
# fixed by calibration: a budget file's values win, and a differing option is refused
CALIBRATED_KEYS = ("block_size", "window", "alpha", "mass_norm")
# options that choose TCA's budgets; a --method spec of tca may set the first six too
TCA_SPEC_KEYS = ("preset", "window", "tau", "score", "alpha", "budgets")
TCA_OPTIONS = (*TCA_SPEC_KEYS, "block_size", "mass_norm", "calibration_length")
DEMO_PASSKEY_TOKENS = 4096
EXIT_MISSED = 1  # a passkey run whose answer lacks the key
EXIT_ERROR = 2


def note(line: str) -> None:
    """A line for the person at the terminal: stderr, so stdout holds only results."""
    print(line, file=sys.stderr, flush=True)


def _trained_length(model) -> int | None:
    from .introspect import text_config

    return getattr(text_config(model), "max_position_embeddings", None)


def _config_from(args, model=None) -> TCAConfig:
    """The TCA config of the options; preset `auto` looks at the model's trained length."""
    preset = args.preset
    if preset == AUTO:
        if getattr(args, "window", None) is not None or getattr(args, "budgets", None):
            preset = "default"  # the window is given (or comes from the budget file)
        else:
            preset, why = auto_preset(_trained_length(model) if model is not None else None)
            note(why)
    changes = {k: getattr(args, k) for k in CONFIG_KEYS if getattr(args, k, None) is not None}
    return PRESETS[preset].with_(**changes)


def _check_against_file(args, budgets) -> None:
    """Options fixed by calibration must agree with a given budget file."""
    given = {k: getattr(args, k) for k in CALIBRATED_KEYS if getattr(args, k, None) is not None}
    diff = {k: (v, getattr(budgets.config, k)) for k, v in given.items() if getattr(budgets.config, k) != v}
    if diff:
        opts = ", ".join(f"--{k.replace('_', '-')} {v} (file: {f})" for k, (v, f) in diff.items())
        raise ValueError(f"{opts}: these are fixed by calibration; the budget file {args.budgets} was calibrated "
                         "otherwise (only --tau and --score re-select from a file)")


def _load(args):
    """The model of the options, after checking the device and dtype."""
    import torch

    from .models import check_model_dtype, load_model

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available here (torch {torch.__version__})")
    dtype = None if args.dtype == "auto" else args.dtype
    model, tok = load_model(args.model, device=args.device, dtype=dtype)
    check_model_dtype(model)
    return model, tok


def _print_budget_summary(b) -> None:
    print(f"\nBudgets: tau={b.config.tau} score={b.config.score} b={b.config.block_size} w={b.config.window}")
    print(f"{'layer':>5}  {'mean kept (global region)':>26}  {'dense heads':>11}")
    for r in b.summary_rows():
        if r["kind"] != "tca":
            print(f"{r['layer']:>5}  {'sliding (untouched)':>26}")
        else:
            print(f"{r['layer']:>5}  {r['mean_kept']:>26.3f}  {r['dense_heads']:>11}")
    print(f"mean kept fraction {b.mean_kept_fraction:.3f}, dense heads {b.dense_heads}")


def cmd_methods(args) -> int:
    from .registry import describe

    print(describe())
    return 0


def cmd_calibrate(args) -> int:
    from .integration.probe import calibrate
    from .methods.tca.budget_cache import budgets_path_for, calibration_notice

    from .methods.tca.calibration import CalibrationSet

    plan = CalibrationSet(samples=args.samples, lengths=CalibrationSet.parse_lengths(args.lengths or ""),
                          combine=args.combine)  # checked before the model loads
    model, tok = _load(args)
    config = _config_from(args, model)
    text = Path(args.text_file).read_text() if args.text_file else None
    out = Path(args.out) if args.out else budgets_path_for(args.model, config, args.length, plan)
    note(calibration_notice(model, config, args.length, out, plan))
    b = calibrate(model, tok, config, text=text, length=args.length, plan=plan)
    b.save(out)
    _print_budget_summary(b)
    print(f"\nwrote {out}")
    return 0


def cmd_probe_layers(args) -> int:
    """The per-layer probe behind dense_at=auto: a table per layer and the layers it keeps dense."""
    from . import registry
    from .integration.probe import ModelProbe, load_or_calibrate
    from .methods.tca.layer_probe import ProbeSettings, load_or_probe

    settings = ProbeSettings(length=args.length, prompts=args.prompts)  # checked before the model loads
    if not 0.0 <= args.min_agreement <= 1.0:
        raise ValueError(f"--min-agreement must be in [0, 1], got {args.min_agreement}")
    if not args.max_kl >= 0.0:
        raise ValueError(f"--max-kl must be >= 0 (inf: agreement only), got {args.max_kl}")
    _, options = registry.parse_spec("tca:" + args.options) if args.options else ("tca", {})
    if bad := sorted(set(options) - {"last_q", "gqa", "floor", "span"}):
        raise ValueError(f"--options takes TCA's selection options (last_q, gqa, floor, span), not {', '.join(bad)}")
    model, tok = _load(args)
    config = _config_from(args, model)
    budgets = load_or_calibrate(model, tok, args.model, config, args.budgets, args.calibration_length)
    result = load_or_probe(ModelProbe(model), tok, args.model, budgets, options, settings)
    chosen = result.dense_layers(args.min_agreement, args.max_kl)
    print(f"TCA in one layer at a time (tau {budgets.config.tau}, {result.settings['prompts']} needle prompts of "
          f"{result.settings['length']} tokens, {result.settings['answer_tokens']} answer tokens); dense attention "
          f"answers {100 * result.settings['dense_answer_accuracy']:.0f}% of them")
    print(f"{'layer':>5}  {'agreement':>9}  {'KL/token':>8}  {'kept':>5}")
    for i, (a, k, f) in enumerate(zip(result.agreement, result.kl, result.kept)):
        if a is None:
            print(f"{i:>5}  {'(not a TCA layer)':>24}")
            continue
        flag = "  <- dense" if i in chosen else ""
        print(f"{i:>5}  {a:>9.3f}  {k:>8.4f}  {100 * f:>4.0f}%{flag}")
    spec = "/".join(map(str, chosen)) if chosen else "none"
    print(f"\ndense_at=auto with probe_min={args.min_agreement}, probe_max_kl={args.max_kl} keeps dense: {spec}")
    if args.out:
        result.save(args.out)
        print(f"wrote {args.out}")
    if args.plot:
        from .layer_probe_plot import plot_layer_probes

        title = (f"{Path(args.model).name}, tau {budgets.config.tau}, {result.settings['length']} tokens, "
                 f"{result.settings['prompts']} prompts")
        rows = [(i, a, k) for i, (a, k) in enumerate(zip(result.agreement, result.kl)) if a is not None]
        print(f"wrote {plot_layer_probes([(title, rows)], args.plot, args.min_agreement, args.max_kl)}")
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
    hdr = (f"{'method':<8} {'prefill s':>9} {'decode tok/s':>12} {'KV held':>11} {'KV dense':>11} {'ratio':>6} "
           f"{'retained':>8} {'min':>6} {'bound':>7}  answer")
    print(hdr)
    for r in results:
        tps = f"{r.decode_tokens_per_s:.1f}" if r.decode_tokens_per_s else "-"
        ret = f"{r.retained_last_query:.3f}" if r.retained_last_query is not None else "-"
        low = f"{r.retained_last_query_min:.3f}" if r.retained_last_query_min is not None else "-"
        bnd = f"{r.error_bound:.3g}" if r.error_bound is not None else "-"
        print(f"{r.method:<8} {r.prefill_s:>9.2f} {tps:>12} {_fmt_bytes(r.kv_bytes):>11} "
              f"{_fmt_bytes(r.dense_kv_bytes):>11} {r.kv_ratio:>6.2f} {ret:>8} {low:>6} {bnd:>7}  {r.answer.strip()!r}")
    for r in results:
        _print_certificate(r)


def _print_certificate(r) -> None:
    """Per layer: the retained mass of the selection queries (min / mean over KV heads) and the
    paper's bound on their output error (max / mean), engine/certificate.py."""
    rows = [c for c in r.certificate if "retained_min" in c]
    if not rows or all(c["kept_fraction"] is None for c in rows):
        return
    print(f"\ncertificate of {r.method} (per layer; bound: 2 (1 - retained) ||V||_inf on the selection "
          "queries' mean ||out - out_dense||_1)")
    print(f"{'layer':>5} {'kept':>6} {'retained min':>12} {'mean':>6} {'bound max':>9} {'mean':>7}")
    for c in rows:
        kept = "dense" if c["kept_fraction"] is None else f"{c['kept_fraction']:.3f}"
        print(f"{c['layer']:>5} {kept:>6} {c['retained_min']:>12.3f} {c['retained_mean']:>6.3f} "
              f"{c['bound_max']:>9.3g} {c['bound_mean']:>7.3g}")


def _tca_args(args, params: dict[str, Any]) -> argparse.Namespace:
    """The options with a tca spec's calibration parameters in them (a differing option is an error)."""
    merged = {}
    for key in TCA_SPEC_KEYS:
        if key in params:
            given = getattr(args, key)
            if given not in (None, AUTO) and given != params[key]:
                raise ValueError(f"--{key} {given} and --method {args.method} disagree")
            merged[key] = params[key]
    return argparse.Namespace(**{**vars(args), **merged})


def _plain_fields(method) -> dict[str, Any]:
    """A method's settings for the JSON report (dataclass fields of plain values)."""
    if not dataclasses.is_dataclass(method):
        return {}
    return {f.name: getattr(method, f.name) for f in dataclasses.fields(method)
            if f.init and isinstance(getattr(method, f.name), (int, float, str, bool))}


def _method_spec(args) -> tuple[str, dict[str, Any]]:
    """The --method's (name, params), checked before the model loads: a registry spec, and the
    TCA options only with tca (any other method takes its parameters in its spec)."""
    from . import registry

    try:
        name, params = registry.parse_spec(registry.split(args.method)[0])  # the base of a composite
    except KeyError as e:  # an unknown name: a usage error like the others
        raise ValueError(e.args[0]) from None
    given = [f"--{k.replace('_', '-')}" for k in TCA_OPTIONS if getattr(args, k, None) not in (None, AUTO)]
    if name != "tca" and given:
        raise ValueError(f"{', '.join(given)}: TCA options, but --method is {name} (give its parameters in "
                         f"the spec, e.g. {name}:key=value; `tca methods` lists them)")
    if params.get("preset", AUTO) not in (AUTO, *PRESETS):
        raise ValueError(f"--method {args.method}: unknown TCA preset {params['preset']!r}; known: {', '.join(PRESETS)}")
    return name, params


def _method(args, build: bool):
    """(the --method's Method, or None when not built, and its settings for the JSON report).

    tca takes the TCA options (config, budget file, calibration) merged with its spec; any other
    method is built by the registry from its spec alone."""
    from . import registry
    from .integration.probe import load_or_calibrate
    from .methods.tca.budgets import Budgets

    model, tok = args._model
    name, params = _method_spec(args)
    if name != "tca":
        method = registry.create(args.method, model=model, tokenizer=tok)
        return (method if build else None), _plain_fields(method)
    targs = _tca_args(args, params)
    if targs.budgets and build:
        _check_against_file(targs, Budgets.load(targs.budgets, model=model))
    config = _config_from(targs, model)
    if not build:
        return None, asdict(config)
    budgets = load_or_calibrate(model, tok, args.model, config, targs.budgets, args.calibration_length)
    rest = {k: params[k] for k in params if k not in TCA_SPEC_KEYS}  # e.g. dense_below
    calibrator = registry.split(args.method)[1]  # tca+zerotuning: the calibrator stacks on the budgets' TCA
    spec = registry.format_spec(name, rest) + (registry.COMPOSE + calibrator if calibrator else "")
    return registry.create(spec, model=model, tokenizer=tok, budgets=budgets), asdict(budgets.config)


def _run(args, prompt: str, expected: str | None) -> int:
    """Build the --method (calibrating or loading TCA's budgets), run the prompt with it and/or
    full attention, report, exit code."""
    from .generation import run_prompt

    model, tok = args._model
    mode = "method" if args.mode == "tca" else args.mode
    method, config = _method(args, build=mode != "full")
    if mode == "both" and method.is_dense:
        raise ValueError(f"--method {args.method} is full attention: use --mode full")
    runs = []
    if mode in ("both", "full"):
        runs.append(run_prompt(model, tok, prompt, None, args.max_new_tokens, args.backend))
    if method is not None:
        runs.append(run_prompt(model, tok, prompt, method, args.max_new_tokens, args.backend))
    found = {r.method: expected in r.answer for r in runs} if expected else {}
    missed = [m for m, ok in found.items() if not ok]
    if args.json:
        from .registry import normalize

        doc = {"expected": expected, "method": normalize(args.method), "config": config,
               "runs": [r.to_dict() for r in runs]}
        if expected:
            doc["found"] = found
        print(json.dumps(doc, indent=1), file=args._stdout, flush=True)
    else:
        _print_results(runs, runs[0].prompt_tokens)
        for m, ok in found.items():
            print(f"{m}: passkey {expected} {'found' if ok else 'MISSED'}")
    if missed:
        note(f"passkey {expected} MISSED by {', '.join(missed)} (exit status {EXIT_MISSED})")
        return EXIT_MISSED
    return 0


def cmd_generate(args) -> int:
    if args.passkey is not None and (args.prompt_file or args.question):
        raise ValueError("give either --passkey N or --prompt-file/--question, not both")
    if args.passkey is None and not args.prompt_file and not args.question:
        raise ValueError("nothing to run: give --prompt-file F (or - for stdin), --question Q or --passkey N")
    if args.passkey is None:
        prompt, expected = _read_prompt(args), None
        if not prompt.strip():
            raise SystemExit("error: empty prompt (give --prompt-file, stdin, --question or --passkey N)")
    _method_spec(args)
    args._model = _load(args)
    if args.passkey is not None:
        from .data.passkey import passkey_prompt

        pk = passkey_prompt(args._model[1], args.passkey, depth=args.depth, seed=args.seed)
        prompt, expected = pk.text, pk.answer
    return _run(args, prompt, expected)


def cmd_demo(args) -> int:
    """The main job: calibrate the model once, then full vs TCA (or --method) on a passkey prompt."""
    from .data.passkey import passkey_prompt

    methods = {"both": f"full and {args.method}", "full": "full"}.get(args.mode, args.method)
    note(f"Demo: {args.model}, a {args.passkey}-token passkey prompt (key at depth {args.depth}), methods: {methods}")
    _method_spec(args)
    args._model = _load(args)
    pk = passkey_prompt(args._model[1], args.passkey, depth=args.depth, seed=args.seed)
    return _run(args, pk.text, pk.answer)


# -- parser ---------------------------------------------------------------------------------
def _add_config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("TCA config (a preset, then single values over it)")
    g.add_argument("--preset", choices=[AUTO, *sorted(PRESETS)], default=AUTO,
                   help="named config: auto picks 'default' (the paper's w=4096) for models trained on >= 64K "
                   "tokens, else 'small-context' (w=512), said on stderr; with --window or --budgets given it "
                   "stands for 'default'")
    g.add_argument("--block-size", type=int, dest="block_size",
                   help=f"block size b in tokens, a power of two (default: the preset's, {TCAConfig.block_size})")
    g.add_argument("--window", type=int,
                   help="local window w in tokens, always kept (default: the preset's: 4096, or 512 for small-context)")
    g.add_argument("--tau", type=float,
                   help=f"retained-attention threshold in (0, 1] choosing each head's budget (default: the preset's, "
                   f"{TCAConfig.tau})")
    g.add_argument("--alpha", type=float,
                   help=f"weight of the concentration term, in [0, 1] (default: the preset's, {TCAConfig.alpha}; "
                   "paper-alpha: 0.5)")
    g.add_argument("--score", choices=["observation", "column_mean"],
                   help=f"calibration score choosing the budgets (default: the preset's, {TCAConfig.score})")
    g.add_argument("--mass-norm", dest="mass_norm", choices=["sum", "max"],
                   help=f"scale of the block-mass term (default: the preset's, {TCAConfig.mass_norm})")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="smollm2", help="packaged model key (smollm2, gemma3-270m, "
                   "qwen2.5-coder-0.5b), .gguf file or HF directory")
    g.add_argument("--device", default="cpu", help="cpu or cuda")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model dtype; auto: float32 on the CPU, bfloat16 on CUDA; float16 on the CPU runs as float32")
    g.add_argument("--backend", default="auto", choices=["auto", "triton", "reference"],
                   help="TCA executor: auto picks the Triton kernels on CUDA and the PyTorch reference on the CPU")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budgets", help="budget file from `tca calibrate` (default: the per-model cache, calibrating "
                   "once if it is empty)")
    p.add_argument("--calibration-length", type=int,
                   help="calibration tokens when calibrating (default: min(8192, the model's trained length))")
    p.add_argument("--depth", type=float, default=0.5, help="where the passkey sits in the prompt, 0 = start, 1 = end")
    p.add_argument("--seed", type=int, default=0, help="seed of the passkey and of the essay excerpt")
    p.add_argument("--method", default=DEFAULT_METHOD, metavar="SPEC",
                   help="the method to run: a registry spec, e.g. tca:last_q=16,span=7 (the default "
                   "configuration), tca (the paper's rule), tca:tau=0.7, streaming:window=1024 (`tca methods` "
                   "lists them); the TCA options above apply to tca only")
    p.add_argument("--mode", choices=["both", "method", "full", "tca"], default="both",
                   help="full attention, the --method, or both on the same prompt (tca: the former name of method)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated (greedy) after the prompt")
    p.add_argument("--json", action="store_true",
                   help="print only a JSON document on stdout (messages and progress stay on stderr)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tca", description="TCA-Attention: context-adaptive sparse attention",
                                 formatter_class=HelpFormatter,
                                 epilog="`tca COMMAND --help` lists the options of a command.")
    ap.add_argument("-v", "--verbose", action="store_true", help="log details, and show tracebacks of errors")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND", help="one of:")

    p = sub.add_parser("demo", formatter_class=HelpFormatter,
                       help="the main job: calibrate once, then a passkey prompt with full attention and TCA (or --method)",
                       description="Calibrate the model once (cached), build a passkey prompt of real essays, "
                       "answer it with full attention and with TCA side by side. Exit status 1 when a method "
                       "misses the passkey.")
    _add_model_args(p)
    _add_config_args(p)
    p.add_argument("--passkey", type=int, default=DEMO_PASSKEY_TOKENS, metavar="TOKENS",
                   help="length of the passkey prompt in tokens")
    _add_run_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("generate", formatter_class=HelpFormatter,
                       help="run a long prompt (file, stdin or passkey) with full attention and/or a method (TCA by default), timed",
                       description="Run one long prompt with full attention and/or a method (--method SPEC, default "
                       "tca): answer, prefill time, "
                       "decode speed, KV bytes. With --passkey the exit status is 1 when a method misses the key.")
    _add_model_args(p)
    _add_config_args(p)
    p.add_argument("--prompt-file", help="long prompt file, or - for stdin (default: none; then --question or "
                   "--passkey)")
    p.add_argument("--question", help="text appended after the prompt file (or the whole prompt without one)")
    p.add_argument("--passkey", type=int, metavar="TOKENS",
                   help="instead of a prompt: a passkey prompt of this many tokens (exit status 1 if missed)")
    _add_run_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("calibrate", formatter_class=HelpFormatter,
                       help="calibrate a model once and write its budget file",
                       description="One dense forward over real text; per layer and KV head, the cheapest "
                       "budget keeping tau of the attention. Shows a per-layer summary.")
    _add_model_args(p)
    _add_config_args(p)
    p.add_argument("--text-file", help="calibration text (default: the packaged Paul Graham essays)")
    p.add_argument("--length", type=int, help="calibration tokens (default: min(8192, the model's trained length))")
    p.add_argument("--samples", type=int, default=1,
                   help="calibration texts per length (consecutive windows of the essays; 1 with --text-file)")
    p.add_argument("--lengths", help="several calibration lengths, token counts joined by '/' (e.g. 2048/4096/8192; "
                   "overrides --length)")
    p.add_argument("--combine", choices=("mean", "min"), default="mean",
                   help="how the samples' retained scores combine per head and budget (min: the worst text)")
    p.add_argument("--out", help="budget file path (default: the per-model cache that demo and generate read; with "
                   "--samples/--lengths/--combine the cache entry of the matching tca:calib_* spec: hand it to "
                   "generate with --budgets)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("probe-layers", formatter_class=HelpFormatter,
                       help="which layers TCA should leave dense (the probe behind tca:dense_at=auto)",
                       description="Dense attention once, then TCA in one layer at a time (every other layer "
                       "dense) on needle prompts, the answers teacher-forced: per layer, the agreement of the "
                       "answer predictions with dense attention's and the KL per token. Layers below "
                       "--min-agreement are the ones dense_at=auto keeps dense. Cached like the budgets.")
    _add_model_args(p)
    _add_config_args(p)
    p.add_argument("--budgets", help="budget file from `tca calibrate` (default: the per-model cache, calibrating once)")
    p.add_argument("--calibration-length", type=int, help="calibration tokens when calibrating")
    p.add_argument("--options", default=DEFAULT_METHOD.partition(":")[2], metavar="K=V,...",
                   help="TCA selection options the probe runs with, as in a spec (default: the default "
                   "configuration's, %(default)s; '' for the paper's rule)")
    p.add_argument("--length", type=int, help="tokens per probe prompt (default: the budgets' calibration length; "
                   "the verdict depends on it: probe at the length you serve)")
    p.add_argument("--prompts", type=int, default=4, help="needle prompts, at evenly spread depths")
    p.add_argument("--min-agreement", type=float, default=0.9, help="the agreement floor (the spec's probe_min)")
    p.add_argument("--max-kl", type=float, default=0.05,
                   help="the KL ceiling in nats per answer token (the spec's probe_max_kl; inf: agreement only)")
    p.add_argument("--out", help="also write the probe's state file here")
    p.add_argument("--plot", metavar="PNG", help="also draw the agreement per layer (bars, the floor, dense layers in red)")
    p.set_defaults(func=cmd_probe_layers)

    p = sub.add_parser("methods", formatter_class=HelpFormatter, help="list the methods and their spec parameters",
                       description="Every method the library, `tca eval` and the API know, one line each. A spec is "
                       "NAME or NAME:key=value,key=value (e.g. tca:tau=0.7, streaming:window=1024). A method with a density "
                       "knob can be matched to another's kept KV in `tca eval` (NAME@match=SPEC) or set to keep a fraction "
                       "(NAME@kept=F; `tca leaderboard`).")
    p.set_defaults(func=cmd_methods)

    from .bench import add_bench_parser
    from .eval.cli import add_eval_parser
    from .eval.leaderboard.cli import add_leaderboard_parser

    add_eval_parser(sub)
    add_leaderboard_parser(sub)
    add_bench_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args._stdout = sys.stdout
    json_only = getattr(args, "json", False)
    try:
        # with --json, anything a library prints goes to stderr; the document goes to the real stdout
        with contextlib.redirect_stdout(sys.stderr) if json_only else contextlib.nullcontext():
            return args.func(args)
    except (ValueError, FileNotFoundError, IsADirectoryError, ModuleNotFoundError) as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
