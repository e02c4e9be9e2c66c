"""Per-layer probe results as bars (tca_attention/layer_probe_plot.py).

  python scripts/plot_layer_probe.py OUT.png LABEL=FILE.json [LABEL=FILE.json ...] [--floor 0.9 --ceiling 0.05]

FILE: a layer-probe state (`tca probe-layers --out`, the dense_at=auto cache) or the JSON of
`scripts/probe_tau.py --per-layer`.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from tca_attention.layer_probe_plot import plot_layer_probes, rows_of

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("probes", nargs="+", metavar="LABEL=FILE")
    ap.add_argument("--floor", type=float, default=0.9, help="the agreement floor (probe_min)")
    ap.add_argument("--ceiling", type=float, default=0.05, help="the KL ceiling (probe_max_kl; inf: none)")
    args = ap.parse_args(argv)
    panels = []
    for item in args.probes:
        label, _, path = item.partition("=")
        panels.append((label, rows_of(path)))
    print(plot_layer_probes(panels, args.out, args.floor, args.ceiling))
    return 0


if __name__ == "__main__":
    sys.exit(main())
