#!/usr/bin/env bash
# The GPU path in one call, on a machine with a CUDA GPU and torch + triton installed (here,
# with the project's .venv, or PY pointing at a python that has them and palm-serve):
#   1. the Triton kernel tests natively (tests/kernels/test_triton_*.py with
#      PALM_TRITON_DEVICE=cuda: the same cases and twins as the interpreted runs in CI),
#   2. the Triton int8 linear against its twin, and a quantized model through it,
#   3. the default model and the tiny Llama served on the GPU (Triton, fp32 and bf16),
#      their outputs against the CPU path's (greedy, and seeded sampling with filters,
#      penalties, logprobs and a regex's bitmask),
#   4. kernel timings (bench/triton_bandwidth.py).
# Each step has its own time limit; the whole fits in 8 minutes (the run: docs/BENCHMARKS.md).
# On a machine whose image has torch and triton but no network: bench/gpu_offline_env.sh.
#   bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
status=0
step() {
    local limit=$1 name=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    local started=$SECONDS
    timeout "$limit" "$@"
    local code=$?
    echo "== $name: exit $code in $((SECONDS - started)) s"
    [ "$code" -eq 0 ] || status=1
}
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device")' || exit 2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'

step 150 "Triton kernels natively against their twins" \
    env PALM_TRITON_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider \
    tests/kernels/test_triton_paged_attention.py tests/kernels/test_triton_rotary_kv_cache.py \
    tests/kernels/test_triton_int8_linear.py tests/kernels/test_triton_model.py \
    tests/kernels/test_triton_backend.py
step 60 "Triton int8 linear and a quantized model" "$PY" bench/gpu_int8_check.py
if [ ! -f bench/.venvs/models/tiny-llama/config.json ]; then
    step 120 "the tiny Llama's checkpoint" "$PY" bench/make_tiny_llama.py
fi
step 260 "served outputs, GPU against CPU" "$PY" bench/gpu_serve_check.py
step 100 "kernel timings, fp16" "$PY" bench/triton_bandwidth.py --dtype float16
step 50 "kernel timings, bf16" "$PY" bench/triton_bandwidth.py --dtype bfloat16 --quick
echo "gpu_check: $([ $status -eq 0 ] && echo ok || echo FAILED) in $SECONDS s"
exit $status
