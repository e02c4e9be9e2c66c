"""Profile target for the TCA decode kernels (run under Nsight Compute on the GPU machine).

ncu --kernel-name regex:_decode --launch-skip 4 --launch-count 4 --section SpeedOfLight \
    --section Occupancy --section LaunchStats python3 -m tca_attention.benchmarks.profile_decode
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from ..clihelp import HelpFormatter
from . import require_cuda
from .bench_kernels import D, DTYPE, H, KV, decode_cache, head_budgets, tca_select


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    ap.add_argument("--L", type=int, default=131072, help="context length in tokens")
    ap.add_argument("--frac", type=float, default=0.39, help="TCA kept fraction")
    ap.add_argument("--kwargs", default="{}", help="extra ragged_decode_triton kwargs, JSON")
    return ap


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    from ..engine.triton_decode import ragged_decode_triton

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(prog).parse_args(argv)
    if (rc := require_cuda("profile_decode")) is not None:
        return rc
    kw = json.loads(args.kwargs)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    L = args.L
    q = torch.randn(1, H, L, D, device=dev, dtype=DTYPE)
    k = torch.randn(1, KV, L, D, device=dev, dtype=DTYPE)
    v = torch.randn(1, KV, L, D, device=dev, dtype=DTYPE)
    p = head_budgets(args.frac, L, 4096, 128, torch.Generator().manual_seed(0)).to(dev)
    qpos = torch.full((1, 1), L - 1, dtype=torch.long, device=dev)
    cache, kv_bytes = decode_cache(k, v, tca_select(q, k, p, 4096, 128, 0.5, D**-0.5), qpos)
    q1 = q[:, :, -1:].contiguous()
    print("kv bytes", kv_bytes, "segments", (cache.g_offsets[1:] - cache.g_offsets[:-1]).tolist())
    for _ in range(6):
        ragged_decode_triton(q1, cache, D**-0.5, **kw)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
