#!/usr/bin/env bash
# One device call: Triton kernel tests on real CUDA (tests/test_triton_kernels.py, the gpu-marked
# ones included), then the kernel benchmark. Logs, JSON and PNGs go to $OUT.
# Usage (repo root, on the GPU machine): bash scripts/gpu_check.sh [tca bench kernels args]
# Env: TESTS_K (pytest -k filter), PROFILE=1 (Nsight Compute summary of the decode kernels).
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/tca_gpu_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv 2>&1 | tee "$OUT/gpu_tests.log"
timeout 240 python3 -m pytest -q -m "gpu or not gpu" ${TESTS_K:+-k "$TESTS_K"} tests/test_triton_kernels.py \
  -p no:cacheprovider --durations=5 2>&1 | tee -a "$OUT/gpu_tests.log"
python3 -m tca_attention.benchmarks.bench_kernels --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"
if [ "${PROFILE:-0}" = "1" ]; then
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  timeout 120 "$NCU" --kernel-name regex:_decode --launch-skip 4 --launch-count 2 --section SpeedOfLight \
    --section Occupancy --section LaunchStats python3 -m tca_attention.benchmarks.profile_decode 2>&1 | tee "$OUT/ncu_decode.txt" \
    | grep -E "Duration|DRAM Throughput|Achieved Occupancy|Grid Size|_decode"
fi
