"""Does a model's sensitivity to TCA's tau show on a few needle prompts? (issue 13, an experiment)

Retained attention mass and the paper's error bound do not predict accuracy across models (SmolLM2
collapses at a retained mass Qwen2.5-Coder holds full accuracy at: docs/results/leaderboard_*).
This probe asks the model itself: on needle prompts (real essays, a sentence with three secret words
and a number, a question; the needle again as the answer, data/needle.py), the prompt is prefilled
with TCA at each tau, the answer is teacher-forced token by token through TCA's cache, and each
answer position's prediction is compared with dense attention's: argmax agreement and KL(dense||TCA).

  python scripts/probe_tau.py --model smollm2 --length 4096 --prompts 4 --out probe.json

--per-layer TAU: instead of sweeping tau, TCA at TAU in one layer at a time (every other layer
dense): which layers carry the loss. This is the library's layer probe (methods/tca/layer_probe.py,
what `tca:dense_at=auto` and `tca probe-layers` run); --out then gets its state file.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--taus", default="0.6,0.7,0.75,0.8,0.85,0.9,0.95")
    ap.add_argument("--options", default="last_q=16,span=7",
                    help="TCA options (comma list of k=v), '' for the paper's rule")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--per-layer", type=float, default=None, metavar="TAU",
                    help="TCA at TAU in one layer at a time, the others dense (the library's layer probe)")
    ap.add_argument("--budgets", default=None, metavar="JSON",
                    help="stored budgets (tca calibrate) instead of calibrating at 2048 with the small-context preset")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    from tca_attention import calibrate
    from tca_attention.integration import enable
    from tca_attention.integration.probe import ModelProbe
    from tca_attention.methods.tca.layer_probe import ProbeSettings, needle_prompts, probe_layers
    from tca_attention.methods.tca.config import SMALL_CONTEXT
    from tca_attention.methods.tca.method import TCA
    from tca_attention.models import load_model

    model, tok = load_model(args.model, device=args.device)
    model.eval()
    if args.budgets:
        from tca_attention.methods.tca.budgets import Budgets
        budgets = Budgets.load(args.budgets, model)
    else:
        budgets = calibrate(model, tok, SMALL_CONTEXT, length=2048, progress=False)
    opts = {}
    for kv in filter(None, args.options.split(",")):
        k, v = kv.split("=")
        opts[k] = int(v)
    t0 = time.perf_counter()
    if args.per_layer is not None:  # the library's layer probe (what dense_at=auto runs)
        result = probe_layers(ModelProbe(model), tok, budgets.at_tau(args.per_layer), opts,
                              ProbeSettings(args.length, args.prompts, args.seed))
        result.save(args.out)
        for i, (a, k) in enumerate(zip(result.agreement, result.kl)):
            if a is not None:
                print(json.dumps({"tau": args.per_layer, "layer": i, "agreement": a, "kl_per_token": k}))
        print(f"{args.out}: dense_at=auto (floor 0.9) keeps {result.dense_layers() or 'none'} dense; "
              f"{time.perf_counter() - t0:.0f} s")
        return 0
    prompts = needle_prompts(tok, ProbeSettings(args.length, args.prompts, args.seed), args.length)

    def answer_logits(method) -> list[torch.Tensor]:
        """Per prompt: logits (n_answer, V) predicting each answer token, prefill then one token at a time."""
        out = []
        for p in prompts:
            a0, a1 = p.answer
            ids = torch.tensor([p.ids], device=args.device)
            with torch.no_grad(), enable(model, method) as session:
                cache = session.new_cache()
                o = model(ids[:, :a0], use_cache=True, logits_to_keep=1, **session.cache_kwargs(cache))
                rows = [o.logits[0, -1].float()]
                for t in range(a0, a1 - 1):
                    o = model(ids[:, t:t + 1], use_cache=True, **session.cache_kwargs(cache))
                    rows.append(o.logits[0, -1].float())
                kept = cache.per_row()[0]["kept_fraction"] if method is not None else 1.0
            out.append((torch.stack(rows), kept))
        return out

    dense = answer_logits(None)
    truth = [torch.tensor(p.ids[p.answer[0]:p.answer[1]]) for p in prompts]
    dense_acc = sum(int((d.argmax(-1).cpu() == t).sum()) for (d, _), t in zip(dense, truth)) / sum(len(t) for t in truth)
    rows = []
    runs = [({"tau": float(x)}, TCA(budgets.at_tau(float(x)), dense_below=0, **opts)) for x in args.taus.split(",")]
    for label, method in runs:
        res = answer_logits(method)
        agree = n = correct = 0
        kl = 0.0
        for (d, _), (s, _), t in zip(dense, res, truth):
            agree += int((d.argmax(-1) == s.argmax(-1)).sum())
            correct += int((s.argmax(-1).cpu() == t).sum())
            kl += float(torch.nn.functional.kl_div(s.log_softmax(-1), d.log_softmax(-1), log_target=True,
                                                   reduction="sum"))
            n += len(t)
        row = {**label, "kept": sum(k for _, k in res) / len(res), "agreement": agree / n,
               "answer_accuracy": correct / n, "kl_per_token": kl / n}
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {"model": args.model, "length": args.length, "budgets": args.budgets or "calibrated at 2048, small-context", "prompts": args.prompts, "options": opts,
            "dense_answer_accuracy": dense_acc, "seconds": time.perf_counter() - t0,
            "torch": torch.__version__, "device": args.device}
    print(json.dumps(meta))
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
