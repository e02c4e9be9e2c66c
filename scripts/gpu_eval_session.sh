#!/usr/bin/env bash
# The accuracy report run of this session on a GPU (after the models were staged with
# scripts/gpu_run.sh stage/join). Resumable: call again with the same arguments to go on.
#   scripts/gpu_eval_session.sh MODEL_KEY GGUF TASKS LENGTHS SAMPLES [BUDGETS]
set -euo pipefail
STAGE=${STAGE:-/tmp/tca_stage}
key=$1 gguf=$2 tasks=$3 lengths=$4 samples=$5 budgets=${6:-}
export PYTHONPATH="$PWD:$STAGE/site" TCA_CACHE_DIR="$STAGE/cache" PYTHONUNBUFFERED=1
res="$STAGE/eval"
mkdir -p "$res"
if [[ -z "$budgets" ]]; then
  budgets="$res/$key-small-context.json"
  [[ -f "$budgets" ]] || python3 -m tca_attention.cli calibrate --model "$gguf" --device cuda --preset small-context --out "$budgets" | tail -3
fi
start=$(date +%s)
python3 -m tca_attention.eval --model "$gguf" --device cuda --dtype float32 --tca-preset small-context \
  --budgets "$budgets" --methods full,tca,tca@0.7,streaming=tca --tasks "$tasks" --lengths "$lengths" \
  --samples "$samples" --results-dir "$res/runs" --report-dir "$res/report" --report-prefix "eval_${key}_" \
  --no-progress 2>&1 | grep -vE "it/s|Loading|clean_up" | tail -25
echo "eval wall: $(( $(date +%s) - start )) s"
cp "$budgets" "${OUT:-/tmp}/" 2>/dev/null || true
tar -C "$res" -czf "${OUT:-/tmp}/eval_$key.tgz" runs report
