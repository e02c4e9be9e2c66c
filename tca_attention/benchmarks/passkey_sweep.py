"""Passkey retrieval on a real model: full attention vs TCA variants (score, alpha, mass_norm).

Calibrates once per (alpha, mass_norm) (both scores are stored), then answers passkey prompts
from real essays at several lengths, depths and seeds. Used to choose the library's defaults.
With --method SPEC (repeatable) it runs those registry methods instead of the TCA variants.
Usage: tca bench passkey --model PATH --device cuda --out sweep.json [--method streaming:window=1024 ...]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from .. import registry
from ..integration.probe import calibrate
from ..clihelp import HelpFormatter
from ..methods.tca.config import TCAConfig
from ..data.passkey import passkey_prompt
from ..generation import run_prompt
from ..models import load_model
from . import parse_method, require_cuda


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    ap.add_argument("--model", default="smollm2", help="packaged model key, .gguf file or HF directory")
    ap.add_argument("--device", default="cuda", help="cuda or cpu (cpu works, slowly)")
    ap.add_argument("--window", type=int, default=512, help="TCA local window w in tokens")
    ap.add_argument("--lengths", default="4096,8000", help="comma list of passkey prompt lengths in tokens")
    ap.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9", help="comma list of passkey depths in [0, 1]")
    ap.add_argument("--seeds", default="0,1", help="comma list of prompt seeds")
    ap.add_argument("--taus", default="0.9", help="comma list of TCA tau values")
    ap.add_argument("--calib-length", type=int, default=None,
                    help="calibration tokens (default: min(8192, the model's trained length))")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model dtype")
    ap.add_argument("--method", action="append", default=None, metavar="SPEC",
                    help="a registry method to run instead of the TCA variants (repeatable; `tca methods`); "
                    "each is built with the model, tca calibrating through the per-model cache")
    ap.add_argument("--out", required=True, help="result JSON path; required")
    return ap


def tca_variants(model, tok, args) -> list[tuple[str, object, float | None]]:
    """TCA calibrated once per (alpha, mass_norm), re-selected at each score and tau."""
    variants = [(0.5, "sum"), (0.5, "max"), (0.0, "sum")]
    methods = []
    for alpha, norm in variants:
        cfg = TCAConfig(window=args.window, alpha=alpha, mass_norm=norm)
        b = calibrate(model, tok, cfg, length=args.calib_length, progress=False)
        for score in ("observation", "column_mean"):
            for tau in map(float, args.taus.split(",")):
                bb = b.at(score=score, tau=tau)
                methods.append((f"tca/{score}/a{alpha}/{norm}@{tau}", registry.create("tca", budgets=bb),
                                bb.mean_kept_fraction))
    return methods


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = build_parser(prog)
    args = ap.parse_args(argv)
    for spec in args.method or ():
        parse_method(ap, spec)
    if args.device.startswith("cuda") and (rc := require_cuda("tca bench passkey --device cuda")) is not None:
        return rc
    model, tok = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    prompts = [passkey_prompt(tok, int(L), depth=float(d), seed=int(s))
               for L in args.lengths.split(",") for d in args.depths.split(",") for s in args.seeds.split(",")]
    methods = [("full", None, None)]
    if args.method:
        methods += [(registry.normalize(spec), registry.create(spec, model=model, tokenizer=tok), None)
                    for spec in args.method]
    else:
        methods += tca_variants(model, tok, args)
    rows = []
    t0 = time.time()
    for name, method, budget_kept in methods:
        hits, kept = 0, []
        for p in prompts:
            r = run_prompt(model, tok, p.text, method, max_new_tokens=8)
            ok = p.answer in r.answer
            hits += ok
            kept.append(r.kept_fraction)
            rows.append({"method": name, "tokens": p.n_tokens, "depth": p.depth, "ok": ok, "answer": r.answer,
                         "kept_fraction": r.kept_fraction, "retained": r.retained_last_query})
        print(f"{name:<40} {hits}/{len(prompts)} kept {sum(kept) / len(kept):.3f} "
              f"(budget global-region kept {budget_kept})", flush=True)
    meta = {"model": args.model, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "window": args.window, "lengths": args.lengths, "depths": args.depths, "seeds": args.seeds,
            "seconds": time.time() - t0, "command": "tca bench passkey " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out")}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
