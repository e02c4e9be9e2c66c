#!/usr/bin/env bash
# One device call for issue 13's missing report rows (the adaptive floor and the best peer, TokenSelect,
# next to full and TCA; StreamingLLM where missing) in the run folders of the existing full/TCA rows:
#   Gemma3 32K (batch 8) in the background, and in the foreground Qwen 32K (batch 4), then Gemma3 16K
#   (batch 20), side by side on one GPU (different models and folders; each queue its own OUT/RESULTS).
# Needs $STAGE/gemma3.gguf and $STAGE/qwen.gguf (staged and joined) and scripts/gpu_run.sh env.
# Everything lands in $OUT/lb.tar.gz. About 560 s (budgets below); each queue resumes where it stopped.
set -uo pipefail
O=${OUT:-/tmp/tca_gpu_out}; S=${STAGE:-/tmp/tca_stage}; BUDGET=${SECONDS_BUDGET:-540}
mkdir -p "$O"
end=$((SECONDS + BUDGET + 5))
( OUT=$O/g32 RESULTS=$S/lbg32 MODEL=$S/gemma3.gguf LENGTHS=32768 BATCH=8 SECONDS_BUDGET=$BUDGET \
  SEED_FROM=docs/results/leaderboard_gemma3/runs \
  bash scripts/gpu_leaderboard.sh docs/results/leaderboard_gemma3/groups_issue13.txt > "$O/g32.log" 2>&1 ) &
sleep 20  # the first queue converts Gemma3's GGUF into the cache before the third starts
OUT=$O/q32 RESULTS=$S/lbq32 MODEL=$S/qwen.gguf LENGTHS=32768 BATCH=4 SECONDS_BUDGET=$((BUDGET / 2)) \
  SEED_FROM=docs/results/leaderboard_qwen/runs \
  bash scripts/gpu_leaderboard.sh docs/results/leaderboard_qwen/groups_issue13.txt > "$O/q32.log" 2>&1
OUT=$O/g16 RESULTS=$S/lbg16 MODEL=$S/gemma3.gguf LENGTHS=16384 BATCH=20 SECONDS_BUDGET=$((end - SECONDS)) \
  SEED_FROM=docs/results/leaderboard_gemma3/runs \
  bash scripts/gpu_leaderboard.sh docs/results/leaderboard_gemma3/groups_issue13.txt > "$O/g16.log" 2>&1
wait
tail -n 4 "$O"/*.log
OUT=$O bash scripts/gpu_run.sh pack lb > /dev/null && ls -la "$O"
