"""Bars of per-layer probe results (TCA's dense_at=auto): agreement with dense attention with TCA
in one layer at a time, the floor drawn, the layers below it in red."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

Panel = tuple[str, Sequence[tuple[int, float]]]  # a title and (layer, agreement) rows


def rows_of(path: str | Path) -> list[tuple[int, float]]:
    """(layer, agreement) from a layer-probe state file or a `scripts/probe_tau.py --per-layer` JSON
    ({"meta", "rows"} or a bare list of rows)."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict) and data.get("format") == "tca-attention/layer-probe":
        return [(i, float(a)) for i, a in enumerate(data["agreement"]) if a is not None]
    rows = data["rows"] if isinstance(data, dict) else data
    return [(int(r["layer"]), float(r["agreement"])) for r in rows]


def plot_layer_probes(panels: Sequence[Panel], out: str | Path, floor: float = 0.9) -> Path:
    """One bar panel per probe, written to `out` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not panels:
        raise ValueError("no probe to plot")
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 1.9 * len(panels)), squeeze=False)
    for ax, (title, rows) in zip(axes[:, 0], panels):
        layers, agree = zip(*rows)
        ax.bar([str(i) for i in layers], agree, color=["tab:red" if a < floor else "tab:blue" for a in agree])
        ax.axhline(floor, color="k", lw=0.8, ls="--")
        ax.set_ylim(min(0.5, min(agree) - 0.05), 1.02)
        ax.set_ylabel("agreement")
        ax.set_title(title, fontsize=9, loc="left")
        ax.tick_params(axis="x", labelsize=7)
    axes[-1, 0].set_xlabel(f"layer with TCA (all others dense); red: below the floor {floor} "
                           "(dense_at=auto keeps it dense)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)
