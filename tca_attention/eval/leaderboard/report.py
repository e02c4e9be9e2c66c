"""The leaderboard's files: leaderboard.json, leaderboard.md and PNG plots, from the per-sample
results of `tca eval` run folders (and, optionally, a `tca bench methods` timing JSON).

Accuracy is the eval report's headline accuracy (the mean over the accuracy tasks every method
ran at that length, `report.summarize`); the fraction is the attended fraction (docs/eval.md).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from statistics import mean
from typing import Any, Iterable

from ... import registry
from ..report import ScoreIndex, _slug, ci_text, display_name, family, interval_between, score_index, summarize
from .variants import variants
from ..schema import Result
from ..tasks import TASKS
from .matching import DEFAULT_FOCUS, DEFAULT_TARGETS, DEFAULT_TOLERANCE, Match, Point, match_at, pareto

ALL = "all"  # the accuracy over every task (the headline), beside the per-task-family ones


def task_family(task: str) -> str:
    return TASKS.get(task).family if task in TASKS else task


def _cell_points(methods: dict, length: str) -> list[dict[str, Any]]:
    """Every method's point at one length: fractions, headline accuracy, accuracy per task family."""
    out = []
    variant = variants(methods)
    for method, m in methods.items():
        c = m["lengths"].get(length)
        if c is None or c.get("accuracy") is None:
            continue
        fams: dict[str, list[float]] = {}
        for t in c["accuracy_tasks"]:
            fams.setdefault(task_family(t), []).append(c["tasks"][t]["score"])
        out.append({"method": method, "family": variant[method],
                    "attended_fraction": c.get("attended_fraction", c["kept_fraction"]),
                    "kept_fraction": c["kept_fraction"], "accuracy": c["accuracy"], "n": c["n"],
                    "tasks": c["accuracy_tasks"], "task_families": {f: mean(v) for f, v in fams.items()}})
    return out


def points_of(rows: list[dict], task_fam: str = ALL) -> list[Point]:
    """Contenders' points (full attention is the reference, not a contender)."""
    return [Point(r["method"], r["family"], r["attended_fraction"],
                  r["accuracy"] if task_fam == ALL else r["task_families"][task_fam])
            for r in rows if r["family"] != registry.FULL and (task_fam == ALL or task_fam in r["task_families"])]


def _between(index: ScoreIndex, a: Point | None, b: Point | None, length: str, tasks: list[str]) -> list[float] | None:
    """The paired bootstrap 95% interval of point a's accuracy minus point b's (the same prompts)."""
    if a is None or b is None or not tasks:
        return None
    ci = interval_between(index, a.method, b.method, length, tasks)
    return None if ci is None else list(ci)


def _match_json(m: Match, focus: str, index: ScoreIndex, length: str, tasks: list[str]) -> dict[str, Any]:
    margin_ci = (_between(index, m.chosen[m.best[0]], m.chosen[m.runner_up[0]], length, tasks)
                 if len(m.best) == 1 and m.runner_up else None)
    return {
        "target": m.target, "best": list(m.best), "margin": m.margin, "runner_up": list(m.runner_up),
        "margin_ci": margin_ci,
        "chosen": {f: (None if p is None else {"method": p.method, "attended_fraction": p.fraction, "accuracy": p.value})
                   for f, p in m.chosen.items()},
        "no_point_near": list(m.missing),
        f"{focus}_behind": [{"family": f, "points": 100 * gap,
                             "points_ci": _pct_pair(_between(index, m.chosen[f], m.chosen[focus], length, tasks))}
                            for f, gap in m.behind(focus)],
    }


DEFAULT_WITHIN = (0.01, 0.02)  # accuracy bounds below full attention (fraction units): 1 and 2 points


