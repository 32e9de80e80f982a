#!/usr/bin/env bash
# Runs a command on the software GPU (swgpu/README.md): stand-in libcuda, libnvrtc, libcublas and
# libcudnn libraries that execute the GPU path on the CPU, as scripts/cuda-env.sh runs one with the
# real CUDA libraries. Builds them on first use and again whenever swgpu/ or kernels/ change (cached
# under target/swgpu/<hash of the sources and options>/).
# Usage: scripts/emu-env.sh target/release/lewel check
# Env: SWGPU_ASAN=1            build and run the AddressSanitizer variant
#      SWGPU_SCHEDULE=forward|reverse|random:SEED   thread, warp and block order (default forward)
#      SWGPU_KERNEL_SRC=DIR    build the kernels from DIR instead of kernels/ (swgpu/mutants.sh)
#      SWGPU_BUILD_ROOT=DIR    where builds are cached (default target/swgpu)
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: scripts/emu-env.sh CMD [ARGS...]  (runs CMD on the software GPU)" >&2; exit 2; }
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cxx=${CXX:-g++}
command -v "$cxx" >/dev/null 2>&1 || {
  echo "scripts/emu-env.sh: no C++ compiler: the software GPU is built from source with $cxx (apt-get install g++)" >&2
  exit 2
}
asan=${SWGPU_ASAN:-0}
[ "$asan" = 0 ] || [ "$asan" = 1 ] || { echo "scripts/emu-env.sh: SWGPU_ASAN must be 0 or 1" >&2; exit 2; }
src=${SWGPU_KERNEL_SRC:-$repo/kernels}
[ -f "$src/common.cuh" ] || { echo "scripts/emu-env.sh: no kernel sources in $src" >&2; exit 2; }
src=$(cd "$src" && pwd)

key=$({
  cd "$repo" && find swgpu -path swgpu/kernels/selftest -prune -o -type f \( -name '*.cpp' -o -name '*.cc' -o -name '*.c' -o -name '*.h' -o -name 'build.sh' \) -print |
    LC_ALL=C sort | xargs sha256sum
  cd "$src" && sha256sum common.cuh ./*.cu
  echo "asan=$asan"
  "$cxx" --version | head -1
} | sha256sum | cut -c1-16)
root=${SWGPU_BUILD_ROOT:-$repo/target/swgpu}
build=$root/$key
mkdir -p "$root"
if [ ! -f "$build/.complete" ]; then
  exec 9>"$root/.lock"
  flock 9 2>/dev/null || true
  if [ ! -f "$build/.complete" ]; then
    echo "scripts/emu-env.sh: building the software GPU ($([ "$asan" = 1 ] && echo "AddressSanitizer, ")kernels from $src) in $build" >&2
    rm -rf "$build"
    log=$root/$key.log
    args=("$build")
    [ "$asan" = 1 ] && args+=(--asan)
    if ! SWGPU_KERNEL_SRC=$src CXX=$cxx bash "$repo/swgpu/build.sh" "${args[@]}" >"$log" 2>&1; then
      tail -n 30 "$log" >&2
      echo "scripts/emu-env.sh: building the software GPU failed (full log: $log)" >&2
      exit 2
    fi
    touch "$build/.complete"
    # builds of sources nobody has used for two days go
    find "$root" -mindepth 1 -maxdepth 1 -name '????????????????*' -mtime +1 -exec rm -rf {} + 2>/dev/null || true
  fi
  exec 9>&-
fi

export LD_LIBRARY_PATH="$build${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export SWGPU_KERNELS="$build/kernels"
export LEWEL_CACHE_DIR="$build/cache"
if [ "$asan" = 1 ]; then
  # The program itself is not instrumented: the runtime comes first, by LD_PRELOAD.
  rt=$("$cxx" -print-file-name=libasan.so)
  rt=$(readlink -f "$rt")
  [ -f "$rt" ] || { echo "scripts/emu-env.sh: SWGPU_ASAN=1 needs the AddressSanitizer runtime ($cxx -print-file-name=libasan.so found none)" >&2; exit 2; }
  export LD_PRELOAD="$rt${LD_PRELOAD:+:$LD_PRELOAD}"
  export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=0:detect_odr_violation=0:halt_on_error=1:abort_on_error=0}"
fi
exec "$@"
