#!/usr/bin/env bash
# On a machine with a CUDA GPU: the Triton kernels natively, then timed. Without a GPU the
# same kernels are checked by the interpreted and AOT-compile tests in tests/kernels/.
#   bash bench/gpu_check.sh [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device")'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# Correctness on the device: the Triton int8
# linear against its twin and a quantized model through it (bench/gpu_int8_check.py).
"$PY" bench/gpu_int8_check.py
# Timing: attention, rotary, cache write, int8 linear (medians, GB/s against the copy).
"$PY" bench/kernels.py --dtype float16 "$@"
"$PY" bench/kernels.py --dtype bfloat16 --quick
