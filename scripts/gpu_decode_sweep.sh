#!/usr/bin/env bash
# One device call for issue 15's decode kernel at TCA's real size (no model needed):
#   0. the pdl=1 decode (programmatic dependent launch) against the reference on the GPU;
#   1. sweep the decode kernel's launch settings on an 8B-shaped cache of 128K tokens at 10% kept
#      (`tca bench kernels --decode-only`, DECODE_SETTINGS, graph-timed);
#   2. pick the fastest setting the engine can take from TCA_DECODE_CONFIG (block_n, num_warps,
#      num_stages, items_per_sm, merge_block, merge_split, pdl);
#   3. profile the decode kernels at 10% with Nsight Compute when the machine has it (NCU_PROFILE=0: skip);
#   4. if the winner beats the defaults by more than MIN_GAIN, time the whole 8B decode step
#      (scripts/gpu_decode_step.sh decode-tuned) with the defaults and with the winner, side by side.
# Usage: OUT=... bash scripts/gpu_decode_sweep.sh   (after scripts/gpu_run.sh env; ~300 s when a winner is timed)
#   (the Nsight Compute step adds ~60 s where ncu exists)
set -uo pipefail
export OUT=${OUT:-/tmp/tca_gpu_out}
MIN_GAIN=${MIN_GAIN:-0.05}
mkdir -p "$OUT/kern"
echo "== $(date +%T) the programmatic-dependent-launch decode against the reference (eager and in a graph)"
timeout 120 bash scripts/gpu_run.sh py -m pytest -q -p no:cacheprovider \
  "tests/test_triton_kernels.py::test_decode_pdl_equals_the_reference_on_hopper_and_is_refused_elsewhere" \
  > "$OUT/kern/pdl_test.log" 2>&1
echo "pdl test rc=$?"; tail -1 "$OUT/kern/pdl_test.log"
echo "== $(date +%T) decode sweep at 10% of 128K"
timeout 240 bash scripts/gpu_run.sh py -m tca_attention.cli bench kernels --decode-only --contexts 131072 \
  --fractions 0.10 --decode-sweep-fraction 0.10 --out "$OUT/kern" > "$OUT/kern/sweep.log" 2>&1
echo "sweep rc=$?"
winner=$(bash scripts/gpu_run.sh py - "$OUT/kern/kernels_bench.json" "$MIN_GAIN" <<'PY'
import json, sys
from tca_attention.engine.triton_decode import _CONFIG_KEYS
res = json.load(open(sys.argv[1])); gain = float(sys.argv[2])
rows = [r for r in res.get("decode_sweep", []) if "us" in r and r["max_diff_vs_first"] < 5e-2]
base = next(r["us"] for r in rows if r["kwargs"] == {})
ok = [r for r in rows if r["kwargs"] and set(r["kwargs"]) <= set(_CONFIG_KEYS)]
for r in sorted(rows, key=lambda r: r["us"])[:8]:
    print(f"{r['us']:8.1f} us  {base / r['us']:.3f}x  {r['kwargs']}", file=sys.stderr)
best = min(ok, key=lambda r: r["us"]) if ok else None
if best and best["us"] < base * (1 - gain):
    print(",".join(f"{k}={v}" for k, v in best["kwargs"].items()))
PY
)
echo "winner: ${winner:-none (defaults within $MIN_GAIN)}"
if [[ ${NCU_PROFILE:-1} == 1 ]]; then
  # where the split and merge kernels' time goes at 10% (stall reasons), defaults and the merge cut over 4
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  if [[ -n $NCU ]]; then
    for kw in '{}' '{"merge_split": 4}'; do
      echo "== kwargs $kw" >> "$OUT/kern/ncu_decode_10pct.txt"
      timeout 150 "$NCU" --kernel-name regex:_decode --launch-skip 4 --launch-count 2 --section SpeedOfLight \
        --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats \
        bash scripts/gpu_run.sh py -m tca_attention.benchmarks.profile_decode --frac 0.10 --kwargs "$kw" \
        >> "$OUT/kern/ncu_decode_10pct.txt" 2>&1
    done
    grep -E "^== kwargs|_decode_|Duration|Achieved Occupancy|Stall" "$OUT/kern/ncu_decode_10pct.txt" | head -40
  else
    echo "no ncu on this machine"
  fi
fi
if [[ -n $winner ]]; then
  OUT=$OUT/default bash scripts/gpu_decode_step.sh decode-tuned
  TCA_DECODE_CONFIG=$winner OUT=$OUT/winner bash scripts/gpu_decode_step.sh decode-tuned
fi