def least_kv_within(rows: list[dict], index: ScoreIndex, length: str, bounds: Iterable[float]) -> list[dict[str, Any]]:
    """For each bound: per method family, the sweep point that holds the least KV (then does the least
    attended work) among those whose accuracy is at most `bound` below full attention's, with its gap and
    the gap's paired 95% interval; None for a family with no such point. [] without full attention."""
    full = next((r for r in rows if r["family"] == registry.FULL), None)
    if full is None:
        return []
    families = list(dict.fromkeys(r["family"] for r in rows if r["family"] != registry.FULL))
    out = []
    for bound in bounds:
        chosen: dict[str, dict[str, Any] | None] = {}
        for fam in families:
            ok = [r for r in rows if r["family"] == fam and r["accuracy"] >= full["accuracy"] - bound - 1e-12]
            r = min(ok, key=lambda r: (r["kept_fraction"], r["attended_fraction"], -r["accuracy"]), default=None)
            ci = None if r is None else interval_between(index, r["method"], full["method"], length, full["tasks"])
            chosen[fam] = None if r is None else {
                "method": r["method"], "kept_fraction": r["kept_fraction"], "attended_fraction": r["attended_fraction"],
                "accuracy": r["accuracy"], "gap": r["accuracy"] - full["accuracy"],
                "gap_ci": None if ci is None else list(ci)}
        out.append({"bound": bound, "families": chosen})
    return out


def build(results: list[Result], targets: Iterable[float] = DEFAULT_TARGETS, tolerance: float = DEFAULT_TOLERANCE,
          focus: str = DEFAULT_FOCUS, timings: list[dict[str, Any]] | dict[str, Any] | None = None, run: dict[str, Any] | None = None,
          within: Iterable[float] = DEFAULT_WITHIN) -> dict:
    """The leaderboard as plain data (what leaderboard.json holds)."""
    targets, within = list(targets), list(within)
    summary = summarize(results)
    index = score_index(results)
    board: dict[str, Any] = {
        "targets": targets, "tolerance": tolerance, "focus": focus, "within": within,
        "fraction": "attended fraction: the share of the work a method sparsifies that it still does (docs/eval.md)",
        "accuracy": "mean score over full attention's accuracy tasks at that length (a method missing one has none)",
        "run": run or {}, "models": {}, "findings": [], "timings": timings,
    }
    for model, msum in summary["models"].items():
        methods = msum["methods"]
        families = [f for f in dict.fromkeys(variants(methods).values()) if f != registry.FULL]
        lengths = sorted({int(L) for m in methods.values() for L in m["lengths"]})
        mboard: dict[str, Any] = {"lengths": {}, "findings": []}
        for L in lengths:
            rows = _cell_points(methods, str(L))
            full = next((r for r in rows if r["family"] == registry.FULL), None)
            matches = [match_at(points_of(rows), t, tolerance, families) for t in targets]
            task_fams = sorted({f for r in rows for f in r["task_families"]})
            mboard["lengths"][str(L)] = {
                "full": None if full is None else {"accuracy": full["accuracy"], "n": full["n"],
                                                   "task_families": full["task_families"]},
                "points": rows,
                "pareto": {tf: [p.method for p in pareto(points_of(rows, tf))] for tf in [ALL, *task_fams]},
                "matched": [_match_json(m, focus, index, str(L), _headline_tasks(full)) for m in matches],
                "least_kv_within": least_kv_within(rows, index, str(L), within),
            }
            mboard["findings"] += _findings(display_name(model), L, mboard["lengths"][str(L)]["matched"], matches,
                                            focus, tolerance)
        board["findings"] += mboard["findings"]
        board["models"][model] = mboard
    return board


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _pct_pair(ci: list[float] | None) -> list[float] | None:
    return None if ci is None else [100 * ci[0], 100 * ci[1]]


def _headline_tasks(full: dict | None) -> list[str]:
    return list(full["tasks"]) if full else []


def _findings(model: str, length: int, matched: list[dict[str, Any]], matches: list[Match], focus: str,
              tolerance: float) -> list[str]:
    """Where `focus` loses to a peer at a matched fraction (with the loss's 95% interval), or has
    no point to compare."""
    out = []
    for mj, m in zip(matched, matches):
        cis = {b["family"]: b["points_ci"] for b in mj.get(f"{focus}_behind", [])}
        where = f"{model}, {length} tokens, {100 * m.target:g}% kept"
        if focus not in m.chosen:
            continue
        p = m.chosen[focus]
        if p is None:
            out.append(f"{where}: {focus} has no sweep point within ±{100 * tolerance:g} points of the target")
            continue
        for peer, gap in m.behind(focus):
            q = m.chosen[peer]
            out.append(f"{where}: {focus} loses to {peer} by {100 * gap:.1f} points{ci_text(cis.get(peer), 1.0)} "
                       f"({p.method} {_pct(p.value)} at {_pct(p.fraction)}% vs {q.method} {_pct(q.value)} "
                       f"at {_pct(q.fraction)}%)")
    return out


