"""How much of each answer value TCA's prefill keeps, per layer and KV head (docs/method.md, `span`).

A multi-token value (Qwen2.5 tokenizes digits one by one) can only be copied whole if every one
of its tokens survives the selection. For the suite's prompts of a task (seed 0), this prefills
each TCA spec through a session (the PyTorch reference executor), reads the positions each KV
head of each TCA layer keeps (its global kept set and its local region), and reports, over
(layer, KV head, value): the mean share of the value's tokens kept, and how often a value is kept
whole, split (some tokens kept, some dropped) or dropped; then the greedy answer and its score.

  python scripts/diag_tca_value_coverage.py --model PATH_OR_KEY --task niah_multivalue --length 2048 \\
      --samples 4 --specs "tca:tau=0.7,last_q=16; tca:tau=0.7,last_q=16,span=7" --out FILE.json
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch

from tca_attention import registry
from tca_attention.eval.methods import split_methods
from tca_attention.eval.prompt import PromptFormat
from tca_attention.eval.scorers import score
from tca_attention.eval.tasks import TASKS, TaskContext, generate
from tca_attention.integration import enable
from tca_attention.integration.adapter import cache_kwargs
from tca_attention.models import load_model


def value_tokens(tok, fmt, s) -> tuple[list[int], list[list[int]]]:
    """The prompt's ids and, per answer value, the token positions that cover its first mention
    after its needle sentence (the sentence that states it)."""
    text = fmt.render(s)
    enc = tok(text, add_special_tokens=fmt._special(s.use_template), return_offsets_mapping=True)
    ids, offs = enc["input_ids"], enc["offset_mapping"]
    spans = []
    for needle in s.metadata["needles"]:
        c0 = text.index(needle)
        for v in s.answers:
            if v in needle:
                v0 = text.index(v, c0)
                spans.append([t for t, (x, y) in enumerate(offs) if x < v0 + len(v) and y > v0])
    return ids, spans


def kept_positions(cache) -> list[list[set[int]]]:
    """Per TCA layer, per KV head of row 0: the prompt positions its attention reads after prefill."""
    out = []
    for layer in cache.tca_layers():
        KV = layer.t_keys.shape[1]
        tail = layer.tail_positions()[0]
        local = {int(p) for p in tail[tail >= 0]}
        heads = []
        for h in range(KV):
            seg = layer.g_pos[layer.g_offsets[h]: layer.g_offsets[h + 1]]
            heads.append({int(p) for p in seg[seg >= 0]} | local)
        out.append(heads)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--task", default="niah_multivalue")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--specs", default="tca:tau=0.7,last_q=16; tca:tau=0.7,last_q=16,span=7")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model, tok = load_model(args.model, device="cpu")
    fmt = PromptFormat(tok, use_chat_template=True)
    ctx = TaskContext(fmt, seed=0)
    specs = split_methods(args.specs)
    methods = {spec: registry.create(spec, model=model, tokenizer=tok, dense_below=0) for spec in specs}
    rows = []
    for i in range(args.samples):
        s = generate(ctx, args.task, args.length, i)
        ids, spans = value_tokens(tok, fmt, s)
        x = torch.tensor([ids])
        for spec, method in methods.items():
            with torch.no_grad(), enable(model, method, backend="reference") as session:
                cache = session.new_cache()
                model(input_ids=x, use_cache=True, logits_to_keep=1, **cache_kwargs(cache))
                kept = kept_positions(cache)
                g = session.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=s.max_new_tokens,
                                     do_sample=False, pad_token_id=0)
            pred = tok.decode(g[0, len(ids):], skip_special_tokens=True)
            counts = defaultdict(int)
            shares = []
            for heads in kept:
                for have in heads:
                    for span in spans:
                        n = sum(t in have for t in span)
                        shares.append(n / len(span))
                        counts["whole" if n == len(span) else "dropped" if n == 0 else "split"] += 1
            total = sum(counts.values())
            row = {"sample": i, "spec": spec, "score": score(TASKS.get(args.task).scorer, pred, s.answers),
                   "prediction": pred.strip()[:120], "answers": list(s.answers),
                   "value_tokens": [len(sp) for sp in spans], "mean_share_kept": sum(shares) / len(shares),
                   **{k: counts[k] / total for k in ("whole", "split", "dropped")}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for spec in specs:
        mine = [r for r in rows if r["spec"] == spec]
        summary[spec] = {k: sum(r[k] for r in mine) / len(mine)
                         for k in ("score", "mean_share_kept", "whole", "split", "dropped")}
    print(json.dumps(summary, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": "python scripts/diag_tca_value_coverage.py " + " ".join(
                f"--{k.replace('_', '-')} {v!r}" if k == "specs" else f"--{k.replace('_', '-')} {v}"
                for k, v in vars(args).items() if k != "out"),
                "model": args.model, "task": args.task, "length": args.length, "device": "cpu", "dtype": "float32",
                "torch": torch.__version__, "summary": summary, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
