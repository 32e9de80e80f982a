#!/usr/bin/env bash
# The GPU evidence of one sitting, in one call on a lent GPU machine (no Rust there). Build here and
# strip the binary (52 MB with its debug info, 4.5 MB without; a carry holds 64 MiB with the tree):
#
#   cargo build --release && strip -o target/lewel-gpu target/release/lewel
#   cargo bench --bench loader --no-run 2>&1 | grep -o 'target/release/deps/loader-[0-9a-f]*' |
#     head -1 | xargs -I{} strip -o target/loader-bench {}
#   # device run, carry ["target/lewel-gpu", "target/loader-bench"]:
#   LEWEL=target/lewel-gpu bash scripts/gpu-evidence.sh   # logs and run folders under $OUT
#   DEVICE=cpu SMALL=1 bash scripts/gpu-evidence.sh       # a dry run of the script on a CPU
#
# The binary needs glibc 2.34 (built on Debian 12); the device image's Python 3.12 suggests Ubuntu
# 24.04 (glibc 2.39): not yet tried there.
#
# Steps, most wanted first, each under its own time limit and all within BUDGET seconds (default
# 540, under the device tool's 600 s per call):
#   1. nvidia-smi and `lewel info`;
#   2. `lewel check`: every GPU op, the photometric augmentation (from pageable and from pinned
#      memory), a whole step and a deterministic rerun against the CPU;
#   3. the built-in run on the GPU, bf16, 2 epochs, with LEWEL_CUDNN_LOG=1;
#   4. an ImageFolder of photo-like 500x375 JPEGs with 1% corrupt and some odd files
#      (scripts/make_jpeg_folder.py), then ResNet-50 on it for one epoch with the crops in pinned
#      memory and again with --no-pin-memory (the step time and data wait of each);
#   5. `cargo bench --bench loader` on that machine's CPU (when target/loader-bench was carried):
#      decode and augmentation images/s per core there;
#   6. the built-in run in f32, 2 epochs;
#   7. scripts/gpu-cases.sh: the cases tests/software_gpu.rs runs on the software GPU (f32 and bf16
#      against the CPU, --deterministic twice and a resume bit for bit, an ImageFolder through the
#      pinned crop buffers), with the same bounds.
# The last lines are a table of every step and run (scripts/metrics_summary.py).
set -uo pipefail
L=${LEWEL:-target/release/lewel}
O=${OUT:-/tmp/lewel-evidence}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-540}
mkdir -p "$O"
[ -x "$L" ] || { echo "gpu-evidence: $L not found (build with cargo build --release and carry it)" >&2; exit 2; }
if [ -n "${SMALL:-}" ]; then
  arch=tiny; size=64; batch=32; classes=4; per=64; val=10
else
  arch=resnet50; size=224; batch=128; classes=10; per=256; val=30
fi
wrap=()
[ "$DEVICE" = cpu ] || wrap=(bash scripts/cuda-env.sh)
start=$SECONDS
rows=()

# step NAME LIMIT CMD...: runs CMD under min(LIMIT, what is left of the budget), output in NAME.log.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - (SECONDS - start) - 15))
  if [ "$left" -lt 20 ]; then
    rows+=("$name | skipped: budget spent")
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS
  timeout "$limit" "${wrap[@]}" "$@" >"$O/$name.log" 2>&1
  local rc=$?
  local what="rc $rc"
  [ "$rc" = 124 ] && what="timed out at ${limit}s"
  rows+=("$name | $what | $((SECONDS - t0)) s")
  echo "== $name ($what, $((SECONDS - t0)) s)"
  tail -n 4 "$O/$name.log"
}

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.used,memory.total --format=csv >"$O/nvidia-smi.csv" 2>&1
step info 30 "$L" info
step check 200 "$L" check
step syn-bf16 90 env LEWEL_CUDNN_LOG=1 "$L" pretrain --device "$DEVICE" --epochs 2 --warmup-epochs 1 --out "$O/syn-bf16"
D="$O/jpegs"
step make-data 60 python3 scripts/make_jpeg_folder.py "$D" --classes "$classes" --per-class "$per" --val-per-class "$val"
common=(pretrain --data "$D" --device "$DEVICE" --arch "$arch" --image-size "$size" --batch-size "$batch" --epochs 1 --warmup-epochs 0 --log-every 5)
step data-pinned 150 "$L" "${common[@]}" --out "$O/data-pinned"
step data-pageable 120 "$L" "${common[@]}" --no-pin-memory --out "$O/data-pageable"
B=${LOADER_BENCH:-target/loader-bench}
[ -x "$B" ] && step loader-bench 150 "$B"
[ "$DEVICE" = cpu ] || step syn-f32 90 "$L" pretrain --device "$DEVICE" --precision f32 --epochs 2 --warmup-epochs 1 --out "$O/syn-f32"
[ "$DEVICE" = cpu ] || step cases 120 bash scripts/gpu-cases.sh "$L" "$O/cases"

echo
echo "step | result | wall"
printf '%s\n' "${rows[@]}"
[ -f "$O/nvidia-smi.csv" ] && cat "$O/nvidia-smi.csv"
# lewel check: the rows that did not pass, and its count line.
grep -vE " ok$" "$O/check.log" 2>/dev/null | tail -n 12
[ -f "$O/loader-bench.log" ] && grep -E "^\|" "$O/loader-bench.log"
python3 scripts/metrics_summary.py "$O"/syn-bf16 "$O"/data-pinned "$O"/data-pageable "$O"/syn-f32
