#!/usr/bin/env bash
# One device call for issues 11/12's peers at 16K and 32K, two queues side by side on one GPU (small
# models leave it mostly idle; each queue its own OUT and RESULTS, resumed from the machine's folders
# while it stays warm, seeded from the committed ones on a fresh one):
#   background: Qwen2.5-Coder-0.5B, groups_peers.txt at 16K (batch 20, the folder of its full/TCA rows),
#               then at 32K (batch 4: the (B, 1, L, L) mask of dense SDPA at batch 20 is 40 GiB);
#   foreground: Gemma3-270M with the sliding-window kernel (EXTRA=--sliding-kernel, folders of their own:
#               runs_sliding/), groups_sliding.txt at 16K (batch 20) for up to half the budget, then 32K
#               (batch 8; ~51 GB without the kernel's savings: never two Gemma3 queues at once).
# Needs $STAGE/qwen.gguf and $STAGE/gemma3.gguf (staged and joined) and scripts/gpu_run.sh env.
# Everything lands in $OUT/peers.tar.gz (each queue's leaderboard_runs.tar.gz and log): import each with
# scripts/import_device_runs.py into docs/results/leaderboard_{qwen/runs,gemma3/runs_sliding} (--new for
# the first Gemma3 folders). SECONDS_BUDGET (default 540) bounds the whole call.
set -uo pipefail
O=${OUT:-/tmp/tca_gpu_out}; S=${STAGE:-/tmp/tca_stage}; BUDGET=${SECONDS_BUDGET:-540}
mkdir -p "$O"
end=$((SECONDS + BUDGET))
(
  for spec in 16384:20 32768:4; do
    L=${spec%:*}; B=${spec#*:}; left=$((end - SECONDS)); [ "$left" -lt 30 ] && break
    OUT=$O/q$L RESULTS=$S/lbq MODEL=$S/qwen.gguf LENGTHS=$L BATCH=$B SECONDS_BUDGET=$left \
      SEED_FROM=docs/results/leaderboard_qwen/runs \
      bash scripts/gpu_leaderboard.sh docs/results/leaderboard_qwen/groups_peers.txt > "$O/q$L.log" 2>&1
  done
) &
for spec in 16384:20:$((BUDGET / 2)) 32768:8:0; do
  IFS=: read -r L B share <<< "$spec"
  left=$((end - SECONDS)); [ "$left" -lt 30 ] && break
  [ "$share" -gt 0 ] && [ "$share" -lt "$left" ] && left=$share
  OUT=$O/g$L RESULTS=$S/lbgs MODEL=$S/gemma3.gguf LENGTHS=$L BATCH=$B SECONDS_BUDGET=$left EXTRA=--sliding-kernel \
    SEED_FROM=docs/results/leaderboard_gemma3/runs_sliding \
    bash scripts/gpu_leaderboard.sh docs/results/leaderboard_gemma3/groups_sliding.txt > "$O/g$L.log" 2>&1
done
wait
tail -n 4 "$O"/*.log
OUT=$O bash scripts/gpu_run.sh pack peers > /dev/null && ls -la "$O"
