"""GPU benchmarks, shipped with the package so `tca bench NAME` runs from any install.

Each module has `build_parser()` and `main(argv) -> int` and also runs as
`python -m tca_attention.benchmarks.NAME`. Importing this package imports nothing heavy; the
modules themselves import torch. Results go to JSON (+ PNG) with device, versions, shapes and
the command recorded (docs/kernels.md, docs/results/).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any


def require_cuda(what: str) -> int | None:
    """None when CUDA is usable; else print a one-line error naming `what` and return exit code 2."""
    import torch

    if torch.cuda.is_available():
        return None
    print(f"error: {what} needs a CUDA GPU, and torch.cuda.is_available() is False here "
          f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})", file=sys.stderr)
    return 2


def inductor_env() -> dict[str, str]:
    """The TORCHINDUCTOR_* settings of this process (they change compiled timings): recorded in results."""
    import os

    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("TORCHINDUCTOR_")}


def parse_method(ap: argparse.ArgumentParser, spec: str) -> tuple[str, dict[str, Any]]:
    """A --method registry spec as (name, params); a bad one is a usage error (exit status 2),
    found before any GPU work."""
    from .. import registry

    try:
        return registry.parse_spec(spec)
    except (KeyError, ValueError) as e:
        ap.error(f"--method {spec}: {e.args[0]}")
