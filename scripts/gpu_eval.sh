#!/usr/bin/env bash
# Full report configuration of the long-context accuracy suite (issue 4), on a CUDA GPU.
#
#   scripts/gpu_eval.sh RESULTS_DIR
#
# Two real packaged models x 4K and 8K tokens x all 9 tasks x 20 samples, methods: full
# attention; TCA with the default calibration score (column_mean) at tau 0.9, 0.95 and 0.7
# (the accuracy-vs-KV sweep); TCA with the observation score at tau 0.9 and 0.7 (the two
# scores the method doc asks the suite to decide between); StreamingLLM at the KV budget of
# TCA 0.9 under either score. TCA preset small-context (window 512) so that 4K/8K prompts are
# compressed. Resumable: rerun the same command after a crash.
# Writes RESULTS_DIR/<run>/results.jsonl, summary.json, report.md and PNGs per model and a
# combined report in RESULTS_DIR/report/eval_* (ready to copy to docs/results/). Overridable through the environment:
#   MODELS="smollm2 qwen2.5-coder-0.5b"  LENGTHS=4096,8192  SAMPLES=20  DEVICE=cuda  DTYPE=  BATCH=1
#   METHODS="full; tca:tau=0.7; ..."  (registry specs separated by ';', see docs/eval.md and the default below)  EXTRA="--budgets FILE" (one model only) etc.
set -euo pipefail
OUT=${1:?usage: scripts/gpu_eval.sh RESULTS_DIR}
MODELS=${MODELS:-"smollm2 qwen2.5-coder-0.5b"}
LENGTHS=${LENGTHS:-4096,8192}
SAMPLES=${SAMPLES:-20}
DEVICE=${DEVICE:-cuda}
METHODS=${METHODS:-"full; tca; tca:tau=0.95|0.7; tca:score=observation; tca:tau=0.7,score=observation; streaming:block_size=16@match=tca; streaming:block_size=16@match=tca:score=observation"}
DTYPE_ARG=()
if [[ -n "${DTYPE:-}" ]]; then DTYPE_ARG=(--dtype "$DTYPE"); fi
MODEL_ARGS=()
for m in $MODELS; do MODEL_ARGS+=(--model "$m"); done

mkdir -p "$OUT"
start=$(date +%s)
python -m tca_attention.eval "${MODEL_ARGS[@]}" --methods "$METHODS" --tasks all \
    --lengths "$LENGTHS" --samples "$SAMPLES" --device "$DEVICE" "${DTYPE_ARG[@]}" \
    --batch-size "${BATCH:-1}" --results-dir "$OUT" --report-dir "$OUT/report" --report-prefix eval_ ${EXTRA:-} 2>&1 | tee -a "$OUT/eval.log"
echo "total wall time: $(( $(date +%s) - start )) s" | tee -a "$OUT/eval.log"
