"""Budgets cached per model and calibration config: calibrate once, reuse afterwards."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path

from .budgets import Budgets
from .calibration import calibrate
from .config import TCAConfig
from .models import cache_root

log = logging.getLogger(__name__)


def budgets_path_for(model_key: str, config: TCAConfig, length: int | None) -> Path:
    calib = {k: v for k, v in asdict(config).items() if k not in ("tau", "score")}  # re-selectable
    digest = hashlib.sha256(json.dumps([model_key, calib, length], sort_keys=True).encode()).hexdigest()[:12]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(model_key).name)
    return cache_root() / "budgets" / f"{safe}-{digest}.json"


def load_or_calibrate(model, tok, model_key: str, config: TCAConfig, budgets: str | None = None,
                      length: int | None = None):
    """Budgets from a file, or from the per-model cache, calibrating once if needed."""
    if budgets:
        b = Budgets.load(budgets, model=model)
        return b.at(tau=config.tau, score=config.score)
    path = budgets_path_for(model_key, config, length)
    if path.exists():
        log.info("using cached budgets %s", path)
        return Budgets.load(path, model=model).at(tau=config.tau, score=config.score)
    b = calibrate(model, tok, config, length=length)
    b.save(path)
    log.info("budgets saved to %s", path)
    return b
