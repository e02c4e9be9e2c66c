"""Time to first token of `tca bench decode-graph` runs side by side: per run (one JSON each, a
label from its folder) the median TTFT of each cell as a bar, every repeat as a dot, and the
dense / TCA ratio above. Usage: python scripts/plot_ttft.py OUT.png RUN.json [RUN.json ...]"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, runs = argv[0], argv[1:]
    fig, ax = plt.subplots(figsize=(1.8 + 2.2 * len(runs), 4.2))
    colors = {"dense": "tab:blue", "tca": "tab:orange"}
    for i, path in enumerate(runs):
        data = json.loads(Path(path).read_text())
        row = data["rows"][0] if "rows" in data else data
        cells = [c for c in row if isinstance(row[c], dict) and "ttft_s" in row[c]]
        for j, cell in enumerate(cells):
            x = i + (j - (len(cells) - 1) / 2) * 0.35
            kind = "tca" if cell.startswith("tca") else "dense"
            ax.bar(x, row[cell]["ttft_s"], 0.33, color=colors[kind], label=cell if i == 0 else None)
            reps = row[cell].get("ttft_s_all", [])
            ax.plot([x] * len(reps), reps, "k.", ms=4)
        ratio = [v for k, v in row.items() if k.startswith("ttft ")]
        if ratio:
            ax.text(i, max(row[c]["ttft_s"] for c in cells) * 1.03, f"{ratio[0]:.2f}x", ha="center", fontsize=10)
    ax.set_xticks(range(len(runs)), [f"{Path(p).parent.name}\n{Path(p).stem}" for p in runs], fontsize=8)
    ax.set_ylabel("time to first token (s, median of repeats; dots: each)")
    meta = json.loads(Path(runs[-1]).read_text()).get("meta", {})
    ax.set_title(f"TTFT at {data['rows'][0]['tokens'] // 1024}K tokens, {data['rows'][0]['model']}, "
                 f"{meta.get('device', '')}", fontsize=9)
    ax.legend(fontsize=8, loc="lower center", framealpha=0.9)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.08)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
