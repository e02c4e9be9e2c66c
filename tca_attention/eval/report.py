"""Summaries, markdown tables and PNG plots from per-sample results (one or more run folders)."""
from __future__ import annotations

import json
import logging
import math
import re
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Iterable

from .runner import RESULTS_FILE, ResultLog
from .schema import Result
from .tasks import TASKS

log = logging.getLogger(__name__)
NEEDLE_TASK = "niah_single"
FULL = "full"  # the reference method's label (registry.FULL)
NLL_SCORER = "nll"
LEGEND = (
    "Methods are registry specs (`tca methods`): `full` plain attention; `tca` TCA at the calibrated tau, "
    "`tca:tau=T` re-selected at tau T; `streaming:window=W` StreamingLLM (sinks + window W); `M@match=X` "
    "method M with its density knob set to keep the mean KV fraction X kept at that length. Greedy "
    "decoding, chat-template prompts; see docs/eval.md for the tasks and scorers."
)


def load_results(run_dirs: Iterable[Path]) -> list[Result]:
    """The results of the run folders, in order. A sample that more than one folder holds for the
    same model, method and length (e.g. a group re-run at another batch size, which gets its own
    folder) counts once, from the first folder that has it (pooling both would weigh it twice); a
    warning says how many were dropped."""
    out: list[Result] = []
    seen: dict[tuple, str] = {}
    dropped: dict[tuple[str, str], int] = defaultdict(int)
    for d in run_dirs:
        for r in ResultLog(Path(d) / RESULTS_FILE).load():
            key = (r.model, r.method, r.length, r.task, r.sample_id)
            first = seen.setdefault(key, str(d))
            if first != str(d):
                dropped[(str(d), first)] += 1
                continue
            out.append(r)
    for (d, first), n in dropped.items():
        log.warning("%d results in %s are also in %s (same model, method, length, sample): %s's are used",
                    n, d, first, first)
    return out


def _group(results: Iterable[Result], *keys: str) -> dict[tuple, list[Result]]:
    groups: dict[tuple, list[Result]] = defaultdict(list)
    for r in results:
        groups[tuple(getattr(r, k) for k in keys)].append(r)
    return groups


def _ordered(values: Iterable) -> list:
    seen: list = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


def summarize(results: list[Result]) -> dict:
    """{"models": {model: {"methods": {method: {"lengths": {L: {...}}}}}}} with per-task cells."""
    summary: dict = {"models": {}}
    for (model,), rs in _group(results, "model").items():
        msum: dict = {"methods": {}}
        for (method,), mr in _group(rs, "method").items():
            lens: dict = {}
            for (length,), lr in sorted(_group(mr, "length").items()):
                tasks: dict = {}
                for (task,), tr in _group(lr, "task").items():
                    cell = {"n": len(tr), "kept_fraction": mean(r.kept_fraction for r in tr),
                            "seconds": mean(r.seconds for r in tr)}
                    if tr[0].scorer == NLL_SCORER:
                        nll = mean(r.score for r in tr)
                        cell.update(nll=nll, ppl=math.exp(nll))
                    else:
                        cell.update(score=mean(r.score for r in tr), scorer=tr[0].scorer)
                    tasks[task] = cell
                acc = [c["score"] for c in tasks.values() if "score" in c]
                ppl = [c["ppl"] for c in tasks.values() if "ppl" in c]
                lens[str(length)] = {
                    "accuracy": mean(acc) if acc else None,
                    "ppl": ppl[0] if ppl else None,
                    "kept_fraction": mean(r.kept_fraction for r in lr),
                    "attended_fraction": mean(attended_fraction(r) for r in lr),
                    "kv_bytes": mean(r.kv_bytes for r in lr),
                    "dense_kv_bytes": mean(r.dense_kv_bytes for r in lr),
                    "n": len(lr),
                    "tasks": tasks,
                    **certificate_summary(lr),
                    **dense_layers_summary(lr),
                }
            msum["methods"][method] = {"lengths": lens}
        _common_accuracy(msum)
        _gap_intervals(msum, rs)
        summary["models"][model] = msum
    return summary


