"""The leaderboard's PNG plots: accuracy vs attended fraction per task family (a Pareto plot per
model) and prefill time vs attended fraction per length."""
from __future__ import annotations

from pathlib import Path

from ... import registry
from ..report import display_name
from .matching import pareto
from .report import ALL, points_of

MARKERS = "os^Dvp<>h*"


def plot_pareto(board: dict, model: str, path: Path) -> Path | None:
    """Accuracy vs attended fraction per task family (rows: all tasks, then each family) and length
    (columns); one line per method through its sweep points, the Pareto front dashed, full
    attention a horizontal line, the targets vertical ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mb = board["models"].get(model)
    if not mb or not mb["lengths"]:
        return None
    lengths = list(mb["lengths"])
    tfs = [ALL, *sorted({tf for c in mb["lengths"].values() for r in c["points"] for tf in r["task_families"]})]
    families = list(dict.fromkeys(r["family"] for c in mb["lengths"].values() for r in c["points"]
                                  if r["family"] != registry.FULL))
    fig, axes = plt.subplots(len(tfs), len(lengths), figsize=(0.6 + 4.2 * len(lengths), 0.4 + 3.0 * len(tfs)),
                             squeeze=False, sharex=True, sharey=True)
    for j, L in enumerate(lengths):
        c = mb["lengths"][L]
        for i, tf in enumerate(tfs):
            ax = axes[i][j]
            for k, fam in enumerate(families):
                pts = sorted((p for p in points_of(c["points"], tf) if p.family == fam), key=lambda p: p.fraction)
                if pts:
                    ax.plot([100 * p.fraction for p in pts], [100 * p.value for p in pts],
                            marker=MARKERS[k % len(MARKERS)], label=fam, lw=1.2, ms=5)
            front = pareto(points_of(c["points"], tf))
            if front:  # a step through the front, flat to the right edge
                ax.step([100 * p.fraction for p in front] + [102], [100 * p.value for p in front] + [100 * front[-1].value],
                        where="post",
                        color="black", lw=0.8, ls="--", alpha=0.6, label="Pareto front")
            full = c["full"]
            if full is not None:
                val = full["accuracy"] if tf == ALL else full["task_families"].get(tf)
                if val is not None:
                    ax.axhline(100 * val, color="grey", lw=1, ls=":", label="full attention")
            for t in board["targets"]:
                ax.axvline(100 * t, color="tab:red", lw=0.6, alpha=0.3)
            ax.set_xlim(0, 102)
            ax.set_ylim(-3, 103)
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(f"{L} tokens", fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{'all tasks' if tf == ALL else tf}\naccuracy (%)", fontsize=8)
            if i == len(tfs) - 1:
                ax.set_xlabel("attended fraction (%)", fontsize=8)
    axes[0][-1].legend(fontsize=6, loc="lower right")
    fig.suptitle(f"Accuracy vs attended fraction: {display_name(model)}\n(rows: task families; red: matched targets)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_timings(t: dict, path: Path) -> Path | None:
    """A timing section's figure (prefill ms, or decode tokens/s) vs attended fraction, one panel per
    length, one line per method; dense dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rate = t["key"].endswith("_per_s")
    scale, unit = (1.0, "tokens/s") if rate else (1000.0, "ms")
    lengths = [L for L, c in t["lengths"].items() if c["points"] or c.get("dense", c.get("dense_s"))]
    if not lengths:
        return None
    families = list(dict.fromkeys(p["family"] for c in t["lengths"].values() for p in c["points"]))
    fig, axes = plt.subplots(1, len(lengths), figsize=(0.6 + 4.4 * len(lengths), 3.8), squeeze=False)
    for ax, L in zip(axes[0], lengths):
        c = t["lengths"][L]
        for k, fam in enumerate(families):
            pts = sorted((p for p in c["points"] if p["family"] == fam), key=lambda p: p["attended_fraction"])
            if pts:
                ax.plot([100 * p["attended_fraction"] for p in pts], [scale * p.get("value", p.get("seconds")) for p in pts],
                        marker=MARKERS[k % len(MARKERS)], label=fam)
        dense = c.get("dense", c.get("dense_s"))
        if dense:
            ax.axhline(scale * dense, color="grey", ls="--", lw=1, label="dense")
        for target in (m["target"] for m in c["matched"]):
            ax.axvline(100 * target, color="tab:red", lw=0.6, alpha=0.3)
        ax.set_title(f"{int(L) // 1024}K tokens", fontsize=9)
        ax.set_xlabel(f"{t.get('matched_on', 'attended fraction').replace('_', ' ')} (%)")
        ax.set_ylabel(f"{t.get('what', 'prefill time')} ({unit})")
        ax.set_xlim(0, 102)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    meta = t["meta"]
    fig.suptitle(f"{t.get('what', 'prefill time').capitalize()} ({t['key']}) vs attended fraction, "
                 f"{meta.get('device', '?')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
