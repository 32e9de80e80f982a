#!/usr/bin/env bash
# The cases tests/software_gpu.rs runs on the software GPU, as one script for a real GPU (no Rust
# there): the same commands, the same bounds, so the two are compared on the same cases.
#   bash scripts/gpu-cases.sh LEWEL OUTDIR            (on a GPU machine: scripts/gpu-evidence.sh)
#   bash scripts/emu-env.sh bash scripts/gpu-cases.sh target/release/lewel /tmp/cases   (here)
# 1. the small built-in run, --device cuda f32 and bf16 against the CPU: step 1 within 1e-3 (f32)
#    or 5e-2 (bf16) relative, steps 2-4 within 25%, the loss falls;
# 2. --deterministic twice, and a run stopped after epoch 1 and resumed: losses and weights bit for bit;
# 3. an ImageFolder through the pinned crop buffers, f32, against the CPU: step 1 within 1e-3.
# Prints one line per case and exits 1 if one fails.
set -uo pipefail
L=${1:?usage: gpu-cases.sh LEWEL OUTDIR}
O=${2:?usage: gpu-cases.sh LEWEL OUTDIR}
rm -rf "$O" && mkdir -p "$O"
small=(pretrain --train-len 32 --val-len 16 --knn-memory 32 --knn-k 5 --batch-size 8 --epochs 2
  --warmup-epochs 1 --image-size 32 --log-every=1)
fail=0
run() { "$L" "$@" >"$O/last.log" 2>&1 || { echo "FAILED: lewel $*"; tail -n 5 "$O/last.log"; fail=1; }; }
# compare NAME CPU GPU FIRST [LATER]: step losses of two run folders.
compare() {
  python3 - "$@" <<'PY' || fail=1
import json, sys
name, a, b, first = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
later = float(sys.argv[5]) if len(sys.argv) > 5 else None
def losses(d):
    return [json.loads(l)["loss"] for l in open(d + "/metrics.jsonl") if '"step"' in l]
c, g = losses(a), losses(b)
rel = [abs(x - y) / abs(x) for x, y in zip(c, g)]
ok = len(c) == len(g) and rel[0] <= first and all(v == v for v in g)
if later is not None:
    ok = ok and all(r <= later for r in rel[1:4]) and g[-1] < g[0]
print(f"{'ok    ' if ok else 'FAILED'} {name}: step 1 rel {rel[0]:.2e} (bound {first:g}); rel by step "
      + " ".join(f"{r:.1e}" for r in rel))
sys.exit(0 if ok else 1)
PY
}
run "${small[@]}" --device cpu --out "$O/cpu"
run "${small[@]}" --device cuda --precision f32 --out "$O/f32"
run "${small[@]}" --device cuda --precision bf16 --out "$O/bf16"
compare "built-in run, f32 against the CPU" "$O/cpu" "$O/f32" 1e-3 0.25
compare "built-in run, bf16 against the CPU" "$O/cpu" "$O/bf16" 5e-2 0.25

det=(--device cuda --deterministic)
run "${small[@]}" "${det[@]}" --out "$O/det-a"
run "${small[@]}" "${det[@]}" --out "$O/det-b"
run "${small[@]}" "${det[@]}" --out "$O/det-split" --stop-after 1
run pretrain --resume "$O/det-split"
same() {
  if cmp -s "$2" "$3"; then echo "ok     $1"; else echo "FAILED $1"; fail=1; fi
}
steps() { grep '"step"' "$1/metrics.jsonl" | python3 -c 'import json,sys; print([json.loads(l)["loss"] for l in sys.stdin])'; }
same "--deterministic twice: losses bit for bit" <(steps "$O/det-a") <(steps "$O/det-b")
same "--deterministic twice: weights bit for bit" "$O/det-a/checkpoint_0002.safetensors" "$O/det-b/checkpoint_0002.safetensors"
same "stopped after epoch 1 and resumed: losses bit for bit" <(steps "$O/det-a") <(steps "$O/det-split")
same "stopped after epoch 1 and resumed: weights bit for bit" "$O/det-a/checkpoint_0002.safetensors" "$O/det-split/checkpoint_0002.safetensors"

if ! python3 -c 'import numpy, PIL' 2>/dev/null; then
  echo "skipped ImageFolder case: scripts/make_jpeg_folder.py needs numpy and Pillow"
elif python3 "$(dirname "$0")/make_jpeg_folder.py" "$O/jpegs" --classes 3 --per-class 16 --val-per-class 0 >"$O/make.log" 2>&1; then
  real=(pretrain --data "$O/jpegs/train" --batch-size 8 --epochs 2 --warmup-epochs 1 --image-size 32
    --log-every=1 --loader-threads 2 --precision f32)
  run "${real[@]}" --device cpu --out "$O/real-cpu"
  run "${real[@]}" --device cuda --out "$O/real-gpu"
  compare "ImageFolder through pinned crop buffers, f32 against the CPU" "$O/real-cpu" "$O/real-gpu" 1e-3
else
  echo "FAILED making the image folder"; tail -n 3 "$O/make.log"; fail=1
fi
exit $fail
