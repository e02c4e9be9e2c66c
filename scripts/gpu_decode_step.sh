#!/usr/bin/env bash
# One device call for issue 15's decode after a change to the static decode step (no model needed):
#   1. tests: the changed code's tests by node id (TESTS; default the ring append and the
#      no-sync/no-allocation static steps, which run the Triton path on CUDA);
#   2. decode: the compiled graphs of keep-all and TCA at 128K on the 8B shape (tokens/s, the ratio);
#   3. profile: where each graph step's time goes, kernel by kernel (profile_step, steady steps only).
# Usage: bash scripts/gpu_decode_step.sh [tests|decode|decode-tuned|profile ...]   (default: tests decode
# profile; decode-tuned: the decode cells again with inductor's GEMM autotuning; wheels in
# .whl/ installed first by scripts/gpu_run.sh env). Everything lands in $OUT/decode_step.tar.gz
# (the device returns at most 8 files). About 200 s on a fresh machine.
set -uo pipefail
export OUT=${OUT:-/tmp/tca_gpu_out}
mkdir -p "$OUT"
steps=" ${*:-tests decode profile} "
BUDGETS=docs/results/budgets/smollm2-default-8k.json
TESTS=${TESTS:-"tests/test_triton_kernels.py::test_ring_append_equals_the_reference
tests/test_static_decode.py::test_a_tca_step_reallocates_nothing_and_never_syncs
tests/test_static_decode.py::test_a_dense_static_step_reallocates_nothing_and_never_syncs"}
if [[ $steps == *" tests "* ]]; then
  echo "== $(date +%T) tests"
  # shellcheck disable=SC2086 - TESTS is a list of node ids
  timeout 240 bash scripts/gpu_run.sh py -m pytest -q -x -p no:cacheprovider $TESTS > "$OUT/tests.log" 2>&1
  echo "tests rc=$?"; tail -3 "$OUT/tests.log"
fi
if [[ $steps == *" decode "* ]]; then
  echo "== $(date +%T) decode, compiled graphs at 128K"
  timeout 300 bash scripts/gpu_run.sh py -m tca_attention.cli bench decode-graph --lengths 131072 --budgets "$BUDGETS" \
    --batch 1 --decode-steps 32 --compile-layers --cells keep-all-graph-compiled,tca-graph-compiled \
    --out "$OUT/decode_graph_8b_128k.json" > "$OUT/decode.log" 2>&1
  echo "decode rc=$?"; grep -o '"tca-graph-compiled / keep-all-graph-compiled": [0-9.]*' "$OUT/decode.log"
fi
if [[ $steps == *" decode-tuned "* ]]; then
  # the same cells with inductor's GEMM autotuning and coordinate-descent tuning (gpt-fast's settings):
  # the weight GEMVs (5.8 ms of TCA's 8.0 ms step at 2.6 TB/s) are shared by both paths
  echo "== $(date +%T) decode, compiled graphs at 128K, inductor tuned"
  TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 TORCHINDUCTOR_MAX_AUTOTUNE_GEMM=1 timeout 420 bash scripts/gpu_run.sh py \
    -m tca_attention.cli bench decode-graph --lengths 131072 --budgets "$BUDGETS" --batch 1 --decode-steps 32 \
    --compile-layers --cells keep-all-graph-compiled,tca-graph-compiled \
    --out "$OUT/decode_graph_8b_128k_tuned.json" > "$OUT/decode_tuned.log" 2>&1
  echo "decode-tuned rc=$?"; grep -o '"tca-graph-compiled / keep-all-graph-compiled": [0-9.]*' "$OUT/decode_tuned.log"
fi
if [[ $steps == *" profile "* ]]; then
  echo "== $(date +%T) profile"
  timeout 240 bash scripts/gpu_run.sh py -m tca_attention.benchmarks.profile_step --budgets "$BUDGETS" --tokens 131072 \
    --compile-layers --graph --out "$OUT/profile_step.json" > "$OUT/profile.log" 2>&1
  echo "profile rc=$?"; grep -E "^(tca|keep-all) " "$OUT/profile.log" | cut -c1-200
fi
bash scripts/gpu_run.sh pack decode_step > /dev/null && ls "$OUT"
