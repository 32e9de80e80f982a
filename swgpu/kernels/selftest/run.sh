#!/usr/bin/env bash
# swgpu self-test: builds the software GPU from this folder's bugs.cu and runs selftest.cpp against
# it under each schedule (and the ASan build with SWGPU_ASAN=1).
# Usage: swgpu/kernels/selftest/run.sh
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
swgpu=$(cd "$here/../.." && pwd)
out=$(mktemp -d "${TMPDIR:-/tmp}/swgpu-selftest.XXXXXX")
trap 'rm -rf "$out"' EXIT
args=("$out")
[ "${SWGPU_ASAN:-0}" = 1 ] && args+=(--asan)
SWGPU_KERNEL_SRC=$here bash "$swgpu/build.sh" "${args[@]}" >/dev/null
flags=(-O1 -g)
[ "${SWGPU_ASAN:-0}" = 1 ] && flags+=(-fsanitize=address)
g++ "${flags[@]}" -o "$out/selftest" "$here/selftest.cpp" -L"$out" -l:libcuda.so.1 -l:libnvrtc.so.13 -Wl,-rpath,"$out"
for s in forward reverse random:1 random:2; do
  echo "== SWGPU_SCHEDULE=$s"
  SWGPU_SCHEDULE=$s SWGPU_KERNELS=$out/kernels ASAN_OPTIONS=detect_leaks=0 \
    SELFTEST_ASAN=${SWGPU_ASAN:-} "$out/selftest" "$here" 2>"$out/stderr.txt" || { cat "$out/stderr.txt"; exit 1; }
done
if [ "${SWGPU_ASAN:-0}" = 1 ]; then
  echo "== ASan: a __shared__ overflow must end the process with an AddressSanitizer report"
  if SWGPU_KERNELS=$out/kernels ASAN_OPTIONS=detect_leaks=0 "$out/selftest" "$here" overflow 2>"$out/asan.txt" ||
    ! grep -q "ERROR: AddressSanitizer: heap-buffer-overflow" "$out/asan.txt"; then
    cat "$out/asan.txt"
    echo "selftest FAILED: no AddressSanitizer report for the overflow"
    exit 1
  fi
  grep -m1 "ERROR: AddressSanitizer" "$out/asan.txt"
  grep -m1 -E "#[0-9]+ .*kernels/selftest/bugs.cu|bugs.cu:[0-9]+" "$out/asan.txt" || true
  echo "selftest ok: ASan reports the overflow"
fi
echo "== reports printed by the last run:"
cat "$out/stderr.txt"
