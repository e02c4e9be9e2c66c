"""Profile target for the TCA decode kernels (run under Nsight Compute on the GPU machine).

ncu --kernel-name regex:_decode --launch-skip 4 --launch-count 4 --section SpeedOfLight \
    --section Occupancy --section LaunchStats python3 benchmarks/profile_decode.py
"""
from __future__ import annotations

import argparse
import json

import torch

try:
    from benchmarks.bench_kernels import D, DTYPE, H, KV, decode_cache, head_budgets, tca_select
except ImportError:  # run as a script from benchmarks/
    from bench_kernels import D, DTYPE, H, KV, decode_cache, head_budgets, tca_select  # type: ignore[no-redef]


def main() -> None:
    from tca_attention.engine.triton_decode import ragged_decode_triton

    ap = argparse.ArgumentParser()
    ap.add_argument("--L", type=int, default=131072)
    ap.add_argument("--frac", type=float, default=0.39)
    ap.add_argument("--kwargs", default="{}", help="extra ragged_decode_triton kwargs, JSON")
    args = ap.parse_args()
    kw = json.loads(args.kwargs)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    L = args.L
    q = torch.randn(1, H, L, D, device=dev, dtype=DTYPE)
    k = torch.randn(1, KV, L, D, device=dev, dtype=DTYPE)
    v = torch.randn(1, KV, L, D, device=dev, dtype=DTYPE)
    p = head_budgets(args.frac, L, 4096, 128, torch.Generator().manual_seed(0)).to(dev)
    cache, kv_bytes = decode_cache(k, v, tca_select(q, k, p, 4096, 128, 0.5, D**-0.5))
    q1 = q[:, :, -1:].contiguous()
    qpos = torch.full((1, 1), L - 1, dtype=torch.long, device=dev)
    print("kv bytes", kv_bytes, "segments", (cache[3][1:] - cache[3][:-1]).tolist())
    for _ in range(6):
        ragged_decode_triton(q1, qpos, *cache, D**-0.5, **kw)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
