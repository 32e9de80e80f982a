#!/usr/bin/env bash
# Builds the software GPU's cuBLAS and cuDNN stand-ins: libcublas.so.13 and libcudnn.so.9 in OUTDIR
# (plus the unversioned names cudarc tries first). Usage: swgpu/blas/build.sh OUTDIR [--asan]
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-}"
if [ -z "$out" ]; then
    echo "usage: swgpu/blas/build.sh OUTDIR [--asan]" >&2
    exit 2
fi
shift
flags=(-O2 -g -ffp-contract=off -fPIC -shared -std=c++17 -Wall -Wextra -Wno-psabi -fvisibility=hidden -pthread)
for a in "$@"; do
    case "$a" in
        --asan) flags+=(-fsanitize=address -fno-omit-frame-pointer) ;;
        *) echo "swgpu/blas/build.sh: unknown option $a" >&2; exit 2 ;;
    esac
done
cxx="${CXX:-g++}"
if ! command -v "$cxx" >/dev/null 2>&1; then
    echo "swgpu/blas/build.sh: $cxx not found (install g++ or set CXX)" >&2
    exit 2
fi
mkdir -p "$out" || { echo "swgpu/blas/build.sh: cannot create $out" >&2; exit 2; }
build() {  # source soname
    local log
    if ! log="$("$cxx" "${flags[@]}" -Wl,-soname,"$2" -o "$out/$2" "$here/$1" -ldl 2>&1)"; then
        printf '%s\n' "$log" >&2
        echo "swgpu/blas/build.sh: building $2 from swgpu/blas/$1 failed" >&2
        return 1
    fi
    [ -n "$log" ] && printf '%s\n' "$log" >&2
    return 0
}
build cublas.cpp libcublas.so.13 &
p1=$!
build cudnn.cpp libcudnn.so.9 &
p2=$!
ok=0
wait $p1 || ok=1
wait $p2 || ok=1
[ $ok -eq 0 ] || exit 2
ln -sf libcublas.so.13 "$out/libcublas.so"
ln -sf libcudnn.so.9 "$out/libcudnn.so"
