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
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch

from ..introspect import attention_modules, key_projection_weight, text_config

_FINGERPRINT_RTOL = 2e-2  # survives float32 <-> bf16 casts of the same weights


class StateError(ValueError):
    """A state file that is corrupt, of another version or method, or for another model."""


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
        w = key_projection_weight(attention_modules(model)[0]).detach().flatten()
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


def is_numbers(v: Any) -> bool:
    """A JSON list of numbers (booleans are not numbers)."""
    return isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)


def announce(show: bool, line: str, logger: logging.Logger | None = None) -> None:
    """A calibration's one-line notice: logged, and printed on stderr when `show`."""
    (logger or logging.getLogger(__name__)).info(line)
    if show:
        print(line, file=sys.stderr, flush=True)