GAP_BOOTSTRAP_REPS = 2000
GAP_LEVEL = 0.95


def gap_interval(pairs: dict[str, list[tuple[float, float]]], reps: int = GAP_BOOTSTRAP_REPS,
                 level: float = GAP_LEVEL, seed: int = 0) -> tuple[float, float]:
    """A paired bootstrap interval of the gap to full attention: pairs[task] = (method score,
    full score) per sample, the same prompt for both; the gap is the mean over tasks of the mean
    difference. Samples are resampled within each task (the tasks are fixed), `reps` times with a
    fixed seed (a report is reproducible); -> the (1 - level) / 2 and (1 + level) / 2 quantiles."""
    import numpy as np

    if not pairs or any(not p for p in pairs.values()):
        raise ValueError("every task needs at least one paired sample")
    rng = np.random.default_rng(seed)
    gaps = np.zeros(reps)
    for task in sorted(pairs):
        d = np.array([m - f for m, f in pairs[task]], dtype=float)
        gaps += d[rng.integers(0, len(d), size=(reps, len(d)))].mean(axis=1)
    gaps /= len(pairs)
    lo, hi = np.quantile(gaps, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def ci_text(ci: list[float] | tuple[float, float] | None, scale: float = 100.0) -> str:
    """An interval as the tables print it after its value: ' [lo, hi]' in points (scale: to points), or ''."""
    return "" if ci is None else f" [{scale * ci[0]:+.1f}, {scale * ci[1]:+.1f}]"


ScoreIndex = dict[tuple[str, str], dict[str, dict[str, float]]]  # (method, length) -> task -> sample id -> score


def score_index(results: Iterable[Result]) -> ScoreIndex:
    """Per-sample accuracy scores by (method, length as str), task and sample id (perplexity left out)."""
    index: ScoreIndex = {}
    for r in results:
        if r.scorer != NLL_SCORER:
            index.setdefault((r.method, str(r.length)), {}).setdefault(r.task, {})[r.sample_id] = r.score
    return index


def interval_between(index: ScoreIndex, a: str, b: str, length: str, tasks: Iterable[str]
                     ) -> tuple[float, float] | None:
    """The paired bootstrap interval (gap_interval) of method a's accuracy minus method b's over
    `tasks` at `length`, from the samples both ran; None when a task has none in common."""
    sa, sb = index.get((a, length), {}), index.get((b, length), {})
    pairs = {t: [(sa[t][i], sb[t][i]) for i in sa.get(t, {}) if i in sb.get(t, {})] for t in tasks}
    if not pairs or not all(pairs.values()):
        return None
    return gap_interval(pairs)


def _gap_intervals(msum: dict, results: list[Result]) -> None:
    """`gap_ci` per method and length next to full attention: the paired bootstrap interval of
    its accuracy gap over the headline tasks, from the samples both ran (absent when a task has
    none in common, or for full itself)."""
    index = score_index(results)
    for method, m in msum["methods"].items():
        if method == FULL:
            continue
        for L, cell in m["lengths"].items():
            full = msum["methods"].get(FULL, {}).get("lengths", {}).get(L, {})
            if cell.get("accuracy") is None or full.get("accuracy") is None:
                continue
            ci = interval_between(index, method, FULL, L, cell["accuracy_tasks"])
            if ci is not None:
                cell["gap_ci"] = list(ci)


def certificate_summary(results: list[Result]) -> dict:
    """The quality certificate over results that carry one (methods with a retained mass, e.g.
    TCA): mean and min retained mass of the selection queries, mean and max of the output-error
    bound (engine/certificate.py). Empty when none does (full attention, methods that do not score)."""
    metas = [r.metadata or {} for r in results]
    ret = [float(m["retained"]) for m in metas if m.get("retained") is not None]
    if not ret:
        return {}
    low = [float(m.get("retained_min", m["retained"])) for m in metas if m.get("retained") is not None]
    bound = [float(m["error_bound"]) for m in metas if m.get("error_bound") is not None]
    out = {"retained_mean": mean(ret), "retained_min": min(low)}
    if bound:
        out.update(error_bound_mean=mean(bound), error_bound_max=max(bound))
    return out


def dense_layers_summary(results: list[Result]) -> dict:
    """TCA's dense layers (dense_at; with dense_at=auto, the layer probe's choice) as the rows
    recorded them: {"dense_at": [...]}, or empty when none was dense."""
    seen = {tuple(m["dense_at"]) for m in (r.metadata or {} for r in results) if m.get("dense_at")}
    if not seen:
        return {}
    return {"dense_at": sorted(set().union(*seen))}


def attended_fraction(r: Result) -> float:
    """The share of the work a method sparsifies that it still does: the smaller of its prefill's
    attended fraction and the fraction of the cache its decode steps read (a method that evicts reads
    what it keeps; a prefill-only method reads its whole cache in decode, a decode-only one prefills
    densely). Equals the KV kept fraction for full attention and the eviction methods."""
    meta = r.metadata or {}
    prefill = meta.get("prefill_kept_fraction")
    decode = meta.get("decode_attended_fraction")
    return min(1.0 if prefill is None else float(prefill), r.kept_fraction if decode is None else float(decode))


def _common_accuracy(msum: dict) -> None:
    """Headline accuracy per length over one task set, so methods are compared on the same tasks:
    full attention's accuracy tasks there (else every task any method ran). A cell missing some
    of them (a run cut short, a method run on fewer tasks) gets no headline accuracy and lists
    what it misses (`accuracy_missing`) instead of shrinking everyone's task set; only when no
    cell has them all do the methods fall back to the tasks every one of them ran."""
    lengths = {L for m in msum["methods"].values() for L in m["lengths"]}
    for L in lengths:
        ran = {name: {t for t, c in m["lengths"][L]["tasks"].items() if "score" in c}
               for name, m in msum["methods"].items() if L in m["lengths"]}
        full = ran.get(FULL)
        target = full if full else set().union(*ran.values())
        if not any(tasks >= target for tasks in ran.values()):
            target = set.intersection(*ran.values())
        for name, tasks in ran.items():
            cell = msum["methods"][name]["lengths"][L]
            cell["accuracy_tasks"] = sorted(target)
            missing = target - tasks
            if missing:
                cell["accuracy_missing"] = sorted(missing)
            cell["accuracy"] = (mean(cell["tasks"][t]["score"] for t in target)
                                if target and not missing else None)


def family(method: str) -> str:
    """The method family of a result label: its registry name ('tca:tau=0.7' -> 'tca',
    'streaming@match=tca' -> 'streaming'; labels of earlier runs, 'tca@0.7', too)."""
    return re.match(r"[^:@=/]*", method).group(0)


def _fmt(x: float | None, pct: bool = True) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}" if pct else f"{x:.2f}"


