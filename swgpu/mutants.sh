#!/usr/bin/env bash
# Mutation test of the software GPU: each mutant is one small, typical kernel bug applied to a copy
# of kernels/; the software GPU is built from that copy and `lewel check` (only the sections the
# mutant touches, by $LEWEL_CHECK_ONLY) must FAIL. Prints mutant -> caught/missed; exits 1 when one
# is missed (or did not apply or build).
#
# Caught means: the software GPU or ASan reported something, lewel crashed, or a table row failed
# that does not fail on the unmutated kernels (a baseline run with the same sections first: rows
# that fail anyway, such as the whole-step checks while they do, prove nothing).
#
# The lewel binary is not rebuilt: it embeds the unmutated kernel sources (build.rs), so the run sets
# SWGPU_ALLOW_SOURCE_MISMATCH=1, which lets the stand-in load kernel libraries built from other
# sources than the ones lewel embeds. Only this script sets it.
#
# Usage: swgpu/mutants.sh [LEWEL_BINARY]   (default target/release/lewel)
# Env: SWGPU_SCHEDULE, SWGPU_ASAN as for scripts/emu-env.sh; MUTANTS="name name" runs a subset;
#      RUST_MUTANTS=1 adds the three Rust-side mutants (lewel rebuilt for each, in $MUTANTS_TARGET_DIR,
#      default target/mutants).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
lewel=${1:-$repo/target/release/lewel}
[ -x "$lewel" ] || { echo "usage: swgpu/mutants.sh [LEWEL_BINARY]  ($lewel is not an executable; cargo build --release)" >&2; exit 2; }
lewel=$(cd "$(dirname "$lewel")" && pwd)/$(basename "$lewel")
tmp=$(mktemp -d "${TMPDIR:-/tmp}/swgpu-mutants.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
results=()
missed=0

# drop_sync FUNCTION N FILE: deletes the Nth `__syncthreads();` line inside FUNCTION's body.
drop_sync() {
  awk -v fn="$1" -v n="$2" '
    index($0, fn "(") && /__device__/ { inside = 1; seen = 0 }
    inside && /__syncthreads\(\);/ { seen++; if (seen == n) { inside = 0; next } }
    inside && /^}/ { inside = 0 }
    { print }' "$3" > "$3.new" && mv "$3.new" "$3"
}

# failing_rows LOG: the table rows that failed (op, dtype and output columns), sorted.
failing_rows() {
  awk '/^op +dtype +output/ { table = 1; next }
       table && / checks, [0-9]+ failed/ { table = 0 }
       table && !/  ok$/ { print substr($0, 1, 60) }' "$1" | sort -u
}

# check_run KERNEL_DIR ROWS LOG: lewel check on the software GPU built from KERNEL_DIR.
check_run() {
  SWGPU_KERNEL_SRC=$1 SWGPU_BUILD_ROOT=$tmp/builds SWGPU_ALLOW_SOURCE_MISMATCH=1 LEWEL_CHECK_ONLY=$2 \
    "$repo/scripts/emu-env.sh" "$lewel" check --ops-only >"$3" 2>&1
}

# The baseline: every section any mutant runs, on the unmutated kernels.
all_rows="loss,LARS,softmax"
[ "${RUST_MUTANTS:-0}" = 1 ] && all_rows="$all_rows,linear,conv,augment"
echo "swgpu/mutants.sh: baseline run (sections $all_rows, unmutated kernels)" >&2
check_run "$repo/kernels" "$all_rows" "$tmp/baseline.log" || true
if ! grep -qE ' checks, [0-9]+ failed' "$tmp/baseline.log"; then
  tail -n 20 "$tmp/baseline.log" >&2
  echo "swgpu/mutants.sh: the baseline run did not finish (above)" >&2
  exit 1
fi
failing_rows "$tmp/baseline.log" >"$tmp/baseline.rows"
if [ -s "$tmp/baseline.rows" ]; then
  echo "swgpu/mutants.sh: rows failing without any mutant (ignored below):" >&2
  sed 's/^/    /' "$tmp/baseline.rows" >&2
fi

# mutant NAME ROWS DESCRIPTION FILE CMD...: copies kernels/, runs CMD (with FILE as its last argument)
# on the copy of kernels/FILE, builds and runs `lewel check` on sections matching ROWS.
mutant() {
  local name=$1 rows=$2 what=$3 file=$4
  shift 4
  if [ -n "${MUTANTS:-}" ] && [[ " $MUTANTS " != *" $name "* ]]; then return; fi
  local dir=$tmp/$name
  mkdir -p "$dir"
  cp -r "$repo/kernels" "$dir/kernels"
  "$@" "$dir/kernels/$file"
  if cmp -s "$repo/kernels/$file" "$dir/kernels/$file"; then
    results+=("$(printf '%-16s %-8s %s' "$name" "ERROR" "the edit did not apply to kernels/$file")")
    missed=$((missed + 1))
    return
  fi
  local log=$dir/check.log t0=$SECONDS rc=0
  check_run "$dir/kernels" "$rows" "$log" || rc=$?
  judge "$name" "$what" "$log" "$rc" "$t0"
}

