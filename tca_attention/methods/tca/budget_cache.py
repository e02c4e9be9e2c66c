"""Budgets cached per model and calibration config: calibrate once, reuse afterwards.

What happens is said on stderr (one line each): which budget file is used, or, before a
calibration, that it runs once, roughly how long it takes and where its result is cached.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

from ..base import Probe
from ..state import announce as state_announce
from .config import TCAConfig

log = logging.getLogger(__name__)

# SmolLM2-135M (30 layers x 9 query heads) at 8192 tokens calibrates in about 1.5 min on 2 CPU
# cores, up to about 4 min when the cores are shared; other models scale with layers x heads x L^2.
_REF_WORK = 30 * 9 * 8192**2
_REF_CPU_S = (90.0, 250.0)


def budgets_path_for(model_key: str, config: TCAConfig, length: int | None, plan=None) -> Path:
    from ...paths import cache_root

    calib = {k: v for k, v in asdict(config).items() if k not in ("tau", "score")}  # re-selectable
    key = [model_key, calib, length] + ([] if plan is None or plan.is_default else [asdict(plan)])
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(model_key).name)
    return cache_root() / "budgets" / f"{safe}-{digest}.json"


def _minutes(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.0f} min" if s >= 600 else f"{s / 60:.1f} min"


def calibration_notice(model, config: TCAConfig, length: int | None, path: Path | None, plan=None) -> str:
    """The line said before calibrating: once, for what, roughly how long, cached where."""
    from .calibration import DEFAULT_LENGTH
    from ...introspect import layer_kinds, text_config

    cfg = text_config(model)
    trained = getattr(cfg, "max_position_embeddings", None) or DEFAULT_LENGTH
    tokens = min(DEFAULT_LENGTH, trained) if length is None else length
    lengths = plan.lengths if plan is not None and plan.lengths else (tokens,)
    samples = plan.samples if plan is not None else 1
    layers = sum(k == "full" for k in layer_kinds(model))
    device = next(model.parameters()).device
    if device.type == "cpu":
        work = samples * sum(n**2 for n in lengths)
        scale = layers * cfg.num_attention_heads * work / _REF_WORK * 2 / max(1, min(os.cpu_count() or 2, 16))
        lo, hi = (t * scale for t in _REF_CPU_S)
        how_long = ("under a minute on this CPU" if hi < 60
                    else f"roughly {_minutes(lo)} to {_minutes(hi)} on this CPU")
    else:
        how_long = "well under a minute on a GPU for small models"
    where = (f"the budgets will be cached in {path} and reused by later runs with this model and config"
             if path is not None else "the budgets are not cached")
    what = (f"a dense forward over {tokens} tokens" if samples * len(lengths) == 1 else
            f"{samples * len(lengths)} dense forwards ({samples} x {'/'.join(map(str, lengths))} tokens)")
    return (f"Calibrating ONCE for this model and config (w={config.window}, b={config.block_size}): "
            f"{what} and scoring of {layers} layers, {how_long}; {where}.")


def _say(show: bool, line: str, once: Path | None = None) -> None:
    state_announce(show, line, log, once)


def load_or_calibrate(probe: Probe, tok, model_key: str, config: TCAConfig, budgets: str | None = None,
                      length: int | None = None, announce: bool = True, plan=None):
    """Budgets from a file, or from the per-model cache, calibrating once if needed.
    plan: a calibration.CalibrationSet (None: one sample at one length, the paper's pass).

    announce: say on stderr which file is used, or before calibrating, that it runs once, how
    long it roughly takes and where the result is cached.
    """
    from .budgets import Budgets
    from .calibration import CalibrationSet, calibrate

    model = probe.model
    if budgets:
        b = Budgets.load(budgets, model=model)
        _say(announce, f"Using budgets {budgets} (calibrated with w={b.config.window}, b={b.config.block_size}).")
        return b.at(tau=config.tau, score=config.score)
    path = budgets_path_for(model_key, config, length, plan)
    if path.exists():
        _say(announce, f"Using cached budgets {path} (calibrated once for this model and config; "
                       "delete the file to calibrate again).", path)
        return Budgets.load(path, model=model).at(tau=config.tau, score=config.score)
    _say(announce, calibration_notice(model, config, length, path, plan))
    b = calibrate(probe, tok, config, length=length, plan=plan or CalibrationSet())
    b.save(path)
    _say(announce, f"Budgets saved to {path}.")
    return b
