"""Gzip the results of `tca eval` run folders for committing (results.jsonl -> results.jsonl.gz).

Every reader (resume, `tca eval --report-only`, `tca leaderboard --report-only`) reads the archive
first and the plain file after it; a resumed run appends to the plain file, so archive again
before committing. Usage: python scripts/archive_results.py RUN_DIR [RUN_DIR ...]
"""
from __future__ import annotations

import sys
from pathlib import Path

from tca_attention.eval.runner import RESULTS_FILE, ResultLog


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    for d in argv:
        log = ResultLog(Path(d) / RESULTS_FILE)
        n = len(log.load())
        path = log.archive()
        print(f"{path}: {n} results, {path.stat().st_size / 2**20:.2f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
