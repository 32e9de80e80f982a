#!/usr/bin/env bash
# Builds the libnccl stand-in and its test program into a temporary folder and runs it: rank-order
# sums through chunked buffers, broadcast, all-gather, bf16 rounding, and failures (a killed peer,
# an aborted peer, a world that never fills) ending the waiting rank quickly, and collectives on a
# side stream deferred through the libcuda stand-in (built here too) until an event wait.
# Usage: swgpu/nccl/test.sh [--asan]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cxx="${CXX:-g++}"
flags=(-std=c++17 -O1 -g -Wall -pthread)
case "${1:-}" in
  "") ;;
  --asan) flags+=(-fsanitize=address -fno-omit-frame-pointer) ;;
  *) echo "usage: swgpu/nccl/test.sh [--asan]" >&2; exit 2 ;;
esac
dir="$(mktemp -d /tmp/swgpu-nccl-test.XXXXXX)"
trap 'rm -rf "$dir"' EXIT
"$cxx" "${flags[@]}" -fPIC -shared -fvisibility=hidden -Wl,-soname,libnccl.so.2 -o "$dir/libnccl.so.2" "$here/nccl.cpp" -ldl -lrt
"$cxx" "${flags[@]}" -fPIC -shared -fvisibility=hidden -Wl,-soname,libcuda.so.1 -o "$dir/libcuda.so.1" "$here/../driver/cuda.cpp" -ldl
"$cxx" "${flags[@]}" -o "$dir/nccl-test" "$here/test.cpp" -ldl
"$dir/nccl-test" "$dir"
