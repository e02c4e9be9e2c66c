"""Per-layer probe results as bars: agreement with dense attention with TCA in one layer at a time.

  python scripts/plot_layer_probe.py OUT.png LABEL=FILE.json [LABEL=FILE.json ...] [--floor 0.9]

FILE: the JSON of `scripts/probe_tau.py --per-layer` ({"meta", "rows"} or a bare list of rows),
or a layer-probe state of methods/tca/layer_probe.py ({"format": "tca-attention/layer-probe"}).
"""
from __future__ import annotations

import argparse
import json
import sys


def rows_of(path: str) -> list[tuple[int, float]]:
    data = json.load(open(path))
    if isinstance(data, dict) and data.get("format") == "tca-attention/layer-probe":
        return [(i, a) for i, a in enumerate(data["agreement"]) if a is not None]
    rows = data["rows"] if isinstance(data, dict) else data
    return [(int(r["layer"]), float(r["agreement"])) for r in rows]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("probes", nargs="+", metavar="LABEL=FILE")
    ap.add_argument("--floor", type=float, default=0.9)
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(args.probes), 1, figsize=(9, 1.9 * len(args.probes)), squeeze=False)
    for ax, item in zip(axes[:, 0], args.probes):
        label, _, path = item.partition("=")
        rows = rows_of(path)
        layers, agree = zip(*rows)
        colors = ["tab:red" if a < args.floor else "tab:blue" for a in agree]
        ax.bar([str(i) for i in layers], agree, color=colors)
        ax.axhline(args.floor, color="k", lw=0.8, ls="--")
        ax.set_ylim(0.5, 1.02)
        ax.set_ylabel("agreement")
        ax.set_title(label, fontsize=9, loc="left")
        ax.tick_params(axis="x", labelsize=7)
    axes[-1, 0].set_xlabel(f"layer with TCA (all others dense); red: below the floor {args.floor} (dense_at=auto keeps it dense)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
