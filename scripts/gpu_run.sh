#!/usr/bin/env bash
# Steps of one GPU session (device tool), each a separate call while the machine stays warm.
#   stage FILE...         copy carried model parts to $STAGE (outside the repository copy)
#   join NAME SHA         join $STAGE/NAME.part* into $STAGE/NAME.gguf and check its sha256
#   env                   install the carried wheels (.whl/*.whl) into $STAGE/site (python path) and
#                         unpack carried package trees (.whl/*.tar.xz) into $STAGE/pkgs; a run
#                         uses the latter only with PKGS=1 (e.g. a newer transformers than the image's)
#   pack NAME             everything under $OUT into $OUT/NAME.tar.gz (the device returns at most 8
#                         files: end a call that writes more with this; `tar xzf` here)
# Everything else runs with PYTHONPATH set, e.g.  scripts/gpu_run.sh py -m tca_attention.benchmarks.bench_e2e ...
set -euo pipefail
STAGE=${STAGE:-/tmp/tca_stage}
mkdir -p "$STAGE"
cmd=$1; shift
case "$cmd" in
  stage) for f in "$@"; do cp "$f" "$STAGE/"; done; ls -la "$STAGE" ;;
  join)
    name=$1; sha=$2
    cat $(ls "$STAGE"/"$name".part* | sort) > "$STAGE/$name.gguf"
    echo "$sha  $STAGE/$name.gguf" | sha256sum -c - ;;
  env)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$STAGE/site" .whl/*.whl
    mkdir -p "$STAGE/pkgs"; for t in .whl/*.tar.xz; do [[ -f "$t" ]] && tar -C "$STAGE/pkgs" -xJf "$t"; done; ls "$STAGE/pkgs" ;;
  pack)
    OUT=${OUT:?OUT is not set}; tmp=$(mktemp -d)
    tar -C "$OUT" -czf "$tmp/$1.tar.gz" . && find "$OUT" -mindepth 1 -delete && mv "$tmp/$1.tar.gz" "$OUT/" && ls -la "$OUT" ;;
  py)
    export PYTHONPATH="$PWD:${PKGS:+$STAGE/pkgs:}$STAGE/site" TCA_CACHE_DIR="$STAGE/cache" PYTHONUNBUFFERED=1
    python3 "$@" ;;
  *) echo "unknown step $cmd" >&2; exit 2 ;;
esac
