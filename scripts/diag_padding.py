"""Does left-padded batching change a model's answers? Full attention, one task, one length.

Runs the suite's first samples of TASK once per sample (no padding) and as one left-padded
batch under each SDPA kernel, and prints the score and the answers' agreement with the
unbatched run. Written for Gemma3 on an H100, whose batched needle answers went wrong.
  python scripts/diag_padding.py MODEL [--task niah_single] [--length 4096] [--samples 20] [--device cuda]
"""
from __future__ import annotations

import argparse
import json

import torch

from tca_attention.eval.methods import ModelBackend, expand_method
from tca_attention.eval.prompt import PromptFormat
from tca_attention.eval.scorers import score
from tca_attention.eval.tasks import TASKS, TaskContext, generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--task", default="niah_single")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--single", type=int, default=6, help="samples also run one by one")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--kernels", default="auto,math,efficient_attention")
    args = ap.parse_args()
    [full] = expand_method("full")
    backend = ModelBackend(args.model, device=args.device, dtype=args.dtype)
    fmt = PromptFormat(backend.load())
    ctx = TaskContext(fmt)
    samples = [generate(ctx, args.task, args.length, i) for i in range(args.samples)]
    ids = [fmt.encode(s) for s in samples]
    scorer = TASKS.get(args.task).scorer
    out: dict = {"model": args.model, "task": args.task, "length": args.length, "lengths": [len(i) for i in ids]}
    single = [backend.run(full, s, i, None).prediction for s, i in zip(samples[: args.single], ids)]
    out["single"] = {"score": sum(score(scorer, p, s.answers) for p, s in zip(single, samples)) / len(single),
                     "first": [p[:30] for p in single[:3]]}
    for kernel in args.kernels.split(","):
        backend.sdpa_backend = kernel
        try:
            preds = [o.prediction for o in backend.run_batch(full, samples, ids, None)]
        except RuntimeError as e:  # a kernel that cannot run these inputs
            out[kernel] = {"error": str(e)[:200]}
            continue
        if args.device == "cuda":
            torch.cuda.empty_cache()
        out[kernel] = {
            "score": sum(score(scorer, p, s.answers) for p, s in zip(preds, samples)) / len(preds),
            "same_as_single": sum(a == b for a, b in zip(preds, single)) / len(single),
            "first": [p[:30] for p in preds[:3]],
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
