#!/usr/bin/env bash
# One device call after a kernel change: carried wheels (.whl: the locked transformers and what it
# needs beyond the GPU image) on PYTHONPATH, the CUDA test suites (kernels, decode page selection,
# fused selection, block-sparse prefill, column mass, batch invariance, full budget equals dense, adapter), then a short kernel
# benchmark. Logs/JSON in $OUT.
# Usage (repo root, on the GPU machine): bash scripts/gpu_verify.sh [tca bench kernels args]
set -o pipefail
OUT=${OUT:-/tmp/tca_gpu_out}; STAGE=${STAGE:-/tmp/tca_stage}
mkdir -p "$OUT" "$STAGE"
# the carried wheels, once per warm machine (a later call need not carry them again)
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$STAGE/site" .whl/*.whl
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$STAGE/site"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c 'import sys, torch, triton, transformers; print(sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name())'
} 2>&1 | tee "$OUT/gpu_tests.log"
# TESTS: the test files (default: every kernel, plan type, peer and static-decode suite present)
TESTS=${TESTS:-$(ls tests/test_triton_kernels.py tests/test_decode_select.py tests/test_triton_select.py \
  tests/test_block_sparse.py tests/test_batch_invariance.py tests/test_full_budget_equals_dense.py tests/test_adapter.py \
  tests/test_xattention.py tests/test_quest.py tests/test_head_split.py tests/test_static_decode.py \
  tests/test_flexprefill.py tests/test_minference.py tests/test_column_mass.py tests/test_spatten.py \
  tests/test_key_bias.py tests/test_block_skip.py tests/test_blasst.py tests/test_crossover_model.py tests/test_crossover.py \
  tests/test_tokenselect.py tests/test_tidaldecode.py tests/test_recycled.py tests/test_eval_batching.py 2>/dev/null)}
# one pytest per file, each with its own time limit and -rf: a file cut off by its limit loses
# only itself, and every failure is named (2026-12-06: one run over all files hit the call's
# limit and its 4 failures were never named)
# TESTS may name files or pytest node ids (e.g. the shards tests/test_block_sparse.py::test_gpu_fuzz[2]);
# ids joined by '+' run in one pytest (a::t1+a::t2).
# PARALLEL=1: they run side by side (Triton compiles on the host's cores, the GPU is shared; no test
# here times anything), so the call lasts as long as its slowest entry. Per-entry logs go into
# $OUT/test_logs.tar.gz (one file: the device tool returns only a few), failures' tails into
# $OUT/failures.log.
mkdir -p "$OUT/logs"
log_of() { echo "$OUT/logs/$(echo "${1#tests/}" | cut -c1-80 | tr -c 'A-Za-z0-9_.\n' '_').log"; }
one_entry() {
  local t=$1 log; log=$(log_of "$1")
  timeout "${PYTEST_TIMEOUT:-150}" python3 -m pytest -q -rf --tb=short -m "${MARKS:-gpu or not gpu}" -p no:cacheprovider \
    --durations=5 ${PYTEST_ARGS:-} ${t//+/ } > "$log" 2>&1
  echo "rc=$?" >> "$log"
}
for t in $TESTS; do
  if [ "${PARALLEL:-0}" = "1" ]; then one_entry "$t" & else one_entry "$t"; fi
done
wait
for t in $TESTS; do
  log=$(log_of "$t")
  echo "$t $(tail -1 "$log"): $(grep -E '(passed|failed|error)' "$log" | tail -1)" | tee -a "$OUT/gpu_tests.log"
  grep -E "^FAILED|^ERROR" "$log" | head -20 | tee -a "$OUT/gpu_tests.log"
  if [ "$(tail -1 "$log")" != "rc=0" ]; then { echo "=== $t"; tail -120 "$log"; } >> "$OUT/failures.log"; fi
done
tar -C "$OUT" -czf "$OUT/test_logs.tar.gz" logs && rm -rf "$OUT/logs"
[ "${BENCH:-1}" = "1" ] && timeout 240 python3 -m tca_attention.benchmarks.bench_kernels --out "$OUT" "$@" 2>&1 | tail -40 | tee "$OUT/bench.log"
exit 0
