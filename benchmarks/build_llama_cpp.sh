#!/usr/bin/env bash
# Build the peers of benchmarks/bench_serve.py from source, outside the repository:
#   - llama.cpp's llama-server, with cmake, from the llama.cpp source that llama-cpp-python's
#     sdist carries (PyPI is reachable where GitHub may not be);
#   - llama-cpp-python[server] into .venv, using the llama.cpp libraries built here (no second build).
# Usage: bash benchmarks/build_llama_cpp.sh [DIR]   (default DIR: ~/.cache/llamaforge/peers)
# Prints the path of llama-server last. About 15 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-$HOME/.cache/llamaforge/peers}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
mkdir -p "$DIR"
if [ ! -d "$DIR/llama_cpp_python-$VERSION" ]; then
    .venv/bin/python -m pip download -q --no-binary :all: --no-deps -d "$DIR" "llama-cpp-python==$VERSION"
    tar xzf "$DIR/llama_cpp_python-$VERSION.tar.gz" -C "$DIR"
fi
SRC="$DIR/llama_cpp_python-$VERSION/vendor/llama.cpp"
cmake -S "$SRC" -B "$DIR/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=ON \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF >/dev/null
cmake --build "$DIR/build" --target llama-server -j"$(nproc)" >/dev/null
# llama-cpp-python without building llama.cpp again: it loads the libraries from LLAMA_CPP_LIB_PATH.
CMAKE_ARGS="-DLLAMA_BUILD=OFF" .venv/bin/python -m pip install -q --no-build-isolation \
    "$DIR/llama_cpp_python-$VERSION[server]" 2>/dev/null ||
    CMAKE_ARGS="-DLLAMA_BUILD=OFF" .venv/bin/python -m pip install -q "$DIR/llama_cpp_python-$VERSION[server]"
echo "llama-cpp-python: run with LLAMA_CPP_LIB_PATH=$DIR/build/bin" >&2
echo "$DIR/build/bin/llama-server"
