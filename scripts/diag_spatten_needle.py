"""Where SpAtten prunes the needle (docs/methods.md, SpAtten, "Needle accuracy"). CPU, SmolLM2, the
suite's niah_single prompts, the PyTorch reference.

  python scripts/diag_spatten_needle.py probe --kept 0.41 --samples 5 [--start 0] [--out FILE.jsonl]
      full attention and SpAtten (keep solved for the mean kept fraction) answers; per planned layer
      the needle value tokens' kept status and rank among the candidates; the score by position decile
  python scripts/diag_spatten_needle.py force --kept 0.41 --samples 3
      control: SpAtten with the needle's tokens forced into every kept set
  python scripts/diag_spatten_needle.py ranks --samples 5
      value-token ranks in the global region at layers 0-5 of a dense prefill by the cumulative mass
      (SpAtten's), the mass per seeing query (normalised) and the mass from the last 64 queries
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import torch

from tca_attention.engine.column_mass import column_mass_ref
from tca_attention.eval.prompt import PromptFormat
from tca_attention.eval.tasks import TaskContext
from tca_attention.methods.spatten import SpAtten, keep_for
from tca_attention.models import load_model
from needle_diag import answer, needle_prompt, rotated_qk_hook  # scripts/needle_diag.py (run from scripts/ or the repo root)

LENGTH = 2048


def logged_spatten(log: list, **params) -> SpAtten:
    @dataclass(frozen=True)
    class Logged(SpAtten):
        def plan(self, layer_idx, *args, **kw):
            st = self._state
            before = (st["kept"].clone(), st["score"].clone()) if "kept" in st else (None, None)
            out = super().plan(layer_idx, *args, **kw)
            log.append(dict(layer=layer_idx, planned=out is not None, kept_before=before[0], score_before=before[1],
                            kept_after=st["kept"].clone(), score_after=st["score"].clone()))
            return out

    return Logged(**params)


def layer_rows(log: list, value: list[int], needle: list[int]) -> list[dict]:
    rows = []
    for e in log:
        if not e["planned"] or e["score_before"] is None:
            continue
        sc, kb, ka = e["score_before"][0], e["kept_before"][0], e["kept_after"][0]
        order = sorted(kb.nonzero().flatten().tolist(), key=lambda t: (-float(sc[t]), t))
        rank = {t: r for r, t in enumerate(order)}
        rows.append(dict(layer=e["layer"], candidates=len(order), kept=int(ka.sum()),
                         value_rank=[rank.get(t) for t in value], value_kept=[bool(ka[t]) for t in value],
                         needle_kept=int(ka[needle].sum()), needle_n=len(needle)))
    return rows


def probe(model, tok, fmt, ctx, args) -> None:
    keep = keep_for(args.kept, LENGTH, {})
    for i in range(args.start, args.start + args.samples):
        ids, needle, value, s = needle_prompt(tok, fmt, ctx, i, LENGTH)
        log: list = []
        res = dict(i=i, kept_target=args.kept, keep=keep, L=len(ids), depth=s.metadata["depths"][0],
                   value_toks=value, want=s.answers[0], full=answer(model, tok, ids, s),
                   spatten=answer(model, tok, ids, s, logged_spatten(log, keep=keep)))
        res["layers"] = layer_rows(log, value, needle)
        sc = log[-1]["score_after"][0]
        L = len(ids)
        res["score_by_decile"] = [float(sc[a * L // 10:(a + 1) * L // 10].mean()) for a in range(10)]
        print(json.dumps({k: v for k, v in res.items() if k != "layers"}), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(res) + "\n")


def force(model, tok, fmt, ctx, args) -> None:
    forced: list[int] = []

    @dataclass(frozen=True)
    class Forced(SpAtten):
        @staticmethod
        def prune(score, kept, ks, ls, L, f):
            out = SpAtten.prune(score, kept, ks, ls, L, f)
            out[:, forced] = True  # global-region tokens, kept from the start
            return out

    keep = keep_for(args.kept, LENGTH, {})
    for i in range(args.start, args.start + args.samples):
        ids, needle, _, s = needle_prompt(tok, fmt, ctx, i, LENGTH)
        forced[:] = needle
        print(i, "forced-needle spatten", repr(answer(model, tok, ids, s, Forced(keep=keep))), "want", s.answers[0],
              flush=True)


def ranks(model, tok, fmt, ctx, args, layers: int = 6, last: int = 64, local: int = 192) -> None:
    caps: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    hooks = [layer.self_attn.register_forward_hook(rotated_qk_hook(caps, i), with_kwargs=True)
             for i, layer in enumerate(model.model.layers[:layers])]
    for i in range(args.start, args.start + args.samples):
        ids, _, value, s = needle_prompt(tok, fmt, ctx, i, LENGTH)
        L, glob = len(ids), len(ids) - local
        with torch.no_grad():
            model(torch.tensor([ids]))
        ks, cum = torch.zeros(1, dtype=torch.long), torch.zeros(L)
        tail = torch.zeros(1, L)
        tail[0, -last:] = 1

        def rank(sc: torch.Tensor) -> list[int]:
            r = torch.empty(glob, dtype=torch.long)
            r[torch.argsort(sc[:glob], descending=True, stable=True)] = torch.arange(glob)
            return [int(r[t]) for t in value]

        for layer in range(layers):
            q, k = caps[layer]
            scale = q.shape[-1] ** -0.5
            cum += column_mass_ref(q, k, scale, ks, torch.ones(1, L))[0].sum(0)
            win = column_mass_ref(q, k, scale, ks, tail)[0].sum(0)
            seen = (L - torch.arange(L)).float() * q.shape[1]  # (query, head) pairs that see each key
            print(f"sample {i} depth {s.metadata['depths'][0]} pos {value[0]} layer {layer}: value-token ranks of "
                  f"{glob}: cumulative {rank(cum)} normalised {rank(cum / seen)} last-{last}-queries {rank(win)}",
                  flush=True)
    for h in hooks:
        h.remove()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["probe", "force", "ranks"])
    ap.add_argument("--kept", type=float, default=0.41, help="mean kept KV fraction (solves keep)")
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--out", default=None, help="probe: append one JSON line per sample")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model("smollm2")
    fmt = PromptFormat(tok)
    ctx = TaskContext(fmt, seed=0)
    {"probe": probe, "force": force, "ranks": ranks}[args.mode](model, tok, fmt, ctx, args)


if __name__ == "__main__":
    main()