def _fmt_choice(p: dict | None) -> str:
    if p is None:
        return "no point near"
    return f"{_pct(p['accuracy'])} ({p['method']}, {_pct(p['attended_fraction'])}%)"


def markdown(board: dict, title: str = "Leaderboard", note: str | None = None,
             images: dict[str, str] | None = None) -> str:
    images = images or {}
    tol = 100 * board["tolerance"]
    lines = [f"# {title}", ""]
    if note:
        lines += [f"> {note}", ""]
    lines += [
        f"Accuracy (%) of each method at matched kept fractions: for each target, each method's sweep point "
        f"whose attended fraction is nearest the target, if one lies within ±{tol:g} points (ties: the smaller "
        "fraction); a method is a registry name and its sweep points are its result labels. The attended "
        "fraction is the share of the work a method sparsifies that it still does (KV kept for the evicting "
        "methods, the prefill share for a prefill-only one, the decode share for a decode-only one; "
        "docs/eval.md). Accuracy is the mean score over full attention's accuracy tasks at that length (a "
        "sweep point missing one of them is left out: a run cut short). "
        "\"best\" is the method with the highest accuracy there and \"margin\" its lead in points over the next one, "
        "with its 95% interval [lo, hi] from a paired bootstrap over the samples (the same prompts for every method, "
        "resampled within each task; docs/eval.md): a margin whose interval holds 0 is not a measured lead.",
        "",
    ]
    run = board.get("run") or {}
    if run:
        lines += ["Run: " + "; ".join(f"{k} `{', '.join(map(str, v)) if isinstance(v, list) else v}`"
                                      for k, v in run.items() if v not in (None, "", [])), ""]
    for model, mb in board["models"].items():
        name = display_name(model)
        lines += [f"## {name}", ""]
        families: list[str] = list(dict.fromkeys(f for c in mb["lengths"].values() for m in c["matched"] for f in m["chosen"]))
        head = ["length", "kept", "full", "best", "margin", *families]
        lines += ["### Accuracy at matched kept fraction", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for L, c in mb["lengths"].items():
            full = _pct(c["full"]["accuracy"]) if c["full"] else "-"
            for m in c["matched"]:
                best = " = ".join(m["best"]) + (" (tie)" if len(m["best"]) > 1 else "") if m["best"] else "none"
                margin = ("-" if not m["best"] else "only one near" if len(m["best"]) == 1 and m["margin"] is None
                          else "-" if m["margin"] is None
                          else f"+{100 * m['margin']:.1f}{ci_text(m.get('margin_ci'))} over {', '.join(m['runner_up'])}")
                cells = [_fmt_choice(m["chosen"].get(f)) if f in m["chosen"] else "-" for f in families]
                lines.append(f"| {L} | {100 * m['target']:g}% | {full} | {best} | {margin} | " + " | ".join(cells) + " |")
        lines += ["", f"Cells: accuracy (the sweep point, its attended fraction %); \"no point near\": no sweep point "
                  f"within ±{tol:g} points of the target.", ""]
        lines += _within_markdown(mb)
        focus = board["focus"]
        lines += [f"### Where {focus} loses", ""]
        if mb["findings"]:
            lines += [f"- {f}" for f in mb["findings"]]
        elif focus in families:
            lines.append(f"- nowhere: {focus} is best or tied at every matched fraction (and has a point at each).")
        else:
            lines.append(f"- {focus} was not among the methods.")
        lines += ["", "### Every sweep point", ""]
        tfs = sorted({tf for c in mb["lengths"].values() for r in c["points"] for tf in r["task_families"]})
        head = ["length", "method", "attended", "KV kept", "acc", *tfs, "pareto"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for L, c in mb["lengths"].items():
            front = set(c["pareto"][ALL])
            for r in sorted(c["points"], key=lambda r: (r["family"], r["attended_fraction"])):
                lines.append(f"| {L} | {r['method']} | {_pct(r['attended_fraction'])} | {_pct(r['kept_fraction'])} | "
                             f"{_pct(r['accuracy'])} | " + " | ".join(_pct(r["task_families"].get(t)) for t in tfs)
                             + f" | {'yes' if r['method'] in front else ''} |")
        lines += ["", "Percentages. pareto: no other method's point has a smaller or equal attended fraction and a "
                  "higher or equal accuracy (all tasks); full attention is the reference, not a contender.", ""]
        if f"pareto_{model}" in images:
            lines += [f"![accuracy vs attended fraction, {name}]({images[f'pareto_{model}']})", ""]
    for i, t in enumerate(_timing_list(board.get("timings")) or [None]):
        lines += _timing_markdown(t, board["tolerance"], images.get(f"timings{i}"))
    return "\n".join(lines) + "\n"


def _base(method: str) -> str:
    """A leaderboard method's registry name: 'tca[last_q=16]' and 'tca+zerotuning' are variants of 'tca'."""
    return re.match(r"[^\[+:@=]*", method).group(0)


def least_kv_lines(board: dict) -> list[str]:
    """One line per model, length and bound: the least KV any variant of the focus method keeps
    within that bound of full attention (what `tca leaderboard` prints after the report path)."""
    focus, out = board["focus"], []
    for model, mb in board["models"].items():
        for L, c in mb["lengths"].items():
            for w in c.get("least_kv_within", []):
                mine = [p for f, p in w["families"].items() if p is not None and _base(f) == focus]
                best = min(mine, key=lambda p: (p["kept_fraction"], p["attended_fraction"]), default=None)
                pts = 100 * w["bound"]
                where = f"{display_name(model)}, {L} tokens, within {pts:g} point{'' if pts == 1 else 's'} of full"
                out.append(f"{where}: least KV of a {focus} run {_pct(best['kept_fraction'])}% ({best['method']}, "
                           f"{100 * best['gap']:+.1f}{ci_text(best['gap_ci'])})" if best else
                           f"{where}: no {focus} run")
    return out


def _within_markdown(mb: dict) -> list[str]:
    """The least KV each method keeps within each bound of full attention's accuracy (a model's section)."""
    cells = {L: c["least_kv_within"] for L, c in mb["lengths"].items() if c.get("least_kv_within")}
    if not cells:
        return []
    bounds = [w["bound"] for w in next(iter(cells.values()))]
    head = ["length", "method", *[f"within {100 * b:g} point{'s' if b != 0.01 else ''}" for b in bounds]]
    lines = ["### Least KV within a few points of full attention", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for L, within in cells.items():
        for fam in within[0]["families"]:
            row = []
            for w in within:
                p = w["families"][fam]
                row.append("none" if p is None else
                           f"{_pct(p['kept_fraction'])}% KV, {_pct(p['attended_fraction'])}% attended "
                           f"({p['method']}, {100 * p['gap']:+.1f}{ci_text(p['gap_ci'])})")
            lines.append(f"| {L} | {fam} | " + " | ".join(row) + " |")
    lines += ["", "Each method's sweep point holding the least KV (then doing the least attended work) whose "
              "accuracy is at most that many points below full attention's at that length, with its gap and the "
              "gap's paired 95% interval; \"none\": no sweep point that close. A bound met by a point whose interval "
              "reaches below it is met on these samples, not with confidence.", ""]
    return lines


def _timing_markdown(t: dict | None, tolerance: float, image: str | None) -> list[str]:
    """One timing section (a `summarize_timings` result: prefill time or decode speed)."""
    from .timings import figure

    what = (t or {}).get("what", "prefill time")
    lines = [f"## {what[0].upper() + what[1:]} at matched attended fraction", ""]
    if not t:
        return lines + ["No timings given (`--timings FILE`, the JSON of `tca bench methods` on a GPU).", ""]
    meta, key = t["meta"], t["key"]
    shape = meta.get("model", {})
    figure_text = ("the prefill forward, the method's selection included" if key == "ttft_s" else
                   "decode steps per second, batch 1; `decode` of each row: CUDA-graph replay or eager"
                   if key == "decode_tokens_per_s" else key)
    lines += [f"From `{t.get('source') or 'tca bench methods'}`: {key} ({figure_text}) on {meta.get('device', '?')}, "
              f"{shape.get('shape', '?')}-shaped model ({shape.get('num_hidden_layers', '?')} layers, "
              f"{shape.get('weights', '?')}), {meta.get('dtype', '?')}, batch {meta.get('batch', '?')}. Each method's "
              f"row nearest each target, matched on its {t.get('matched_on', 'attended fraction')} "
              f"(±{100 * tolerance:g} points), with its speed-up over dense attention in the same run (the better of "
              f"transformers' SDPA, `full`, and the engine keeping every token, `full-budget`, where listed).", ""]
    if meta.get("command"):
        lines += [f"Command: `{meta['command']}`", ""]
    best = "best" if t.get("higher_is_better") else "fastest"
    for L, c in t["lengths"].items():
        dense_v = c.get("dense", c.get("dense_s"))
        dense = ("error: " + c["dense_error"] if c.get("dense_error") else "not measured" if dense_v is None
                 else f"{figure(key, dense_v)}, {c.get('dense_method', registry.FULL)}")
        families = list(dict.fromkeys(f for m in c["matched"] for f in m["chosen"]))
        lines += [f"### {int(L) // 1024}K tokens (dense: {dense})", "",
                  f"| attended | {best} | " + " | ".join(families) + " |", "|---|---|" + "---|" * len(families)]
        for m in c["matched"]:
            cells = []
            for f in families:
                p = m["chosen"].get(f)
                failed = any(k.partition(":")[0] == f for k in c["errors"])
                value = None if p is None else p.get("value", p.get("seconds"))
                cells.append(("error (below)" if failed else "-") if p is None else
                             f"{figure(key, value)}, {p['speedup']:.2f}x ({p['method']}, "
                             f"{_pct(p['attended_fraction'])}%)" if p["speedup"] else figure(key, value))
            lines.append(f"| {100 * m['target']:g}% | {', '.join(m['fastest']) or '-'} | " + " | ".join(cells) + " |")
        if c["errors"]:
            lines += ["", "Errors: " + "; ".join(f"{k}: {v}" for k, v in c["errors"].items())]
        lines.append("")
    lines += ["-: no row within the tolerance of that target.", ""]
    if t.get("findings"):
        lines += [f"Where {t['focus']} is behind a peer at a matched fraction:", ""]
        lines += [f"- {f}" for f in t["findings"]] + [""]
    if image:
        lines += [f"![{what} vs attended fraction]({image})", ""]
    return lines


def _timing_list(timings: Any) -> list[dict]:
    """The board's timing sections: a list (one per key), or one dict (boards written before)."""
    if not timings:
        return []
    return [timings] if isinstance(timings, dict) else list(timings)


def write(board: dict, out_dir: Path, title: str = "Leaderboard", note: str | None = None) -> dict[str, Path]:
    """leaderboard.json, leaderboard.md and the PNGs into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    from .plots import plot_pareto, plot_timings

    files: dict[str, Path] = {}
    images: dict[str, str] = {}
    for model in board["models"]:
        p = plot_pareto(board, model, out_dir / f"leaderboard_pareto_{_slug(model)}.png")
        if p is not None:
            files[f"pareto_{model}"] = p
            images[f"pareto_{model}"] = p.name
    for i, t in enumerate(_timing_list(board.get("timings"))):
        name = "prefill_time" if t["key"] == "ttft_s" else "decode_speed" if t["key"] == "decode_tokens_per_s" else t["key"]
        p = plot_timings(t, out_dir / f"leaderboard_{name}.png")
        if p is not None:
            files[f"timings{i}"] = p
            images[f"timings{i}"] = p.name
    files["json"] = out_dir / "leaderboard.json"
    files["json"].write_text(json.dumps(board, indent=1, sort_keys=False) + "\n")
    files["md"] = out_dir / "leaderboard.md"
    files["md"].write_text(markdown(board, title, note, images))
    return files