def markdown(summary: dict) -> str:
    """A headline table (accuracy, perplexity, kept fraction per method and length) per model,
    then the per-task tables."""
    lines: list[str] = []
    for model, msum in summary["models"].items():
        methods = msum["methods"]
        lengths = sorted({int(L) for m in methods.values() for L in m["lengths"]})
        lines += [f"## {display_name(model)}", ""]
        full = methods.get("full", {}).get("lengths", {})
        head = (["method"] + [f"acc {L}" for L in lengths] + [f"gap {L}" for L in lengths]
                + [f"kept {L}" for L in lengths] + [f"attended {L}" for L in lengths] + [f"ppl {L}" for L in lengths])
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method, m in methods.items():
            cells = [m["lengths"].get(str(L), {}) for L in lengths]
            gaps = []
            for L, c in zip(lengths, cells):
                ref = full.get(str(L), {}).get("accuracy")
                acc = c.get("accuracy")
                gaps.append("-" if ref is None or acc is None else f"{100 * (acc - ref):+.1f}{ci_text(c.get('gap_ci'))}")
            row = ([method] + [_fmt(c.get("accuracy")) for c in cells] + gaps
                   + [_fmt(c.get("kept_fraction")) for c in cells]
                   + [_fmt(c.get("attended_fraction", c.get("kept_fraction"))) for c in cells])
            row += [_fmt(c.get("ppl"), pct=False) for c in cells]
            lines.append("| " + " | ".join(row) + " |")
        incomplete = [f"{method} at {L} (no {', '.join(c['accuracy_missing'])})" for method, m in methods.items()
                      for L, c in sorted(m["lengths"].items(), key=lambda x: int(x[0])) if c.get("accuracy_missing")]
        lines += ["", "acc: mean score (%) over full attention's accuracy tasks at that length (a method that "
                  "misses one of them has no acc: " + ("; ".join(incomplete) if incomplete else "none here") + "); "
                  "gap: acc minus full attention's acc, in points, with its 95% interval [lo, hi] from a paired "
                  "bootstrap over the samples (the same prompts for every method, resampled within each task); "
                  "kept: mean KV kept fraction (%); attended: mean attended fraction (%), the smaller of the "
                  "prefill's and the decode's share (docs/eval.md); ppl: perplexity of the last tokens of long essays.", ""]
        chosen = [f"{method} at {L}: {'/'.join(map(str, c['dense_at']))}" for method, m in methods.items()
                  if "dense_at=auto" in method for L, c in sorted(m["lengths"].items(), key=lambda x: int(x[0]))
                  if c.get("dense_at")]
        if chosen:  # what the layer probe chose (methods/tca/layer_probe.py)
            lines += ["Dense layers chosen by the layer probe (dense_at=auto): " + "; ".join(chosen) + ".", ""]
        for L in lengths:
            tasks = _ordered(t for m in methods.values() for t in m["lengths"].get(str(L), {}).get("tasks", {}))
            tasks.sort(key=lambda t: TASKS.names().index(t) if t in TASKS.names() else len(TASKS.names()))
            n = max((c["n"] for m in methods.values() for c in m["lengths"].get(str(L), {}).get("tasks", {}).values()), default=0)
            lines += [f"### {display_name(model)}, {L} tokens (n = {n} per task)", ""]
            lines += ["| method | " + " | ".join(tasks) + " | kept |", "|---|" + "---|" * (len(tasks) + 1)]
            for method, m in methods.items():
                cell = m["lengths"].get(str(L))
                if cell is None:
                    continue
                vals = []
                for t in tasks:
                    c = cell["tasks"].get(t)
                    vals.append("-" if c is None else (_fmt(c["ppl"], False) if "ppl" in c else _fmt(c["score"])))
                lines.append(f"| {method} | " + " | ".join(vals) + f" | {_fmt(cell['kept_fraction'])} |")
            lines.append("")
    return "\n".join(lines)


