"""What every method's calibration state carries: the identity of the model it belongs to.

A method's state (TCA's budgets, a head split, ...) is plain versioned JSON; loading it checks the
model's identity so that state of another model is refused, never silently applied.
"""
from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Literal

import torch

from ..introspect import attention_modules, key_projection_weight, text_config

_FINGERPRINT_RTOL = 2e-2  # survives float32 <-> bf16 casts of the same weights


class StateError(ValueError):
    """A state file that is corrupt, of another version or method, or for another model."""


# Per-head tables. A method's state that holds one entry per head of each layer (a tuple over
# layers of None or a tuple over heads) declares it with per_head("kv") or per_head("query"); a
# tensor-parallel rank then runs the method on its own heads' entries, sliced in one place
# (integration/tensor_parallel.py). Tables that must stay whole (e.g. scores ranked over the whole
# model) are not declared; what is derived from them per head is.
PER_HEAD = "tca_attention.per_head"
HeadAxis = Literal["kv", "query"]


def per_head(axis: HeadAxis, **kwargs: Any) -> Any:
    """A dataclass field holding a per-layer, per-head table along `axis` (KV or query heads)."""
    if axis not in ("kv", "query"):
        raise ValueError(f"per_head axis must be 'kv' or 'query', got {axis!r}")
    return field(metadata={PER_HEAD: axis}, **kwargs)


@dataclass(frozen=True)
class ModelIdentity:
    """Enough of a model to refuse state (budgets, head scores) calibrated on another one."""

    model_type: str
    name: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    fingerprint: tuple[float, ...]  # a few weights of the first layer's key (or fused qkv) projection

    @classmethod
    def of(cls, model) -> "ModelIdentity":
        cfg = text_config(model)
        w = key_projection_weight(attention_modules(model)[0]).detach()
        if hasattr(w, "full_tensor"):  # a tensor-parallel shard (DTensor): every rank sees the whole weight
            w = w.full_tensor()
        w = w.flatten()
        picks = torch.linspace(0, w.numel() - 1, 8).long().to(w.device)
        return cls(
            model_type=cfg.model_type,
            name=str(getattr(model, "name_or_path", "") or getattr(cfg, "_name_or_path", "")),
            num_layers=cfg.num_hidden_layers,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
            hidden_size=cfg.hidden_size,
            vocab_size=cfg.vocab_size,
            fingerprint=tuple(round(float(x), 6) for x in w[picks].float().cpu()),
        )

    @classmethod
    def from_json(cls, m: Any, bad: Callable[[str], Exception]) -> "ModelIdentity":
        """The identity a state file's "model" object holds; `bad(why)` is the error raised
        (each state names its own file kind)."""
        if not isinstance(m, dict):
            raise bad(f"model must be an object, got {json_type(m)}")
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(m) - known):
            raise bad(f"model has unknown key(s) {', '.join(unknown)}")
        if missing := sorted(known - set(m)):
            raise bad(f"model is missing key(s) {', '.join(missing)}")
        for f in ("model_type", "name"):
            if not isinstance(m[f], str):
                raise bad(f"model.{f} must be a string, got {json_type(m[f])}")
        for f in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size", "vocab_size"):
            if not (isinstance(m[f], int) and not isinstance(m[f], bool)) or m[f] < 1:
                raise bad(f"model.{f} must be a positive integer, got {m[f]!r}")
        fp = m["fingerprint"]
        if not isinstance(fp, (list, tuple)) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in fp):
            raise bad("model.fingerprint must be a list of numbers")
        return cls(**{**m, "fingerprint": tuple(float(x) for x in fp)})

    def mismatch(self, other: "ModelIdentity") -> str | None:
        """Why `other` is a different model, or None. The name is informative only."""
        for f in ("model_type", "num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size", "vocab_size"):
            if getattr(self, f) != getattr(other, f):
                return f"{f}: state has {getattr(self, f)!r}, model has {getattr(other, f)!r}"
        for a, b in zip(self.fingerprint, other.fingerprint):
            if not math.isclose(a, b, rel_tol=_FINGERPRINT_RTOL, abs_tol=1e-4):
                return "weights differ (fingerprint mismatch): this state was calibrated on another model"
        return None


def check_header(data: Any, fmt: str, version: int, kind: str, source: str = "") -> None:
    """Raise StateError unless `data` is an object of format `fmt` at `version` (kind names the
    file in the message, e.g. 'head-score file')."""
    where = f" {source}" if source else ""
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise StateError(f"not a {fmt} file{where}")
    if data.get("version") != version or isinstance(data.get("version"), bool):
        raise StateError(f"{kind}{where} version {data.get('version')!r} is not supported (expected {version})")


