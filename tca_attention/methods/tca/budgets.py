"""Per-head sparsity budgets: the output of calibration, plain versioned JSON data."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..state import ModelIdentity, StateError, json_type, per_head, save_json
from .candidates import decode_keep, expected_keep, keep_counts
from .config import TCAConfig

FORMAT_VERSION = 1


class BudgetError(StateError):
    """A budget file that is corrupt, of another version, or for another model."""


@dataclass(frozen=True)
class HeadBudget:
    """Calibration outcome of one KV head: retained score of every candidate, and the choice."""

    column_mean: tuple[float, ...]
    observation: tuple[float, ...]

    def scores(self, score: str) -> tuple[float, ...]:
        return self.column_mean if score == "column_mean" else self.observation

    def choose(self, tau: float, score: str) -> int | None:
        """Index of the cheapest candidate whose retained score reaches tau; None = dense."""
        for i, a in enumerate(self.scores(score)):
            if a >= tau:
                return i
        return None


@dataclass(frozen=True)
class Budgets:
    """Head-specific budgets of a model. layers[i] is None for layers TCA leaves alone
    (sliding-window layers); otherwise one HeadBudget per KV head."""

    model: ModelIdentity
    config: TCAConfig
    candidates: tuple[tuple[float, ...], ...]  # ladder rows p over keep_counts(b), cheapest first
    layers: tuple[tuple[HeadBudget, ...] | None, ...] = per_head("kv")
    calibration: dict[str, Any] = field(default_factory=dict)  # text sha256, tokens, source, seconds

    # -- choices --------------------------------------------------------------------------
    def choice(self, layer: int, head: int) -> int | None:
        hb = self._layer(layer)[head]
        return hb.choose(self.config.tau, self.config.score)

    def _layer(self, layer: int) -> tuple[HeadBudget, ...]:
        heads = self.layers[layer]
        if heads is None:
            raise KeyError(f"layer {layer} is not a TCA layer (sliding-window)")
        return heads

    def layer_p(self, layer: int) -> torch.Tensor:
        """(KV, |K|) float64 keep-count distribution per KV head; dense heads keep b everywhere."""
        n_k = len(keep_counts(self.config.block_size))
        dense = [1.0] + [0.0] * (n_k - 1)
        rows = []
        for h in range(len(self._layer(layer))):
            c = self.choice(layer, h)
            rows.append(list(self.candidates[c]) if c is not None else dense)
        return torch.tensor(rows, dtype=torch.float64)

    def layer_decode_keep(self, layer: int) -> torch.Tensor:
        """(KV,) tokens kept per compressed block in decode."""
        p = self.layer_p(layer)
        return torch.tensor([decode_keep(row, self.config.block_size) for row in p], dtype=torch.long)

    def at(self, **changes) -> "Budgets":
        """Same calibration, other tau/score (re-selection from the stored candidate ladder)."""
        bad = set(changes) - {"tau", "score"}
        if bad:
            raise ValueError(f"only tau and score can change without recalibrating, not {sorted(bad)}")
        return replace(self, config=self.config.with_(**changes))

    def at_tau(self, tau: float) -> "Budgets":
        return self.at(tau=tau)

    # -- summaries --------------------------------------------------------------------------
    def head_fractions(self) -> list[list[float] | None]:
        """Expected kept fraction of the global region per head (E[k]/b; dense = 1)."""
        b = self.config.block_size
        out: list[list[float] | None] = []
        for i, heads in enumerate(self.layers):
            if heads is None:
                out.append(None)
                continue
            out.append([float(expected_keep(row, b)) / b for row in self.layer_p(i)])
        return out

    @property
    def mean_kept_fraction(self) -> float:
        vals = [f for layer in self.head_fractions() if layer is not None for f in layer]
        return sum(vals) / len(vals)

    @property
    def dense_heads(self) -> int:
        return sum(
            self.choice(i, h) is None
            for i, heads in enumerate(self.layers)
            if heads is not None
            for h in range(len(heads))
        )

    def summary_rows(self) -> list[dict[str, Any]]:
        rows = []
        for i, fr in enumerate(self.head_fractions()):
            if fr is None:
                rows.append({"layer": i, "kind": "sliding (untouched)"})
                continue
            dense = sum(self.choice(i, h) is None for h in range(len(fr)))
            rows.append({"layer": i, "kind": "tca", "mean_kept": sum(fr) / len(fr), "dense_heads": dense})
        return rows

    def mapped_onto(self, model) -> "Budgets":
        """These budgets spread over another model's layers and KV heads (for timing studies).

        Target layer i takes source layer round(i * (S - 1) / (T - 1)) among TCA layers; KV head
        h takes source head h mod KV_source. The result carries the target's identity.
        """
        from ...introspect import layer_kinds

        src = [heads for heads in self.layers if heads is not None]
        kinds = layer_kinds(model)
        full = [i for i, k in enumerate(kinds) if k == "full"]
        ident = ModelIdentity.of(model)
        layers: list[tuple[HeadBudget, ...] | None] = [None] * len(kinds)
        for j, i in enumerate(full):
            s_idx = round(j * (len(src) - 1) / max(1, len(full) - 1))
            heads = src[s_idx]
            layers[i] = tuple(heads[h % len(heads)] for h in range(ident.num_kv_heads))
        calib = {**self.calibration, "mapped_from": self.model.name or self.model.model_type}
        return replace(self, model=ident, layers=tuple(layers), calibration=calib)

    # -- persistence --------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": "tca-attention/budgets",
            "version": FORMAT_VERSION,
            "model": asdict(self.model),
            "config": asdict(self.config),
            "calibration": self.calibration,
            "candidates": [list(r) for r in self.candidates],
            "keep_counts": keep_counts(self.config.block_size),
            "layers": [
                None
                if heads is None
                else [
                    {
                        "choice": hb.choose(self.config.tau, self.config.score),
                        "retained": (
                            hb.scores(self.config.score)[c] if (c := hb.choose(self.config.tau, self.config.score)) is not None else None
                        ),
                        "column_mean": list(hb.column_mean),
                        "observation": list(hb.observation),
                    }
                    for hb in heads
                ]
                for heads in self.layers
            ],
        }

    def save(self, path: str | Path) -> Path:
        return save_json(self.to_json(), path)

    @classmethod
    def from_json(cls, data: Any, source: str = "") -> "Budgets":
        """Budgets from the parsed JSON of a budget file; BudgetError naming what is wrong.

        Every field read is type-checked: `data` must be an object of this format and version,
        with a model identity, a config, candidate rows and per-layer head scores.
        """
        where = f" {source}" if source else ""

        def bad(why: str) -> BudgetError:
            return BudgetError(f"corrupt budget file{where}: {why}")

        if not isinstance(data, dict):
            raise bad(f"expected a JSON object, got {json_type(data)}")
        if data.get("format") != "tca-attention/budgets":
            raise BudgetError(f"not a tca-attention budget file{where} (format is {data.get('format')!r}, "
                              "expected 'tca-attention/budgets')")
        version = data.get("version")
        if version != FORMAT_VERSION or isinstance(version, bool):
            raise BudgetError(f"budget file{where} version {version!r} is not supported (expected {FORMAT_VERSION})")
        missing = [k for k in ("model", "config", "candidates", "layers") if k not in data]
        if missing:
            raise bad(f"missing key(s) {', '.join(missing)}")

        model = ModelIdentity.from_json(data["model"], bad)

        c = _object(data["config"], "config", bad)
        _keys(c, set(_CONFIG_TYPES), "config", bad, required=True)
        for k, v in c.items():
            if not _CONFIG_TYPES[k](v):
                raise bad(f"config.{k} has the wrong type: {v!r}")
        try:
            config = TCAConfig(**c)
        except ValueError as e:
            raise bad(f"config: {e}") from e

        if not isinstance(data["candidates"], list) or not data["candidates"]:
            raise bad("candidates must be a non-empty list of rows")
        cands = tuple(_numbers(r, f"candidates[{i}]", bad) for i, r in enumerate(data["candidates"]))
        if not isinstance(data["layers"], list):
            raise bad(f"layers must be a list, got {json_type(data['layers'])}")
        layers = []
        for i, heads in enumerate(data["layers"]):
            if heads is None:
                layers.append(None)
                continue
            if not isinstance(heads, list):
                raise bad(f"layers[{i}] must be a list of heads or null, got {json_type(heads)}")
            row = []
            for h, head in enumerate(heads):
                head = _object(head, f"layers[{i}][{h}]", bad)
                for k in ("column_mean", "observation"):
                    if k not in head:
                        raise bad(f"layers[{i}][{h}] has no {k!r}")
                row.append(HeadBudget(_numbers(head["column_mean"], f"layers[{i}][{h}].column_mean", bad),
                                      _numbers(head["observation"], f"layers[{i}][{h}].observation", bad)))
            layers.append(tuple(row))
        calibration = data.get("calibration", {})
        if not isinstance(calibration, dict):
            raise bad(f"calibration must be an object, got {json_type(calibration)}")

        if len(layers) != model.num_layers:
            raise bad(f"{len(layers)} layers for a {model.num_layers}-layer model")
        n_k = len(keep_counts(config.block_size))
        if any(len(r) != n_k for r in cands):
            raise bad("candidate rows do not match the block size")
        for heads in layers:
            if heads is not None and (
                len(heads) != model.num_kv_heads
                or any(len(h.column_mean) != len(cands) or len(h.observation) != len(cands) for h in heads)
            ):
                raise bad("per-head scores do not match the candidates/heads")
        return cls(model=model, config=config, candidates=cands, layers=tuple(layers), calibration=calibration)

    @classmethod
    def load(cls, path: str | Path, model=None) -> "Budgets":
        """Load a budget file; with `model`, refuse budgets calibrated on another model."""
        try:
            data = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BudgetError(f"corrupt budget file {path}: not JSON ({e})") from e
        except IsADirectoryError as e:
            raise BudgetError(f"budget file {path} is a directory") from e
        budgets = cls.from_json(data, source=str(path))
        if model is not None:
            budgets.check_model(model)
        return budgets

    def check_model(self, model) -> None:
        why = self.model.mismatch(ModelIdentity.of(model))
        if why:
            raise BudgetError(f"budgets for {self.model.name or self.model.model_type} do not fit this model: {why}")


# -- validation helpers of Budgets.from_json -------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _object(v: Any, what: str, bad) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise bad(f"{what} must be an object, got {json_type(v)}")
    return v


def _keys(d: dict[str, Any], known: set[str], what: str, bad, required: bool) -> None:
    unknown = sorted(set(d) - known)
    if unknown:
        raise bad(f"{what} has unknown key(s) {', '.join(unknown)}")
    missing = sorted(known - set(d)) if required else []
    if missing:
        raise bad(f"{what} is missing key(s) {', '.join(missing)}")


def _numbers(v: Any, what: str, bad) -> tuple[float, ...]:
    if not isinstance(v, list) or not all(_is_number(x) for x in v):
        raise bad(f"{what} must be a list of numbers")
    return tuple(float(x) for x in v)


_CONFIG_TYPES = {
    "block_size": _is_int, "window": _is_int, "sink_tokens": _is_int,
    "tau": _is_number, "alpha": _is_number, "sigma": _is_number,
    "score": lambda v: isinstance(v, str), "mass_norm": lambda v: isinstance(v, str),
}
