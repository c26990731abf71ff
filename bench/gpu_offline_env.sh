#!/usr/bin/env bash
# bench/gpu_check.sh on a GPU machine that has a CUDA torch and triton (an image with PyTorch
# preinstalled as `python3`) but no network and none of palm-serve's other dependencies:
#   here:   bash bench/gpu_offline_env.sh download 3.12   # wheels of this .venv's versions -> .whl/
#   there:  bash bench/gpu_offline_env.sh install && bash bench/gpu_check.sh
# `install` puts the wheels in $GPU_CHECK_SITE (default /tmp/palm-site) with palm_serve linked from
# this checkout, and writes .venv/bin/{python,palm-serve} as wrappers of that python3 (the
# paths gpu_check.sh and bench/peer_servers.py call). It refuses to touch a real .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=${GPU_CHECK_SITE:-/tmp/palm-site}
# The runtime dependencies a PyTorch image lacks (torch, triton, numpy, tokenizers,
# safetensors, prometheus-client, httpx, jinja2, tqdm, ninja, click, h11 are there).
PACKAGES="fastapi starlette pydantic pydantic_core annotated-types annotated-doc
typing-inspection typing_extensions pydantic-settings python-dotenv uvicorn httptools
sse-starlette pyzmq msgspec python-json-logger llguidance anyio sniffio opentelemetry-api"

download() {
    local python_version=${1:?python version of the GPU machine, e.g. 3.12}
    local pins=() name version
    for name in $PACKAGES; do
        version=$(.venv/bin/python -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name")
        pins+=("$name==$version")
    done
    local platforms=()
    for tag in 2_31 2_28 2_27 2_26 2_24 2_17 2014 2_5 1; do
        case $tag in 2014 | 1) platforms+=(--platform "manylinux${tag}_x86_64") ;;
        *) platforms+=(--platform "manylinux_${tag}_x86_64") ;; esac
    done
    .venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: \
        --python-version "$python_version" --implementation cp "${platforms[@]}" -d .whl "${pins[@]}"
    local exclude
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")"
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
    du -sh .whl
}

install() {
    if [ -e .venv/pyvenv.cfg ]; then
        echo "a real .venv is here; use it (PY=.venv/bin/python bash bench/gpu_check.sh)" >&2
        exit 1
    fi
    python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
        --target "$SITE" .whl/*.whl
    mkdir -p "$SITE/palm_serve" .venv/bin
    for layer in kernels model engine server; do ln -sfn "$PWD/$layer" "$SITE/palm_serve/$layer"; done
    local path="PYTHONPATH=$SITE\${PYTHONPATH:+:\$PYTHONPATH}"
    printf '#!/bin/sh\n%s exec python3 "$@"\n' "$path" >.venv/bin/python
    printf '#!/bin/sh\n%s exec python3 -m palm_serve.server.cli "$@"\n' "$path" >.venv/bin/palm-serve
    chmod +x .venv/bin/python .venv/bin/palm-serve
    .venv/bin/python -c 'import palm_serve.server.app, palm_serve.engine.core_process, llguidance, zmq'
    echo "palm-serve's dependencies in $SITE; .venv/bin wraps $(command -v python3)"
}

case ${1:-} in
download) download "${2:-}" ;;
install) install ;;
*) echo "usage: $0 download PYTHON_VERSION | install" >&2; exit 2 ;;
esac
