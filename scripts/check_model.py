"""Is a loaded model sane? Full attention on the eval suite's own first samples.

Prints the transformers version, the perplexity of the first perplexity samples and the
greedy answers to the first single-needle samples. Run it before trusting an accuracy run
on a new machine: a loader that mis-converts a GGUF still produces numbers, just wrong ones
(a healthy model's perplexity on these essays is tens, not thousands).
  python scripts/check_model.py MODEL [--device cuda] [--dtype float32] [--length 4096] [--samples 2]
"""
from __future__ import annotations

import argparse
import json
import math

import transformers

from tca_attention.eval.methods import ModelBackend, expand_method
from tca_attention.eval.prompt import PromptFormat
from tca_attention.eval.scorers import score
from tca_attention.eval.tasks import TASKS, TaskContext, generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=2)
    args = ap.parse_args()
    backend = ModelBackend(args.model, device=args.device, dtype=args.dtype)
    fmt = PromptFormat(backend.load())
    ctx = TaskContext(fmt)
    [full] = expand_method("full")
    out: dict = {"transformers": transformers.__version__, "model": args.model, "device": args.device,
                 "length": args.length, "ppl": [], "needle": []}
    for i in range(args.samples):
        s = generate(ctx, "perplexity", args.length, i)
        r = backend.run(full, s, fmt.encode(s), None)
        out["ppl"].append(round(math.exp(r.nll), 2))
        s = generate(ctx, "niah_single", args.length, i)
        r = backend.run(full, s, fmt.encode(s), None)
        out["needle"].append({"answer": s.answers[0], "prediction": r.prediction[:60],
                              "score": score(TASKS.get("niah_single").scorer, r.prediction, s.answers)})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
