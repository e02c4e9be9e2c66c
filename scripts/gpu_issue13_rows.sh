#!/usr/bin/env bash
# One device call for issue 13's missing report rows (the adaptive floor and the best peer, TokenSelect,
# next to full and TCA; StreamingLLM where missing) in the run folders of the existing full/TCA rows:
#   Qwen 32K (batch 4) in the background, and in the foreground Gemma3 16K (batch 20), then Gemma3 32K
#   (batch 8), side by side on one GPU (different models and folders; each queue its own OUT/RESULTS).
# Needs $STAGE/gemma3.gguf and $STAGE/qwen.gguf (staged and joined) and scripts/gpu_run.sh env.
# Everything lands in $OUT/lb.tar.gz. About 560 s (budgets below); each queue resumes where it stopped (RESULTS under $STAGE stay
# while the machine is warm; the committed folders seed a fresh one).
set -uo pipefail
O=${OUT:-/tmp/tca_gpu_out}; S=${STAGE:-/tmp/tca_stage}; BUDGET=${SECONDS_BUDGET:-540}
mkdir -p "$O"
end=$((SECONDS + BUDGET + 5))
# Qwen in the background; Gemma3 16K then 32K in the foreground (the two Gemma3 queues side by side ran
# out of memory: 32K at batch 8 holds ~51 GB)
( OUT=$O/q32 RESULTS=$S/lbq32 MODEL=$S/qwen.gguf LENGTHS=32768 BATCH=4 SECONDS_BUDGET=$BUDGET \
  SEED_FROM=docs/results/leaderboard_qwen/runs \
  bash scripts/gpu_leaderboard.sh docs/results/leaderboard_qwen/groups_issue13.txt > "$O/q32.log" 2>&1 ) &
OUT=$O/g16 RESULTS=$S/lbg16 MODEL=$S/gemma3.gguf LENGTHS=16384 BATCH=20 SECONDS_BUDGET=$((BUDGET / 3)) \
  SEED_FROM=docs/results/leaderboard_gemma3/runs \
  bash scripts/gpu_leaderboard.sh docs/results/leaderboard_gemma3/groups_issue13.txt > "$O/g16.log" 2>&1
OUT=$O/g32 RESULTS=$S/lbg32 MODEL=$S/gemma3.gguf LENGTHS=32768 BATCH=8 SECONDS_BUDGET=$((end - SECONDS)) \
  SEED_FROM=docs/results/leaderboard_gemma3/runs \
  bash scripts/gpu_leaderboard.sh docs/results/leaderboard_gemma3/groups_issue13.txt > "$O/g32.log" 2>&1
wait
tail -n 4 "$O"/*.log
OUT=$O bash scripts/gpu_run.sh pack lb > /dev/null && ls -la "$O"
