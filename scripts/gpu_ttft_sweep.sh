#!/usr/bin/env bash
# One device call for issue 15's TTFT after a prefill-kernel change (no model needed):
#   1. the changed kernels' GPU tests (TESTS, in parallel; failures in $OUT/failures.log);
#   2. the prefill tile sweep at the TTFT's shape (128K, 10% kept per head; `prefill_config_text`);
#   3. TTFT of the 8B-shaped model at 128K, dense compiled vs TCA compiled (median of 3), with the
#      sweep's winner through TCA_PREFILL_CONFIG
#      (TCA in the library's default configuration, the benchmark's default options);
#   4. (step ttft-paper, not in the default) the same TTFT with the paper's rule (last_q=1,span=1).
# Usage: bash scripts/gpu_ttft_sweep.sh [tests|sweep|ttft|ttft-paper ...]   (default the first three; wheels in .whl/
# installed first by scripts/gpu_run.sh env). The steps may go in separate calls of one warm
# machine (e.g. alongside model parts being staged): the sweep's JSON is kept in $STAGE.
set -uo pipefail
OUT=${OUT:-/tmp/tca_gpu_out}; STAGE=${STAGE:-/tmp/tca_stage}
mkdir -p "$OUT"
end=$((SECONDS + ${SECONDS_BUDGET:-585}))
steps=" ${*:-tests sweep ttft} "
if [[ $steps == *" tests "* ]]; then
echo "== $(date +%T) tests"
PARALLEL=1 BENCH=0 PYTEST_TIMEOUT=${PYTEST_TIMEOUT:-200} bash scripts/gpu_verify.sh > /dev/null
cat "$OUT/gpu_tests.log"
fi
if [[ $steps == *" sweep "* ]]; then
echo "== $(date +%T) prefill tile sweep [$((end - SECONDS)) s left]"
timeout 260 bash scripts/gpu_run.sh py -m tca_attention.benchmarks.bench_kernels --out "$OUT/kernels" \
  --contexts 131072 --fractions 0.10 --sweep-len 131072 --sweep-fraction 0.10 --decode-sweep-len 0 \
  --flex-max 0 --efficient-max 0 --time-budget 200 --target-ms 200 > "$OUT/kernels.log" 2>&1
grep -E "sweep|prefill config|dense|TCA" "$OUT/kernels.log" | cut -c1-260 | tail -30
cp "$OUT/kernels/kernels_bench.json" "$STAGE/kernels_bench.json"
fi
CFG=$(python3 -c "import json; print(json.load(open('$STAGE/kernels_bench.json')).get('prefill_config_text', ''))" 2>/dev/null)
# ttft NAME [TCA options]: dense compiled vs TCA compiled at 128K (median of 3), the sweep's winner;
# without options the benchmark's default (the library's default configuration)
ttft() {
  local name=$1 left=$((end - SECONDS - 5)) opts=()
  [ $# -ge 2 ] && opts=(--tca-options "$2")
  echo "== $(date +%T) TTFT ($name, ${opts[*]:-default options}) with TCA_PREFILL_CONFIG=${CFG:-default} [$left s left]"
  [ "$left" -lt 60 ] && { echo "no time left for the TTFT"; return 0; }
  TCA_PREFILL_CONFIG=$CFG timeout "$left" bash scripts/gpu_run.sh py -m tca_attention.benchmarks.bench_decode_graph \
    --lengths 131072 --budgets docs/results/budgets/smollm2-default-8k.json --batch 1 --decode-steps 32 \
    --compile-layers --compile-prefill --ttft-repeats 3 --cells dense-graph-compiled,tca-graph-compiled \
    "${opts[@]}" --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  echo "rc=$?"; grep -E '^\{' "$OUT/$name.log" | python3 -c "
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    print({k: (v.get('ttft_s'), v.get('ttft_s_all'), v.get('decode_tokens_per_s')) if isinstance(v, dict) else v for k, v in r.items()})
"
  tail -5 "$OUT/$name.log"
}
[[ $steps == *" ttft "* ]] && ttft ttft_8b_128k
# ttft-paper: the same with the paper's selection rule (the last query alone; the earlier figures')
[[ $steps == *" ttft-paper "* ]] && ttft ttft_8b_128k_paper "last_q=1,span=1"
exit 0