# judge NAME DESCRIPTION LOG RC T0: records caught/missed from a check run's log and exit code.
judge() {
  local name=$1 what=$2 log=$3 rc=$4 t0=$5
  local why new_rows
  if grep -q "building the software GPU failed" "$log"; then
    results+=("$(printf '%-16s %-8s %s' "$name" "ERROR" "the mutant did not build (log: kept below)")")
    sed 's/^/    /' "$log" | tail -n 15 >&2
    missed=$((missed + 1))
    return
  fi
  # what failed: a software-GPU or AddressSanitizer report, a crash, or a row the baseline passes
  new_rows=$(failing_rows "$log" | comm -23 - "$tmp/baseline.rows")
  why=$(grep -m1 -E '^swgpu: |ERROR: AddressSanitizer' "$log" || true)
  if [ -z "$why" ] && [ -n "$new_rows" ]; then
    why="$(echo "$new_rows" | wc -l) new failing row(s), first: $(echo "$new_rows" | head -1 | tr -s ' ')"
  fi
  if [ -z "$why" ] && [ $rc -ne 0 ] && ! grep -qE ' checks, [0-9]+ failed' "$log"; then
    why="lewel ended without its table (exit $rc): $(tail -n 1 "$log")"
  fi
  why=$(echo "$why" | cut -c1-160)
  if [ -n "$why" ]; then
    results+=("$(printf '%-16s %-8s %4ss  %s | %s' "$name" "caught" $((SECONDS - t0)) "$what" "$why")")
  else
    results+=("$(printf '%-16s %-8s %4ss  %s' "$name" "MISSED" $((SECONDS - t0)) "$what")")
    missed=$((missed + 1))
  fi
}

sedit() { local expr=$1 f=$2; sed -E -i "$expr" "$f"; }

mutant sync-first "loss,LARS" "block_sum without its first __syncthreads (scratch reused while read)" \
  common.cuh drop_sync block_sum 1
mutant sync-second "loss,LARS" "block_sum without its second __syncthreads (read before written)" \
  common.cuh drop_sync block_sum 2
mutant shared-short "loss" "loss_reduce's scratch[32] one element short for its 32 warps" \
  loss.cu sedit '/void loss_reduce\(/,/^}/ s/scratch\[32\]/scratch[31]/'
mutant off-by-one "softmax" "softmax_fwd's max loop reads one position past the column (q <= l)" \
  softmax.cu sedit '0,/q < p\.l; q\+\+\) m = fmaxf/ s/q < p\.l; q\+\+\) m = fmaxf/q <= p.l; q++) m = fmaxf/'
mutant shfl-offset "softmax,loss" "warp_sum starts at offset WARP/4 (skips the 16-lane step)" \
  common.cuh sedit '/float warp_sum\(/,/^}/ s/int o = WARP \/ 2/int o = WARP \/ 4/'
mutant shfl-width "softmax,loss" "warp_sum shuffles with width 16 instead of the whole warp" \
  common.cuh sedit '/float warp_sum\(/,/^}/ s/__shfl_xor_sync\(FULL_MASK, v, o\)/__shfl_xor_sync(FULL_MASK, v, o, 16)/'

# rust_mutant NAME ROWS DESCRIPTION FILE SED_EXPR: a bug in how the Rust side calls a library.
# lewel is rebuilt from a copy of the sources with one edit to FILE (the kernels are unchanged, so
# no source-hash override), in target/mutants (its first build compiles the dependencies, minutes;
# later ones only lewel), then judged as `mutant` judges. Only with RUST_MUTANTS=1 (needs cargo).
rust_mutant() {
  local name=$1 rows=$2 what=$3 file=$4 expr=$5
  if [ "${RUST_MUTANTS:-0}" != 1 ]; then return; fi
  if [ -n "${MUTANTS:-}" ] && [[ " $MUTANTS " != *" $name "* ]]; then return; fi
  local dir=$tmp/$name
  mkdir -p "$dir/repo"
  (cd "$repo" && cp -r Cargo.toml Cargo.lock build.rs src kernels benches "$dir/repo/")
  sed -E -i "$expr" "$dir/repo/$file"
  if cmp -s "$repo/$file" "$dir/repo/$file"; then
    results+=("$(printf '%-16s %-8s %s' "$name" "ERROR" "the edit did not apply to $file")")
    missed=$((missed + 1))
    return
  fi
  local t0=$SECONDS rc=0 target=${MUTANTS_TARGET_DIR:-$repo/target/mutants}
  local bin=$target/release/lewel
  if ! CARGO_TARGET_DIR=$target cargo build --release --quiet --bin lewel \
    --manifest-path "$dir/repo/Cargo.toml" >"$dir/build.log" 2>&1; then
    results+=("$(printf '%-16s %-8s %s' "$name" "ERROR" "lewel did not build (log: $dir/build.log)")")
    tail -n 15 "$dir/build.log" >&2
    missed=$((missed + 1))
    return
  fi
  SWGPU_BUILD_ROOT=$tmp/builds LEWEL_CHECK_ONLY=$rows "$repo/scripts/emu-env.sh" "$bin" check --ops-only \
    >"$dir/check.log" 2>&1 || rc=$?
  judge "$name" "$what" "$dir/check.log" "$rc" "$t0"
}

rust_mutant gemm-transpose "linear" "cuBLAS GEMM with transa and transb swapped (src/gpu/mod.rs)" \
  src/gpu/mod.rs 's/transa: if tb \{/transa: if ta {/; s/transb: if ta \{/transb: if tb {/'
rust_mutant filter-format "conv" "conv filter descriptor NCHW instead of NHWC (src/ops/conv.rs)" \
  src/ops/conv.rs 's/create_4d_filter::<T>\(nhwc,/create_4d_filter::<T>(cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,/'
rust_mutant crop-event "augment" "no event recorded behind a pinned upload (src/data/pinned.rs)" \
  src/data/pinned.rs '/fn upload_to\(/,/^    }/ s/^( *)self\.queued\(stream\)$/\1Ok(())/'

printf '%s\n' "mutant           result   time  what | first failure" "${results[@]}"
if [ $missed -gt 0 ]; then
  echo "swgpu/mutants.sh: $missed mutant(s) not caught" >&2
  exit 1
fi
echo "swgpu/mutants.sh: every mutant was caught"
