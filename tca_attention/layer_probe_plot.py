"""Per-layer probe results (TCA's dense_at=auto), one panel per probe: bars of the agreement with
dense attention with TCA in one layer at a time (the floor dashed), dots of the KL per answer
token on a log axis (the ceiling dotted); the layers either rule keeps dense in red."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

Row = tuple[int, float, float]  # layer, agreement, KL(dense || TCA) per answer token
Panel = tuple[str, Sequence[Row]]  # a title and its rows


def rows_of(path: str | Path) -> list[Row]:
    """(layer, agreement, kl) from a layer-probe state file or a `scripts/probe_tau.py --per-layer`
    JSON ({"meta", "rows"} or a bare list of rows)."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict) and data.get("format") == "tca-attention/layer-probe":
        return [(i, float(a), float(k)) for i, (a, k) in enumerate(zip(data["agreement"], data["kl"]))
                if a is not None]
    rows = data["rows"] if isinstance(data, dict) else data
    return [(int(r["layer"]), float(r["agreement"]), float(r.get("kl_per_token", r.get("kl", 0.0)))) for r in rows]


def plot_layer_probes(panels: Sequence[Panel], out: str | Path, floor: float = 0.9,
                      ceiling: float = math.inf) -> Path:
    """One panel per probe, written to `out` (PNG); ceiling: the KL arm (inf: agreement only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not panels:
        raise ValueError("no probe to plot")
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.1 * len(panels)), squeeze=False)
    for ax, (title, rows) in zip(axes[:, 0], panels):
        layers, agree, kl = zip(*rows)
        x = list(range(len(layers)))
        dense = [a < floor or k > ceiling for a, k in zip(agree, kl)]
        ax.bar(x, agree, color=["tab:red" if d else "tab:blue" for d in dense])
        ax.axhline(floor, color="k", lw=0.8, ls="--")
        ax.set_ylim(min(0.5, min(agree) - 0.05), 1.02)
        ax.set_xticks(x, [str(i) for i in layers])
        ax.set_ylabel("agreement")
        ax.set_title(title, fontsize=9, loc="left")
        ax.tick_params(axis="x", labelsize=7)
        kx = ax.twinx()
        kx.plot(x, [max(k, 1e-6) for k in kl], "o", ms=3, color="k")
        if math.isfinite(ceiling):
            kx.axhline(ceiling, color="tab:red", lw=0.8, ls=":")
        kx.set_yscale("log")
        kx.set_ylim(1e-6, max(2.0, max(kl) * 2))
        kx.set_ylabel("KL / token (dots)", fontsize=8)
    rule = f"agreement below {floor}" + (f" or KL above {ceiling}" if math.isfinite(ceiling) else "")
    axes[-1, 0].set_xlabel(f"layer with TCA (all others dense); red: {rule} (dense_at=auto keeps it dense)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)
