"""Which leaderboard method a result label belongs to: its registry name, plus the options that tell
apart that name's labels other than the swept knob.

`tca:tau=0.5`, `tca:tau=0.9` are two sweep points of `tca` (the paper's rule); `tca:tau=0.9,last_q=16`
is a point of `tca[last_q=16]`, `tca:tau=0.7+zerotuning` of `tca+zerotuning`, `hip@kept=0.4` of
`hip`. A parameter every label of a name shares (`streaming:block_size=16@kept=...`) names no variant.
"""
from __future__ import annotations

from typing import Iterable

from ... import registry
from ..report import family


def _parts(label: str) -> tuple[str, dict[str, str], str | None]:
    """(registry name, its non-sweep parameters, calibrator) of a result label."""
    spec = label.split("@", 1)[0]  # NAME@kept=F / NAME@match=REF: the spec before it
    try:
        base, cal = registry.split(spec)
        name, params = registry.parse_spec(base)
    except (KeyError, ValueError):  # a label of an older run or another spelling: its name only
        return family(label), {}, None
    knob = registry.sweep_param(name)
    return name, {k: str(v) for k, v in params.items() if k != knob}, cal


def variants(labels: Iterable[str]) -> dict[str, str]:
    """label -> the method it is a point of (see the module docstring)."""
    labels = list(dict.fromkeys(labels))
    parts = {lab: _parts(lab) for lab in labels}
    varying: dict[str, set[str]] = {}  # name -> parameters whose values differ among its labels
    for name in {p[0] for p in parts.values()}:
        of_name = [p[1] for p in parts.values() if p[0] == name]
        keys = set().union(*of_name)
        varying[name] = {k for k in keys if len({ps.get(k) for ps in of_name}) > 1}
    out = {}
    for lab, (name, params, cal) in parts.items():
        opts = [f"{k}={params[k]}" for k in sorted(varying[name]) if k in params]
        out[lab] = name + (f"+{cal}" if cal else "") + (f"[{','.join(opts)}]" if opts else "")
    return out
