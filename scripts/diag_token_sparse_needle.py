"""Where Token Sparse Attention loses the needle (docs/methods.md, token-sparse, "Needle accuracy").
CPU, SmolLM2, the suite's niah_single prompts (seed 0; 2K tokens unless --length), fp32, the PyTorch
reference executor.

  python scripts/diag_token_sparse_needle.py probe --samples 4 [--start 0] [--out FILE.jsonl]
      per sample: the answers of full attention, the default (coverage 0.005) and keep=0.4 (--keep), and for
      each sparse layer: the tokens each head keeps (mean, min), the fraction of (head, token) pairs
      of the needle's value / sentence that are kept, and the value tokens' best and median rank
      (over heads and tokens) in the per-head pooled scores
  python scripts/diag_token_sparse_needle.py control --samples 4 [--spec keep=0.4]
      controls on one configuration: (a) the needle's tokens forced into every head's subset;
      (b) tokens left out of a head's subset get that head's dense causal attention output instead
      of zeros (only the kept queries are restricted to the subset's keys); (c) both (a) and (b)
  python scripts/diag_token_sparse_needle.py official --samples 2 [--spec coverage=0.005]
      our selection vs a line-by-line port of the official get_index (sparse_cluster.py at 989c4b5,
      its Triton score kernel written in PyTorch) on the q/k of every sparse layer of a dense prefill
"""
from __future__ import annotations

import argparse
import functools
import json
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tca_attention.engine import dispatch
from tca_attention.eval.prompt import PromptFormat
from tca_attention.eval.tasks import TaskContext
from tca_attention.methods.token_sparse import TokenSparse
from tca_attention.models import load_model
from needle_diag import answer as _answer, needle_prompt, rotated_qk_hook  # scripts/needle_diag.py (run from scripts/ or the repo root)

answer = functools.partial(_answer, backend="reference")  # the PyTorch reference executor

LENGTH = 2048  # --length


def parse(spec: str) -> dict:
    out = {}
    for kv in filter(None, spec.split(",")):
        k, v = kv.split("=")
        out[k] = float(v)
    return out


@dataclass(frozen=True)
class Logged(TokenSparse):
    """Records, per sparse prefill layer, the selection, the per-head scores and the drop count; can
    force given positions into every head's subset."""
    log: list = field(default=None, compare=False)  # type: ignore[assignment]
    forced: list = field(default=None, compare=False)  # type: ignore[assignment]

    def select(self, q, k, ks, scaling, heads=None):
        sel = super().select(q, k, ks, scaling) if heads is None else super().select(q, k, ks, scaling, heads)
        if q.shape[2] == 1:
            return sel
        if self.forced:
            sel[:, :, self.forced] = True
        if self.log is not None:
            B, H, L, _ = q.shape
            sc = self.scores(q, k, ks, scaling)
            prefix = torch.arange(L) < L - self.recent
            sc = sc * prefix
            if self.kernel > 1:
                sc = F.avg_pool1d(sc.view(B * H, 1, L), self.kernel, stride=1, padding=self.kernel // 2).view(B, H, L)
                sc = sc * prefix
            self.log.append(dict(sel=sel[0].clone(), score=sc[0].clone()))
        return sel


def layer_rows(log: list, model_layers: int, start: float, value: list[int], needle: list[int]) -> list[dict]:
    first = int(start * model_layers)
    rows = []
    for j, e in enumerate(log):
        sel, sc = e["sel"], e["score"]  # (H, L)
        H, L = sel.shape
        # rank of each value token per head among the prefix tokens by the head's score
        order = torch.argsort(sc, dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(L).expand(H, L))
        rows.append(dict(layer=first + j, kept_mean=float(sel.sum(-1).float().mean()), kept_min=int(sel.sum(-1).min()),
                         value_kept=float(sel[:, value].float().mean()), needle_kept=float(sel[:, needle].float().mean()),
                         value_best_rank=int(rank[:, value].min()), value_median_rank=int(rank[:, value].float().median())))
    return rows


def probe(model, tok, fmt, ctx, args) -> None:
    n_layers = model.config.num_hidden_layers
    for i in range(args.start, args.start + args.samples):
        ids, needle, value, s = needle_prompt(tok, fmt, ctx, i, LENGTH)
        res = dict(i=i, L=len(ids), depth=s.metadata["depths"][0], value_toks=value, want=s.answers[0],
                   full=answer(model, tok, ids, s))
        forced = f"keep={args.keep:g}"
        for name, kw in (("default", {}), (forced, {"keep": args.keep})):
            log: list = []
            m = Logged(log=log, **kw)
            res[name] = answer(model, tok, ids, s, m)
            prefill = [e for e in log]  # only prefill selections are logged (decode is dense: no plan)
            res[name + "_layers"] = layer_rows(prefill, n_layers, m.start, value, needle)
        short = {k: v for k, v in res.items() if not k.endswith("_layers")}
        short["kept"] = {n: [round(r["kept_mean"]) for r in res[n + "_layers"]] for n in ("default", forced)}
        short["value_kept"] = {n: [round(r["value_kept"], 2) for r in res[n + "_layers"]] for n in ("default", forced)}
        print(json.dumps(short), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(res) + "\n")


def dense_for_dropped(orig):
    """subset_prefill whose left-out (query, head) pairs get the dense causal output instead of 0."""
    def patched(q, k, v, plan, scaling, backend="auto", key_bias=None):
        out = orig(q, k, v, plan, scaling, backend, key_bias)  # (B, L, H, D)
        B, H, L, D = q.shape
        dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True).transpose(1, 2)
        sel = torch.zeros(B, H, L + 1, dtype=torch.bool)
        used = torch.arange(plan.idx.shape[-1]) < plan.length[..., None]
        sel.scatter_(2, torch.where(used, plan.idx, L), True)
        return torch.where(sel[:, :, :L].transpose(1, 2)[..., None], out, dense)
    return patched


