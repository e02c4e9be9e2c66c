"""Merge `tca eval` / `tca leaderboard` run folders that came back from the device into committed ones.

A device queue seeded from the committed folders (gpu_leaderboard.sh SEED_FROM) holds the committed
rows in `results.jsonl.gz` and its new rows in `results.jsonl`; a fresh queue holds only new rows.
Copying either file over the committed folder loses rows. This adds every result the committed
folder lacks (`Result.key`, the runner's resume key), takes the device's config.json when it extends
the committed one (same identity, the committed invocations first), and archives the folder
(results.jsonl.gz). Re-importing the same tarball changes nothing.

Usage: python scripts/import_device_runs.py SOURCE DEST_RUNS_DIR [--only FOLDER ...] [--new]
  SOURCE: a leaderboard_runs.tar.gz or a folder holding run folders; DEST_RUNS_DIR: e.g.
  docs/results/leaderboard_qwen/runs. --new also creates folders the destination lacks.
"""
from __future__ import annotations

import argparse
import json
import sys
import tarfile
import tempfile
from pathlib import Path

from tca_attention.eval.runner import RESULTS_FILE, ResultLog

CONFIG_FILE = "config.json"


def _run_folders(root: Path) -> dict[str, Path]:
    found = {}
    for p in root.rglob(RESULTS_FILE + "*"):
        if p.name in (RESULTS_FILE, RESULTS_FILE + ".gz"):
            found.setdefault(p.parent.name, p.parent)
    return found


def _merged_config(src: Path, dst: Path) -> tuple[str | None, str]:
    """-> (the config text to write, or None to keep dst's; what changed). Refuses another identity."""
    if not src.exists():
        return None, "no device config"
    new = json.loads(src.read_text())
    if not dst.exists():
        return src.read_text(), "config copied"
    old = json.loads(dst.read_text())
    if new.get("identity") != old.get("identity"):
        raise SystemExit(f"{dst}: the device's run has another identity; not merging")
    oi, ni = old.get("invocations", []), new.get("invocations", [])
    if ni[: len(oi)] != oi:
        extra = [x for x in ni if x not in oi]
        if not extra:
            return None, "config unchanged"
        return json.dumps({**old, "invocations": oi + extra}, indent=2) + "\n", \
            f"config: {len(extra)} invocations added (histories differed)"
    if len(ni) > len(oi):
        return src.read_text(), f"config: {len(ni) - len(oi)} invocations added"
    return None, "config unchanged"


def import_runs(source: Path, dest: Path, only: list[str] | None = None, create: bool = False) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        if source.is_file():
            with tarfile.open(source) as tf:
                tf.extractall(tmp, filter="data")
            root = Path(tmp)
        else:
            root = source
        folders = _run_folders(root)
        if only:
            missing = sorted(set(only) - set(folders))
            if missing:
                raise SystemExit(f"not in {source}: {missing}")
            folders = {k: v for k, v in folders.items() if k in only}
        added_total = 0
        for name, src in sorted(folders.items()):
            dst = dest / name
            if not dst.exists() and not create:
                print(f"skip {name} (not in {dest}; --new creates it)")
                continue
            cfg_text, cfg = _merged_config(src / CONFIG_FILE, dst / CONFIG_FILE)  # refuses before writing
            dst.mkdir(parents=True, exist_ok=True)
            have = {r.key for r in ResultLog(dst / RESULTS_FILE).load()}
            new = [r for r in ResultLog(src / RESULTS_FILE).load() if r.key not in have]
            log = ResultLog(dst / RESULTS_FILE)
            for r in new:
                log.append(r)
                have.add(r.key)
            log.archive()
            if cfg_text is not None:
                (dst / CONFIG_FILE).write_text(cfg_text)
            print(f"{name}: {len(new)} results added, {len(have)} in all; {cfg}")
            added_total += len(new)
        return added_total


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("source", type=Path)
    ap.add_argument("dest", type=Path)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--new", action="store_true")
    a = ap.parse_args(argv)
    if not a.dest.is_dir():
        ap.error(f"{a.dest} is not a folder")
    import_runs(a.source, a.dest, a.only, a.new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
