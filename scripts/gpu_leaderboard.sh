#!/usr/bin/env bash
# Leaderboard runs on the device within a time budget: each group of methods is one resumable
# `tca eval` into the same run folder (a method that crashes loses only its group), in the order
# given, until the budget is spent; the run folders are copied to $OUT as a tar.
# Usage: SECONDS_BUDGET=520 MODEL=smollm2 LENGTHS=4096 bash scripts/gpu_leaderboard.sh GROUPS_FILE
# (one group per line: methods separated by ';'; lines starting with # are skipped)
set -uo pipefail
OUT=${OUT:-/tmp/tca_gpu_out}; STAGE=${STAGE:-/tmp/tca_stage}
RESULTS=${RESULTS:-$STAGE/lb}; SEED_FROM=${SEED_FROM:-}
mkdir -p "$OUT" "$RESULTS"
# copy without overwriting (coreutils >= 9.5 warns that -n is "non-portable" on every call: dropped)
cp_new() { cp -n "$@" 2> >(grep -v "non-portable" >&2); }
# earlier results (committed run folders carried in the tree) so a run resumes where the last stopped
[ -n "$SEED_FROM" ] && [ -d "$SEED_FROM" ] && cp_new -r "$SEED_FROM"/. "$RESULTS"/
# the calibrated states committed beside them (CALIB_FROM, default SEED_FROM/../calibration: files
# KIND-NAME or folders KIND/NAME, KIND a cache folder such as duo_gates) into the cache, so a resumed
# run uses the gates, scores and probes its earlier rows used instead of calibrating again
CALIB_FROM=${CALIB_FROM:-${SEED_FROM:+$(dirname "$SEED_FROM")/calibration}}
if [ -n "$CALIB_FROM" ] && [ -d "$CALIB_FROM" ]; then
  for f in "$CALIB_FROM"/*; do
    b=$(basename "$f")
    if [ -d "$f" ]; then mkdir -p "$STAGE/cache/$b" && cp_new "$f"/* "$STAGE/cache/$b/"
    elif [[ $b == *-* ]]; then mkdir -p "$STAGE/cache/${b%%-*}" && cp_new "$f" "$STAGE/cache/${b%%-*}/${b#*-}"; fi
  done
  echo "calibration seeded from $CALIB_FROM: $(find "$STAGE/cache" -name '*.json' -not -path '*/models/*' | wc -l) files"
fi
end=$((SECONDS + ${SECONDS_BUDGET:-520}))
ARGS=(--model "${MODEL:-smollm2}" --batch-size "${BATCH:-20}" --lengths "${LENGTHS:-4096}" --samples "${SAMPLES:-20}"
      --results-dir "$RESULTS")
# the groups with samples left, in one process (starting `tca eval` for a finished group cost ~7 s)
# (EXTRA: more `tca eval` flags, e.g. --sliding-kernel, which also name the run folder)
# shellcheck disable=SC2086 - EXTRA is a list of flags
# (a file of this run's own: two queues may run side by side on one GPU, each with its OUT and RESULTS)
pending=$(mktemp "$STAGE/pending_groups.XXXXXX")
bash scripts/gpu_run.sh py scripts/pending_groups.py "$1" "${ARGS[@]}" ${EXTRA:-} > "$pending" 2>> "$OUT/leaderboard_runs.log" \
  || { echo "pending_groups failed (see leaderboard_runs.log)"; exit 1; }
while IFS= read -r group; do
  left=$((end - SECONDS)); [ "$left" -lt 20 ] && { echo "budget spent before: $group"; break; }
  echo "== $(date +%T) [$left s left] $group"
  timeout "$left" bash scripts/gpu_run.sh py -m tca_attention.cli eval "${ARGS[@]}" --device cuda --cuda-graph \
    --methods "$group" --no-progress ${EXTRA:-} >> "$OUT/leaderboard_runs.log" 2>&1
  rc=$?; echo "   rc=$rc $(for d in "$RESULTS"/*/; do echo -n "$(zcat -f "$d"results.jsonl* 2>/dev/null | grep -c .) "; done)"
done < "$pending"
rm -f "$pending"
tar -C "$RESULTS" -czf "$OUT/leaderboard_runs.tar.gz" .
# the calibrated states (budgets, gates, profiles, head scores) of this model, to commit: not the converted weights
[ -d "$STAGE/cache" ] && tar -C "$STAGE/cache" --exclude=./models -czf "$OUT/calibration_cache.tar.gz" .
grep -E "WARNING|Error|error" "$OUT/leaderboard_runs.log" | tail -20 || true
