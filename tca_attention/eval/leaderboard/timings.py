"""Prefill times and decode speeds of the methods, read from a `tca bench methods` JSON (measured
on a GPU there; the leaderboard itself needs none), matched to the same target fractions as the
accuracy.

A row of that file is one (prompt length, method) run on the Llama-3.1-8B-shaped model:
`ttft_s` is the whole prefill forward, the method's selection (planning) included, matched on the
row's prefill attended fraction (a decode-only method prefills densely: 100%);
`decode_tokens_per_s` is the decode speed, matched on the decode attended fraction (the share of
the cache a step reads: bytes read). Another key is matched on the smaller of the two, as the
accuracy results.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from ... import registry
from .matching import Point, match_at
from .variants import variants

DEFAULT_KEY = "ttft_s"
# dense attention's rows: transformers' SDPA ("full") and the engine keeping every token ("full-budget",
# e.g. the split-K GQA decode in a CUDA graph); the better of the two is the baseline of each figure
DENSE = (registry.FULL, "full-budget")
DEFAULT_KEYS = ("ttft_s", "decode_tokens_per_s")
# key -> (the row's fraction it is matched on, higher is better, what it is)
PHASES = {"ttft_s": ("prefill_attended_fraction", False, "prefill time"),
          "decode_tokens_per_s": ("decode_attended_fraction", True, "decode speed")}


def load_timings(path: Path) -> dict[str, Any]:
    """The bench JSON, checked: {"meta": {...}, "rows": [{"tokens", "method", ...}, ...]} with a
    dense ("full") row at every length."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--timings {path}: not JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list) or not isinstance(data.get("meta"), dict):
        raise ValueError(f"--timings {path}: expected the JSON of `tca bench methods` ({{'meta': ..., 'rows': [...]}})")
    for i, row in enumerate(data["rows"]):
        if not isinstance(row, dict) or not isinstance(row.get("tokens"), int) or not isinstance(row.get("method"), str):
            raise ValueError(f"--timings {path}: row {i} has no integer 'tokens' and string 'method': {row!r}")
    lengths = {r["tokens"] for r in data["rows"]}
    no_dense = sorted(L for L in lengths if not any(r["tokens"] == L and r["method"] == registry.FULL
                                                   for r in data["rows"]))
    if no_dense:
        raise ValueError(f"--timings {path}: no dense ('full') row at {no_dense} tokens")
    return data


def _fraction(row: dict, key: str) -> float:
    """The attended fraction `key` is matched on (PHASES; else the bench's own definition)."""
    if key in PHASES:
        value = row.get(PHASES[key][0])
        return 1.0 if value is None else float(value)
    from ...benchmarks.bench_methods import attended

    return attended(row)


def timing_points(rows: Iterable[dict], length: int, key: str = DEFAULT_KEY) -> list[Point]:
    """The measured (non-dense, error-free) rows at `length` as points: value = the key's figure."""
    rows = list(rows)
    family = variants(r["method"] for r in rows)
    return [Point(r["method"], family[r["method"]], _fraction(r, key), float(r[key])) for r in rows
            if r["tokens"] == length and r["method"] not in DENSE and not r.get("error") and r.get(key) is not None]


def summarize_timings(data: dict[str, Any], targets: Iterable[float], tolerance: float,
                      key: str = DEFAULT_KEY, source: str | None = None, focus: str = "tca") -> dict[str, Any]:
    """Per length: dense seconds, and per target each family's nearest row (seconds, speed-up
    over dense, its fraction; None: no row within the tolerance), the fastest family, errors;
    `findings`: where `focus` is slower than a peer at a matched fraction."""
    rows = data["rows"]
    if not any(key in r for r in rows):
        raise ValueError(f"timing key {key!r}: no row of the timings has it (e.g. {', '.join(DEFAULT_KEYS)})")
    family = variants(r["method"] for r in rows)
    families = list(dict.fromkeys(family[r["method"]] for r in rows if r["method"] not in DENSE))
    basis, higher, what = PHASES.get(key, ("the smaller of prefill and decode attended fractions",
                                           key.endswith("_per_s"), key))
    out: dict[str, Any] = {"source": source, "key": key, "what": what, "matched_on": basis,
                           "higher_is_better": higher, "focus": focus, "meta": data["meta"], "lengths": {},
                           "findings": [], "rows": rows}
    for L in sorted({r["tokens"] for r in rows}):
        dense = _best_dense([r for r in rows if r["tokens"] == L and r["method"] in DENSE], key, higher)
        dense_v = dense.get(key)
        points = timing_points(rows, L, key)
        cell: dict[str, Any] = {
            "dense": dense_v, **({} if higher else {"dense_s": dense_v}), "dense_method": dense["method"],
            "dense_error": dense.get("error"),
            "errors": {r["method"]: r["error"] for r in rows if r["tokens"] == L and r.get("error")},
            "points": [_point_json(p, dense_v, key) for p in points], "matched": [],
        }
        for t in targets:
            m = match_at(points, t, tolerance, families, higher_is_better=higher)
            cell["matched"].append({
                "target": t, "fastest": list(m.best),
                "chosen": {f: (_point_json(p, dense_v, key) if p is not None else None) for f, p in m.chosen.items()},
            })
            for peer, gap in m.behind(focus):
                mine, theirs = m.chosen[focus], m.chosen[peer]
                out["findings"].append(
                    f"{L // 1024}K tokens, {100 * t:g}% attended: {focus} {figure(key, mine.value)} ({mine.method}, "
                    f"{100 * mine.fraction:.1f}%) vs {peer} {figure(key, theirs.value)} ({theirs.method}, "
                    f"{100 * theirs.fraction:.1f}%)")
        out["lengths"][str(L)] = cell
    return out


def _best_dense(rows: list[dict], key: str, higher: bool) -> dict:
    """The dense row with the best figure of `key` (SDPA's when neither has one)."""
    measured = [r for r in rows if not r.get("error") and r.get(key) is not None]
    if not measured:
        return next(r for r in rows if r["method"] == registry.FULL)
    return (max if higher else min)(measured, key=lambda r: r[key])


def figure(key: str, value: float) -> str:
    """A value of `key` for people: seconds as ms, rates as they are."""
    return f"{value:.1f} tokens/s" if key.endswith("_per_s") else f"{1000 * value:.1f} ms"


def speedup(key: str, value: float, dense: float | None) -> float | None:
    """How many times better than dense attention (a rate: value / dense; a time: dense / value)."""
    if not dense or value <= 0:
        return None
    return value / dense if key.endswith("_per_s") else dense / value


def _point_json(p: Point, dense: float | None, key: str = DEFAULT_KEY) -> dict[str, Any]:
    return {"method": p.method, "family": p.family, "attended_fraction": p.fraction, "value": p.value,
            **({"seconds": p.value} if not key.endswith("_per_s") else {}), "speedup": speedup(key, p.value, dense)}
