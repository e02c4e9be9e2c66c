"""The lines of a leaderboard groups file that still have samples to run in their run folder.

  python scripts/pending_groups.py GROUPS_FILE [tca eval options: --model, --lengths, --samples, --batch-size,
                                                --results-dir, ...]

One process for every group (no model is loaded): `scripts/gpu_leaderboard.sh` used to start
`tca eval` per group only to find it done (about 7 s each on the GPU machine, 60 s of a 500 s
call on 2026-12-07). Prints each pending group line (comments and blank lines dropped) and, on
stderr, how many samples each lacks.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from tca_attention.eval.cli import add_eval_parser, configs_of
    from tca_attention.eval.methods import split_methods
    from tca_attention.eval.runner import pending

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    groups_file, rest = argv[0], argv[1:]
    parser = argparse.ArgumentParser(prog="pending_groups")
    add_eval_parser(parser.add_subparsers())
    args = parser.parse_args(["eval", *rest])
    with open(groups_file) as f:
        groups = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    for group in groups:
        missing = sum(pending(config, args.results_dir / config.run_name())
                      for config in configs_of(args, split_methods(group)))
        print(f"{missing:6d} samples to run: {group}", file=sys.stderr)
        if missing:
            print(group)
    return 0


if __name__ == "__main__":
    sys.exit(main())