def display_name(model: str) -> str:
    """A model as the report names it: a file path by its stem (/tmp/x/gemma3.gguf -> gemma3)."""
    return Path(model).stem if ("/" in model or model.endswith(".gguf")) else model


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in ".-" else "-" for ch in display_name(text))


def plot_needle_heatmap(results: list[Result], model: str, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in results if r.model == model and r.task == NEEDLE_TASK and "depth" in r.metadata]
    if not rs:
        return None
    methods = _ordered(r.method for r in rs)
    depths = sorted({float(r.metadata["depth"]) for r in rs})
    lengths = sorted({r.length for r in rs})
    fig, axes = plt.subplots(1, len(methods), figsize=(2.2 + 2.0 * len(methods) * max(1, len(lengths)) / 2, 3.2),
                             squeeze=False, sharey=True)
    for ax, method in zip(axes[0], methods):
        grid = [[math.nan] * len(lengths) for _ in depths]
        for di, d in enumerate(depths):
            for li, L in enumerate(lengths):
                vals = [r.score for r in rs if r.method == method and r.length == L and float(r.metadata["depth"]) == d]
                if vals:
                    grid[di][li] = mean(vals)
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for di in range(len(depths)):
            for li in range(len(lengths)):
                if not math.isnan(grid[di][li]):
                    ax.text(li, di, f"{grid[di][li]:.2f}", ha="center", va="center", fontsize=8)
        ax.set_title(method, fontsize=9)
        ax.set_xticks(range(len(lengths)), [f"{L // 1024}K" if L % 1024 == 0 else str(L) for L in lengths])
        ax.set_xlabel("context length")
    axes[0][0].set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    fig.suptitle(f"Needle in a haystack: {display_name(model)}", fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_accuracy_vs_length(summary: dict, model: str, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = summary["models"].get(model, {}).get("methods", {})
    if not methods:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for method, m in methods.items():
        pts = sorted((int(L), c["accuracy"]) for L, c in m["lengths"].items() if c["accuracy"] is not None)
        if pts:
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("mean accuracy (%)")
    ax.set_ylim(-3, 103)
    ax.set_title(f"Accuracy vs context length: {display_name(model)}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_accuracy_vs_kept(summary: dict, model: str, path: Path) -> Path | None:
    """Accuracy vs mean attended fraction (`attended_fraction`), one panel per length, one line per method family
    (its methods sorted by kept fraction: a density sweep), each point labelled by its method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = summary["models"].get(model, {}).get("methods", {})
    lengths = sorted({int(L) for m in methods.values() for L in m["lengths"]})
    if not lengths:
        return None
    families = _ordered(family(m) for m in methods)
    fig, axes = plt.subplots(1, len(lengths), figsize=(0.5 + 4.5 * len(lengths), 3.8), squeeze=False, sharey=True)
    for ax, L in zip(axes[0], lengths):
        for i, fam in enumerate(families):
            pts = sorted((100 * c.get("attended_fraction", c["kept_fraction"]), 100 * c["accuracy"], method) for method, m in methods.items()
                         if family(method) == fam and (c := m["lengths"].get(str(L))) and c["accuracy"] is not None)
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="os^Dvp<>h*"[i % 10], label=fam)
            for x, y, method in pts:
                ax.annotate(method, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=5, alpha=0.7)
        ax.set_title(f"{L} tokens", fontsize=9)
        ax.set_xlabel("mean attended fraction (%): KV kept, or the sparse phase's share")
        ax.set_xlim(0, 105)
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("mean accuracy (%)")
    fig.suptitle(f"Accuracy vs attended fraction: {display_name(model)}", fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def write_report(results: list[Result], out_dir: Path, title: str = "Long-context accuracy",
                 prefix: str = "") -> dict[str, Path]:
    """summary.json, report.md and the PNG plots of `results` into out_dir (names prefixed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(results)
    files: dict[str, Path] = {}
    files["summary"] = out_dir / f"{prefix}summary.json"
    files["summary"].write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    md = [f"# {title}", "", LEGEND, "", markdown(summary)]
    for model in summary["models"]:
        slug = _slug(model)
        for kind, fn in (
            ("needle", lambda p, m=model: plot_needle_heatmap(results, m, p)),
            ("accuracy_vs_length", lambda p, m=model: plot_accuracy_vs_length(summary, m, p)),
            ("accuracy_vs_kept", lambda p, m=model: plot_accuracy_vs_kept(summary, m, p)),
        ):
            p = fn(out_dir / f"{prefix}{kind}_{slug}.png")
            if p is not None:
                files[f"{kind}_{slug}"] = p
                md.append(f"![{kind} {display_name(model)}]({p.name})")
        md.append("")
    files["report"] = out_dir / f"{prefix}report.md"
    files["report"].write_text("\n".join(md) + "\n")
    return files
