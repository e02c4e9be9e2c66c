# The Gemma3 padding check of session 3 (one device call, after gemma3.part0-2 were staged):
# join the model, compare SDPA kernels on batched needles, rerun niah_single with math if it is the fix.
set -u
bash scripts/gpu_run.sh stage .stage/gemma3.part3 >/dev/null && bash scripts/gpu_run.sh join gemma3 a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818 || exit 1
PKGS=1 bash scripts/gpu_run.sh py scripts/diag_padding.py /tmp/tca_stage/gemma3.gguf --task niah_single --length 4096 --samples 20 --single 6 2>&1 | tail -1 | tee $OUT/diag_niah_single_4096.json
PKGS=1 bash scripts/gpu_run.sh py scripts/diag_padding.py /tmp/tca_stage/gemma3.gguf --task niah_multikey --length 4096 --samples 20 --single 4 --kernels auto,math 2>&1 | tail -1 | tee $OUT/diag_niah_multikey_4096.json
fix=$(python3 -c "import json;d=json.load(open('$OUT/diag_niah_single_4096.json'));print(int(d['math']['score']>d['auto']['score']+0.2))")
echo fix=$fix
if [ "$fix" = 1 ]; then SDPA=math PKGS=1 bash scripts/gpu_eval_session.sh gemma3 /tmp/tca_stage/gemma3.gguf niah_single 4096,8192 20 docs/results/budgets/gemma3-small-context-8k.json 20 $(( 560 - SECONDS )); fi
