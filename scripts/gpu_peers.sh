#!/usr/bin/env bash
# One device call for the peers and the static decode (wheels carried in .whl/): the fused-selection
# GPU tests with their failures spelled out, `tca bench methods` (every peer's density knob swept,
# 8B shape) and `tca bench decode-graph` (dense/TCA x eager/graph). Each step has its own time limit;
# the benchmarks write JSON after every length, so a step cut short keeps what it measured.
set -o pipefail
OUT=${OUT:-/tmp/tca_gpu_out}; STAGE=${STAGE:-/tmp/tca_stage}
mkdir -p "$OUT" "$STAGE"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$STAGE/site" .whl/*.whl
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$STAGE/site" TCA_CACHE_DIR="$STAGE/cache"
B=docs/results/budgets/smollm2-default-8k.json
python3 -c 'import sys, torch, triton, transformers; print(sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name())' | tee "$OUT/versions.txt"
timeout "${T_TESTS:-50}" python3 -m pytest -q -rf --tb=short -m "gpu or not gpu" -p no:cacheprovider tests/test_triton_select.py \
  > "$OUT/select_tests.log" 2>&1; echo "select tests rc=$?"; grep -E "^(FAILED|E  )|passed|failed" "$OUT/select_tests.log" | head -30
timeout "${T_METHODS:-220}" python3 -m tca_attention.benchmarks.bench_methods --budgets $B --synthetic-state --decode-steps 16 \
  --lengths 32768,131072 --methods "${METHODS:-tca; peers}" \
  --out "$OUT/methods_8b.json" 2>&1 | tee "$OUT/methods_8b.log" | grep -v Warning | tail -25; echo "bench methods rc=$?"
timeout "${T_GRAPH:-170}" python3 -m tca_attention.benchmarks.bench_decode_graph --budgets $B --lengths 32768,131072 \
  --decode-steps 32 --out "$OUT/decode_graph_8b.json" 2>&1 | tee "$OUT/decode_graph_8b.log" | tail -25; echo "decode graph rc=$?"
exit 0
