#!/usr/bin/env bash
# Builds llama.cpp's llama-bench and llama-batched-bench for the single suite's outside anchor, from the
# llama.cpp that llama-cpp-python's source release vendors (PyPI has no wheel of it for these machines).
# Outside CI; a few minutes on 2 cores. The binaries land in the benchmark's own cache:
#   ${LORASWAP_BENCH_CACHE:-~/.cache/loraswap-bench}/llama.cpp/bin
# Usage: benchmarks/llamacpp.sh [PYTHON]   (PYTHON: the pip that downloads the sdist; default .venv/bin/python)
set -euo pipefail
PY=${1:-.venv/bin/python}
VERSION=0.3.36
CACHE=${LORASWAP_BENCH_CACHE:-$HOME/.cache/loraswap-bench}/llama.cpp
mkdir -p "$CACHE"
if [ ! -d "$CACHE/src" ]; then
  "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$CACHE/dl"
  tar xzf "$CACHE/dl/llama_cpp_python-$VERSION.tar.gz" -C "$CACHE/dl"
  mv "$CACHE/dl/llama_cpp_python-$VERSION/vendor/llama.cpp" "$CACHE/src"
  rm -rf "$CACHE/dl"
fi
# GGML_NATIVE: kernels for this CPU's flags, as a user building it here would get.
cmake -S "$CACHE/src" -B "$CACHE/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF >/dev/null
cmake --build "$CACHE/build" --target llama-bench llama-batched-bench -j "$(nproc)"
mkdir -p "$CACHE/bin"
cp "$CACHE/build/bin/llama-bench" "$CACHE/build/bin/llama-batched-bench" "$CACHE/bin/"
echo "built: $CACHE/bin"