def json_type(v: Any) -> str:
    """A JSON value's kind in an error message: 'an object', 'a list', 'null', ..."""
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def save_json(data: Any, path: str | Path) -> Path:
    """Write a state file atomically (a temporary file renamed over the target): a crash never
    leaves half a file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
    return path


# -- per-head tables (the attention calibrators' state) --------------------------------------------
HEAD_TABLE_FORMAT = "tca-attention/head-table"
HEAD_TABLE_VERSION = 1


@dataclass(frozen=True)
class HeadTable:
    """One number per (layer, query head) that a calibrator found, tied to the model: ZeroTuning's
    initial-token scales, ACT's calibrated heads (1 = calibrate, 0 = leave). layers[i] is None for
    layers the calibrator leaves alone (sliding-window layers), else num_heads finite numbers."""

    method: str
    model: ModelIdentity
    layers: tuple[tuple[float, ...] | None, ...]
    calibration: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def check_model(self, model) -> None:
        why = self.model.mismatch(ModelIdentity.of(model))
        if why:
            raise StateError(f"{self.method} state for {self.model.name or self.model.model_type} does not fit "
                             f"this model: {why}")

    def to_json(self) -> dict[str, Any]:
        return {"format": HEAD_TABLE_FORMAT, "version": HEAD_TABLE_VERSION, "method": self.method,
                "model": asdict(self.model), "calibration": self.calibration,
                "layers": [None if r is None else list(r) for r in self.layers]}

    def save(self, path: str | Path) -> Path:
        return save_json(self.to_json(), path)

    @classmethod
    def from_json(cls, data: Any, method: str, source: str = "") -> "HeadTable":
        """A table from a parsed file of `method`; StateError naming what is wrong."""
        where = f" {source}" if source else ""

        def bad(why: str) -> StateError:
            return StateError(f"corrupt {method} state file{where}: {why}")

        check_header(data, HEAD_TABLE_FORMAT, HEAD_TABLE_VERSION, f"{method} state file", source)
        if data.get("method") != method:
            raise StateError(f"{source or 'this file'} is {data.get('method')!r} state, not {method!r}")
        model = ModelIdentity.from_json(data.get("model"), bad)
        calib, layers = data.get("calibration", {}), data.get("layers")
        if not isinstance(calib, dict):
            raise bad("calibration must be an object")
        if not isinstance(layers, list) or len(layers) != model.num_layers:
            raise bad(f"layers must be a list of {model.num_layers} entries (one per layer)")
        for i, row in enumerate(layers):
            ok = row is None or (isinstance(row, list) and len(row) == model.num_heads and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in row))
            if not ok:
                raise bad(f"layers[{i}] must be null or {model.num_heads} finite numbers (one per query head)")
        return cls(method, model, tuple(None if r is None else tuple(float(x) for x in r) for r in layers), calib)

    @classmethod
    def load(cls, path: str | Path, method: str, model=None) -> "HeadTable":
        """Load `method`'s state file; with `model`, refuse state calibrated on another model."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StateError(f"cannot read {method} state file {path}: {e}") from e
        table = cls.from_json(data, method, source=str(path))
        if model is not None:
            table.check_model(model)
        return table


def layer_rows(value: Any, what: str, num_layers: int, width: int, row_ok: Callable[[list], bool], expect: str,
               bad: Callable[[str], Exception]) -> tuple[tuple | None, ...]:
    """A state file's per-layer table, checked: a list of num_layers entries, each null (a layer
    the state leaves alone) or a list of `width` values (one per head) that row_ok accepts;
    `expect` words what a row holds in the error. -> rows as tuples (None kept)."""
    if not isinstance(value, list) or len(value) != num_layers:
        raise bad(f"{what} must be a list of {num_layers} entries (one per layer)")
    for i, row in enumerate(value):
        if row is not None and not (isinstance(row, list) and len(row) == width and row_ok(row)):
            raise bad(f"{what}[{i}] must be null or {width} {expect}")
    return tuple(None if r is None else tuple(r) for r in value)


def unit_scores(row: list) -> bool:
    """A row of numbers in [0, 1] (retrieval scores, gates)."""
    return is_numbers(row) and all(0.0 <= x <= 1.0 for x in row)


def is_numbers(v: Any) -> bool:
    """A JSON list of numbers (booleans are not numbers)."""
    return isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)


_SAID_ONCE: set[str] = set()  # the cached state files this process has named on stderr


def announce(show: bool, line: str, logger: logging.Logger | None = None, once: str | Path | None = None) -> None:
    """A calibration's one-line notice: logged, and printed on stderr when `show`; with `once`
    (a cached state's path) printed only the first time this process names it (an eval creates
    its methods per batch and would repeat "Using cached ..." dozens of times)."""
    (logger or logging.getLogger(__name__)).info(line)
    if not show or (once is not None and str(once) in _SAID_ONCE):
        return
    if once is not None:
        _SAID_ONCE.add(str(once))
    print(line, file=sys.stderr, flush=True)
