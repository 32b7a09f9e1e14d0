#!/usr/bin/env bash
# Development check of csrc/ (runs on a machine without a GPU, from a fresh clone):
#   1. configures and builds CMakeLists.txt and runs ctest (C++ unit tests of the kernel math);
#   2. when nvcc is found (or FASTINFLUENCE_CUDA=1), compiles every csrc/ops/cuda/*.cu with it
#      for sm_80 and sm_90 (CMAKE_CUDA_ARCHITECTURES overrides), and syntax-checks the CUDA glue
#      (csrc/ops/cuda/*_glue.cpp) against torch's headers when a Python with torch is found.
# Installs cmake itself if it is missing (apt-get as root, else pip --user).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD="${FASTINFLUENCE_NATIVE_BUILD:-build/native}"
VENV="${FASTINFLUENCE_VENV:-.venv}"

if ! command -v cmake >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -q && apt-get install -y -q cmake
    else
        python3 -m pip install -q --user cmake
        export PATH="$HOME/.local/bin:$PATH"
    fi
fi

NVCC="$(command -v nvcc || true)"
if [ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
    NVCC=/usr/local/cuda/bin/nvcc
fi
case "${FASTINFLUENCE_CUDA:-auto}" in
    0) CUDA=OFF ;;
    1) [ -n "$NVCC" ] || { echo "native_check: FASTINFLUENCE_CUDA=1 but nvcc not found" >&2; exit 1; }
       CUDA=ON ;;
    *) CUDA=$([ -n "$NVCC" ] && echo ON || echo OFF) ;;
esac
echo "native_check: build dir $BUILD, CUDA kernels: $CUDA${NVCC:+ ($NVCC)}"

cuda_args=()
if [ "$CUDA" = ON ]; then
    cuda_args=(-DCMAKE_CUDA_COMPILER="$NVCC")
fi
cmake -S . -B "$BUILD" -DFASTINFLUENCE_CUDA="$CUDA" "${cuda_args[@]}" >/dev/null
cmake --build "$BUILD" --parallel "${MAX_JOBS:-2}"
ctest --test-dir "$BUILD" --output-on-failure

if [ "$CUDA" = ON ]; then
    PYTHON=""
    for candidate in "$VENV/bin/python" python3; do
        if "$candidate" -c "import torch" >/dev/null 2>&1; then
            PYTHON="$candidate"
            break
        fi
    done
    if [ -z "$PYTHON" ]; then
        echo "native_check: no Python with torch found; skipped the CUDA glue syntax check"
        exit 0
    fi
    TORCH_INCLUDE="$("$PYTHON" -c 'from torch.utils.cpp_extension import include_paths; print(" ".join("-I" + p for p in include_paths()))')"
    # nvcc may be a wrapper script: ask it where the CUDA headers are.
    CUDA_INCLUDE="$("$NVCC" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 \
        | sed -n 's/^#\$ INCLUDES="\(.*\)".*/\1/p')"
    # A CPU torch lacks one generated CUDA header; an empty stand-in is enough for syntax.
    STUB="$BUILD/glue_stub"
    mkdir -p "$STUB/c10/cuda/impl"
    touch "$STUB/c10/cuda/impl/cuda_cmake_macros.h"
    for glue in csrc/ops/cuda/*_glue.cpp; do
        # shellcheck disable=SC2086  # TORCH_INCLUDE and CUDA_INCLUDE are lists of flags
        "${CXX:-c++}" -std=c++20 -fsyntax-only -Icsrc $TORCH_INCLUDE -I"$STUB" \
            $CUDA_INCLUDE "$glue"
        echo "native_check: $glue compiles against torch's headers"
    done
fi
echo "native_check: OK"