def control(model, tok, fmt, ctx, args) -> None:
    kw = parse(args.spec)
    orig = dispatch.subset_prefill
    for i in range(args.start, args.start + args.samples):
        ids, needle, value, s = needle_prompt(tok, fmt, ctx, i, LENGTH)
        res = dict(i=i, spec=args.spec or "default", want=s.answers[0])
        res["plain"] = answer(model, tok, ids, s, TokenSparse(**kw))
        res["forced_needle"] = answer(model, tok, ids, s, Logged(forced=needle, **kw))
        try:
            dispatch.subset_prefill = dense_for_dropped(orig)
            res["dropped_dense"] = answer(model, tok, ids, s, TokenSparse(**kw))
            res["dropped_dense_forced_needle"] = answer(model, tok, ids, s, Logged(forced=needle, **kw))
        finally:
            dispatch.subset_prefill = orig
        print(json.dumps(res), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(res) + "\n")


def official_index(q, k, coverage, min_tokens, window, kernel):
    """The official SparseCluster.get_index (batch 1, k already repeated to the query heads), with
    triton_get_attn_cache in PyTorch: the mean over the last `window` queries of the softmax
    probability (1/sqrt(d) scaling, causal inside the window) of each prefix key."""
    bsz, H, L, D = q.shape
    if L <= min_tokens + window or coverage == 0.0:
        return None
    s = (q[:, :, L - window:].double() @ k.double().transpose(-1, -2)) / D ** 0.5  # (1, H, W, L)
    qpos = torch.arange(L - window, L)[:, None]
    s = s.masked_fill(torch.arange(L)[None, :] > qpos, float("-inf"))
    attn_cache = torch.softmax(s, -1)[..., : L - window].mean(2).float()  # (1, H, L - W)
    attn_cache = F.avg_pool1d(attn_cache, kernel_size=kernel, padding=kernel // 2, stride=1)
    attn_cache_global = attn_cache.mean(dim=1)
    attn_cache_normalized = attn_cache / (attn_cache.sum(dim=-1, keepdim=True) + 1e-8)
    glob = attn_cache_global / (attn_cache_global.sum(dim=-1, keepdim=True) + 1e-8)
    cumulative = torch.cumsum(torch.sort(glob, dim=-1).values.float(), dim=-1)
    n_sparse = (cumulative < coverage).sum(dim=-1).item()
    if n_sparse == 0:
        return None
    cap = max(min_tokens, (L - window) - (n_sparse + 1))
    idx = attn_cache_normalized.topk(cap, dim=-1).indices
    win = torch.arange(L - window, L).expand(bsz, H, -1)
    return torch.cat([idx, win], -1).sort(-1).values


def official(model, tok, fmt, ctx, args) -> None:
    m = TokenSparse(**parse(args.spec))
    if m.keep:
        raise SystemExit("official: the official code has the coverage rule only (keep=0)")
    m.check_model(model)
    caps: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    hooks = [layer.self_attn.register_forward_hook(rotated_qk_hook(caps, i), with_kwargs=True)
             for i, layer in enumerate(model.model.layers) if m.sparse_layer(i)]
    for i in range(args.start, args.start + args.samples):
        ids, _, _, s = needle_prompt(tok, fmt, ctx, i, LENGTH)
        with torch.no_grad():
            model(torch.tensor([ids]))
        for layer, (q, k) in sorted(caps.items()):
            g = q.shape[1] // k.shape[1]
            ours = m.select(q, k, torch.zeros(1, dtype=torch.long), q.shape[-1] ** -0.5)[0]  # (H, L)
            ref = official_index(q, k.repeat_interleave(g, 1), m.coverage, m.min_tokens,
                                 m.recent, m.kernel)
            ref_mask = torch.ones_like(ours) if ref is None else torch.zeros_like(ours).scatter_(1, ref[0], True)
            diff = (ours != ref_mask).sum(-1)
            print(f"sample {i} layer {layer}: kept per head ours {ours.sum(-1).tolist()} official "
                  f"{ref_mask.sum(-1).tolist()}, tokens differing per head {diff.tolist()}", flush=True)
    for h in hooks:
        h.remove()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["probe", "control", "official"])
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--spec", default="", help="control: TokenSparse knobs, e.g. keep=0.4")
    ap.add_argument("--out", default=None, help="append one JSON line per sample")
    ap.add_argument("--length", type=int, default=LENGTH, help="prompt tokens")
    ap.add_argument("--keep", type=float, default=0.4, help="probe: the forced keep fraction beside the default")
    args = ap.parse_args()
    globals()["LENGTH"] = args.length
    torch.set_num_threads(1)
    model, tok = load_model("smollm2")
    fmt = PromptFormat(tok)
    ctx = TaskContext(fmt, seed=0)
    {"probe": probe, "control": control, "official": official}[args.mode](model, tok, fmt, ctx, args)


if __name__ == "__main__":
    main()
