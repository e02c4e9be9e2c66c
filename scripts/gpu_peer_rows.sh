#!/usr/bin/env bash
# One device call for issues 11/12's peers at 16K and 32K: queues one after the other on one GPU,
# each resumed from the machine's folders while it stays warm (seeded from the committed ones on a
# fresh machine), until SECONDS_BUDGET (default 540) is spent. QUEUES picks and orders them
# (default "q16384 q32768 g16384 g32768"):
#   q16384 / q32768: Qwen2.5-Coder-0.5B, groups_peers.txt at 16K (batch 20) / 32K (batch 4: the
#                    (B, 1, L, L) mask of dense SDPA at batch 20 is 40 GiB), into leaderboard_qwen/runs;
#   g16384 / g32768: Gemma3-270M with the sliding-window kernel (EXTRA=--sliding-kernel, folders of
#                    their own: runs_sliding/), groups_sliding.txt at 16K (batch 20) / 32K (batch 8).
# Not side by side: 2026-12-08 a Gemma3 16K queue (62 GB at batch 20) left the Qwen queue beside it
# out of memory at batch 1.
# Needs $STAGE/qwen.gguf and/or $STAGE/gemma3.gguf (staged and joined) and scripts/gpu_run.sh env.
# Everything lands in $OUT/peers.tar.gz (each queue's leaderboard_runs.tar.gz and log): import each with
# scripts/import_device_runs.py into docs/results/leaderboard_{qwen/runs,gemma3/runs_sliding}.
set -uo pipefail
O=${OUT:-/tmp/tca_gpu_out}; S=${STAGE:-/tmp/tca_stage}; BUDGET=${SECONDS_BUDGET:-540}
mkdir -p "$O"
end=$((SECONDS + BUDGET))
for q in ${QUEUES:-q16384 q32768 g16384 g32768}; do
  left=$((end - SECONDS)); [ "$left" -lt 30 ] && { echo "budget spent before $q"; break; }
  case $q in
    q16384) L=16384; B=20 ;;
    q32768) L=32768; B=4 ;;
    g16384) L=16384; B=20 ;;
    g32768) L=32768; B=8 ;;
    *) echo "unknown queue $q (q16384, q32768, g16384, g32768)" >&2; exit 2 ;;
  esac
  if [[ $q == q* ]]; then
    OUT=$O/$q RESULTS=$S/lbq MODEL=$S/qwen.gguf LENGTHS=$L BATCH=$B SECONDS_BUDGET=$left \
      SEED_FROM=docs/results/leaderboard_qwen/runs \
      bash scripts/gpu_leaderboard.sh docs/results/leaderboard_qwen/groups_peers.txt > "$O/$q.log" 2>&1
  else
    OUT=$O/$q RESULTS=$S/lbgs MODEL=$S/gemma3.gguf LENGTHS=$L BATCH=$B SECONDS_BUDGET=$left EXTRA=--sliding-kernel \
      SEED_FROM=docs/results/leaderboard_gemma3/runs_sliding \
      bash scripts/gpu_leaderboard.sh docs/results/leaderboard_gemma3/groups_sliding.txt > "$O/$q.log" 2>&1
  fi
  grep -E "^== |rc=|budget spent" "$O/$q.log" | tail -n 6
done
OUT=$O bash scripts/gpu_run.sh pack peers > /dev/null && ls -la "$O"
