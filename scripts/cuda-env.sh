#!/usr/bin/env bash
# Runs a command with the CUDA libraries of a Python-wheel install (what a PyTorch install brings:
# site-packages/nvidia/{cu13,cudnn,nccl}/lib) on LD_LIBRARY_PATH, plus the two symlink shims cudarc
# needs: libnccl.so (the wheel ships only libnccl.so.2) and libnvToolsExt.so.1 (from libnvtx3interop).
# Usage: scripts/cuda-env.sh target/release/lewel info
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: scripts/cuda-env.sh CMD [ARGS...]" >&2; exit 2; }
py=${PYTHON:-python3}
site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null || true)
nv="$site/nvidia"
shim="${TMPDIR:-/tmp}/lewel-cuda-shim-$(id -u)"
mkdir -p "$shim"
paths=()
for d in "$nv/cu13/lib" "$nv/cudnn/lib" "$nv/nccl/lib"; do
  [ -d "$d" ] && paths+=("$d")
done
[ -e "$nv/nccl/lib/libnccl.so.2" ] && ln -sf "$nv/nccl/lib/libnccl.so.2" "$shim/libnccl.so"
[ -e "$nv/cu13/lib/libnvtx3interop.so.1" ] && ln -sf "$nv/cu13/lib/libnvtx3interop.so.1" "$shim/libnvToolsExt.so.1"
if [ ${#paths[@]} -eq 0 ]; then
  echo "scripts/cuda-env.sh: no CUDA wheels under $nv (pip install torch, or the nvidia-* wheels)" >&2
fi
joined=$(IFS=:; echo "${paths[*]:-}")
export LD_LIBRARY_PATH="$shim${joined:+:$joined}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$@"
