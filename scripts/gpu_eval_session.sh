#!/usr/bin/env bash
# The accuracy report run on a GPU (after the models were staged with scripts/gpu_run.sh
# stage/join). Resumable: a call cut by its time limit is continued by the same call again.
#   [RESUME=eval_KEY.tgz] [PKGS=1] [METHODS=...] [SDPA=math] scripts/gpu_eval_session.sh MODEL_KEY GGUF TASKS LENGTHS SAMPLES BUDGETS BATCH [SECONDS]
# Writes $OUT/eval_MODEL_KEY.tgz (run folders + report) whatever happened.
set -uo pipefail
STAGE=${STAGE:-/tmp/tca_stage}
key=$1 gguf=$2 tasks=$3 lengths=$4 samples=$5 budgets=$6 batch=$7 seconds=${8:-540}
export PYTHONPATH="$PWD:${PKGS:+$STAGE/pkgs:}$STAGE/site" TCA_CACHE_DIR="$STAGE/cache" PYTHONUNBUFFERED=1
res="$STAGE/eval"
mkdir -p "$res"
# on a fresh machine: RESUME=eval_KEY.tgz of an earlier call (carried) restores its finished samples
if [[ -n "${RESUME:-}" && -f "$RESUME" && ! -f "$res/.resumed_$key" ]]; then
  tar -C "$res" -xzf "$RESUME" runs && touch "$res/.resumed_$key" && echo "resumed from $RESUME"
fi
python3 -c "import transformers, torch; print('transformers', transformers.__version__, 'torch', torch.__version__)"
start=$(date +%s)
timeout "$seconds" python3 -m tca_attention.eval --model "$gguf" --device cuda --dtype float32 \
  --tca-preset small-context --budgets "$budgets" ${SDPA:+--sdpa-backend "$SDPA"} --methods "${METHODS:-full; tca; tca:tau=0.7; streaming:block_size=16@match=tca}" \
  --tasks "$tasks" --lengths "$lengths" --samples "$samples" --batch-size "$batch" \
  --results-dir "$res/runs" --report-dir "$res/report" --report-prefix "eval_${key}_" \
  --no-progress 2>&1 | grep -vE "it/s|Loading|clean_up" | tail -25
echo "eval rc ${PIPESTATUS[0]} wall $(( $(date +%s) - start )) s"
for f in "$res"/runs/*/results.jsonl; do echo "$f: $(wc -l < "$f") results"; done
tar -C "$res" -czf "${OUT:-/tmp}/eval_$key.tgz" runs $( [[ -d "$res/report" ]] && echo report )
