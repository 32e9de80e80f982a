#!/usr/bin/env bash
# Builds the cuBLAS/cuDNN stand-ins and their test program into a temporary folder and runs it:
# GEMMs and convolutions against reference loops, hand-computed examples, the convolution adjoint
# identity, determinism flags and rejection statuses. Exits nonzero on any failure.
# Usage: swgpu/blas/test.sh [--asan] [--keep DIR]
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
asan=()
dir=""
while [ $# -gt 0 ]; do
    case "$1" in
        --asan) asan=(--asan) ;;
        --keep) dir="$2"; shift ;;
        *) echo "usage: swgpu/blas/test.sh [--asan] [--keep DIR]" >&2; exit 2 ;;
    esac
    shift
done
if [ -z "$dir" ]; then
    dir="$(mktemp -d /tmp/swgpu-blas-test.XXXXXX)"
    trap 'rm -rf "$dir"' EXIT
fi
"$here/build.sh" "$dir" "${asan[@]}" || exit 2
cxx="${CXX:-g++}"
tflags=(-O1 -g -std=c++17 -Wall -rdynamic -pthread)
[ ${#asan[@]} -gt 0 ] && tflags+=(-fsanitize=address -fno-omit-frame-pointer)
"$cxx" "${tflags[@]}" -o "$dir/blas-test" "$here/test.cpp" -ldl || {
    echo "swgpu/blas/test.sh: building the test program failed" >&2
    exit 2
}
# The test sets its own expectations: default TF32 and non-determinism emulation.
env -u SWGPU_TF32 -u NVIDIA_TF32_OVERRIDE -u SWGPU_NONDET -u SWGPU_NONDET_SEED \
    SWGPU_THREADS="${SWGPU_THREADS:-2}" "$dir/blas-test" "$dir"
