"""Matched kept fractions: each method's sweep point nearest a target fraction, and which method
is best there and by how much. Pure functions on plain points (no model, no files).

A *method* here is a family of sweep points: every result label of one registry name
(`tca:tau=0.5`, `tca:tau=0.9` are two points of `tca`). The fraction is the attended fraction
(docs/eval.md): the share of the work a method sparsifies that it still does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

EPS = 1e-9  # values closer than this are equal (ties in distance and in value)
DEFAULT_TARGETS = (0.25, 0.4, 0.6)  # the matched kept fractions
DEFAULT_TOLERANCE = 0.1  # how far from a target a sweep point may lie (fraction units)
DEFAULT_FOCUS = "tca"  # the method whose losses the report lists


@dataclass(frozen=True)
class Point:
    """One sweep point: a result label, its family (registry name), its fraction and its value
    (an accuracy in [0, 1], or seconds for timings)."""

    method: str
    family: str
    fraction: float
    value: float


def nearest(points: Iterable[Point], target: float, tolerance: float) -> Point | None:
    """The point whose fraction is nearest `target`, or None when none is within `tolerance`
    (absolute, in fraction units). Ties in distance go to the smaller fraction (the point doing
    less work), then to the label in sort order, so the choice never depends on the value."""
    best: Point | None = None
    for p in points:
        d = abs(p.fraction - target)
        if d > tolerance + EPS:
            continue
        if best is None:
            best = p
            continue
        db = abs(best.fraction - target)
        if d < db - EPS or (abs(d - db) <= EPS and (p.fraction, p.method) < (best.fraction, best.method)):
            best = p
    return best


@dataclass(frozen=True)
class Match:
    """The methods at one target fraction.

    chosen: family -> its nearest point (None: no point within the tolerance).
    best: the families with the best value (several on a tie); margin: how far the best is ahead
    of the next value (`runner_up`, the families there), None when no other family has a point.
    """

    target: float
    chosen: dict[str, Point | None]
    best: tuple[str, ...] = ()
    margin: float | None = None
    runner_up: tuple[str, ...] = ()
    higher_is_better: bool = True
    missing: tuple[str, ...] = field(default=())

    def behind(self, family: str) -> list[tuple[str, float]]:
        """The families ahead of `family` here, with how far ahead (positive), best first; empty
        when `family` leads, ties, or has no point."""
        mine = self.chosen.get(family)
        if mine is None:
            return []
        sign = 1.0 if self.higher_is_better else -1.0
        ahead = [(f, sign * (p.value - mine.value)) for f, p in self.chosen.items()
                 if p is not None and f != family and sign * (p.value - mine.value) > EPS]
        return sorted(ahead, key=lambda t: (-t[1], t[0]))


def match_at(points: Iterable[Point], target: float, tolerance: float, families: Iterable[str] | None = None,
             higher_is_better: bool = True) -> Match:
    """Each family's nearest point to `target` and the best family there. `families` lists the
    families to report (default: those with points), so one with no points at all shows as missing."""
    points = list(points)
    fams = list(dict.fromkeys([*(families or []), *(p.family for p in points)]))
    chosen = {f: nearest((p for p in points if p.family == f), target, tolerance) for f in fams}
    have = {f: p for f, p in chosen.items() if p is not None}
    missing = tuple(f for f, p in chosen.items() if p is None)
    if not have:
        return Match(target, chosen, higher_is_better=higher_is_better, missing=missing)
    sign = 1.0 if higher_is_better else -1.0
    values = sorted({round(sign * p.value, 12) for p in have.values()}, reverse=True)
    top = values[0]
    best = tuple(sorted(f for f, p in have.items() if abs(sign * p.value - top) <= EPS))
    rest = [f for f in have if f not in best]
    if not rest:
        return Match(target, chosen, best, None, (), higher_is_better, missing)
    second = max(sign * have[f].value for f in rest)
    runner_up = tuple(sorted(f for f in rest if abs(sign * have[f].value - second) <= EPS))
    return Match(target, chosen, best, top - second, runner_up, higher_is_better, missing)


def pareto(points: Iterable[Point]) -> list[Point]:
    """The points no other point beats on both axes (smaller or equal fraction and higher or
    equal value, one of them strictly), sorted by fraction."""
    pts = sorted(points, key=lambda p: (p.fraction, -p.value, p.method))
    front: list[Point] = []
    for p in pts:
        if not front or p.value > front[-1].value + EPS:
            front.append(p)
    return front
