"""Prefill times of the methods, read from a `tca bench methods` JSON (measured on a GPU there;
the leaderboard itself needs none), matched to the same target fractions as the accuracy.

A row of that file is one (prompt length, method) run on the Llama-3.1-8B-shaped model:
`ttft_s` is the whole prefill forward, the method's selection (planning) included, and the row's
attended fraction is the smaller of its prefill and decode shares, as for the accuracy results.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from ... import registry
from .matching import Point, match_at

DEFAULT_KEY = "ttft_s"


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


def _family(method: str) -> str:
    return method.partition(":")[0]


def _attended(row: dict) -> float:
    from ...benchmarks.bench_methods import attended  # the bench's own definition

    return attended(row)


def timing_points(rows: Iterable[dict], length: int, key: str = DEFAULT_KEY) -> list[Point]:
    """The measured (non-dense, error-free) rows at `length` as points: value = seconds."""
    return [Point(r["method"], _family(r["method"]), _attended(r), float(r[key])) for r in rows
            if r["tokens"] == length and r["method"] != registry.FULL and not r.get("error") and r.get(key) is not None]


def summarize_timings(data: dict[str, Any], targets: Iterable[float], tolerance: float,
                      key: str = DEFAULT_KEY, source: str | None = None, focus: str = "tca") -> dict[str, Any]:
    """Per length: dense seconds, and per target each family's nearest row (seconds, speed-up
    over dense, its fraction; None: no row within the tolerance), the fastest family, errors;
    `findings`: where `focus` is slower than a peer at a matched fraction."""
    rows = data["rows"]
    if not any(key in r for r in rows):
        raise ValueError(f"timing key {key!r}: no row of the timings has it (e.g. ttft_s)")
    families = list(dict.fromkeys(_family(r["method"]) for r in rows if r["method"] != registry.FULL))
    out: dict[str, Any] = {"source": source, "key": key, "focus": focus, "meta": data["meta"], "lengths": {},
                           "findings": [], "rows": rows}
    for L in sorted({r["tokens"] for r in rows}):
        dense = next(r for r in rows if r["tokens"] == L and r["method"] == registry.FULL)
        dense_s = dense.get(key)
        points = timing_points(rows, L, key)
        cell: dict[str, Any] = {
            "dense_s": dense_s, "dense_error": dense.get("error"),
            "errors": {r["method"]: r["error"] for r in rows if r["tokens"] == L and r.get("error")},
            "points": [_point_json(p, dense_s) for p in points], "matched": [],
        }
        for t in targets:
            m = match_at(points, t, tolerance, families, higher_is_better=False)
            cell["matched"].append({
                "target": t, "fastest": list(m.best),
                "chosen": {f: (_point_json(p, dense_s) if p is not None else None) for f, p in m.chosen.items()},
            })
            for peer, gap in m.behind(focus):
                mine, theirs = m.chosen[focus], m.chosen[peer]
                out["findings"].append(
                    f"{L // 1024}K tokens, {100 * t:g}% kept: {focus} {1000 * mine.value:.1f} ms ({mine.method}, "
                    f"{100 * mine.fraction:.1f}%) vs {peer} {1000 * theirs.value:.1f} ms ({theirs.method}, "
                    f"{100 * theirs.fraction:.1f}%)")
        out["lengths"][str(L)] = cell
    return out


def _point_json(p: Point, dense_s: float | None) -> dict[str, Any]:
    return {"method": p.method, "family": p.family, "attended_fraction": p.fraction, "seconds": p.value,
            "speedup": (dense_s / p.value) if dense_s and p.value > 0 else None}
