#!/usr/bin/env bash
# Whole LEWEL training steps, lewel against PyTorch, on the same device in the same run.
#
# Each round runs `lewel bench ... --json` and then tests/parity/bench_step.py (our independent
# PyTorch formulation of the same step: online and target forward of both views, the loss,
# backward, LARS with its exclusions, the EMA) with the same arch, method, batch, size, steps and
# warm-up, one after the other, so both see the machine in the same state. The table gives each
# round's median step of each engine and the ratio pytorch / lewel (above 1: lewel is faster), then
# the median over the rounds. Both engines time random views prepared once (no data time).
#
# With OFFICIAL=DIR (a checkout of the official code, github.com/LayneH/LEWEL at 4ee47eb) each round
# also runs tests/parity/bench_official.py, which imports that checkout's own modules (nothing of
# it is copied here: it is CC-BY-NC-4.0) and times their training step as their main.py drives it
# for LEWEL-B EMAN: their model class, parameter groups and LARS, DDP over a one-process group,
# their train() loop with its EMAN target update. Its columns: official s/step and official / lewel.
# A configuration their code cannot run (ARCH=tiny: no such backbone there) prints one line and
# leaves the official columns out.
#
#   cargo build --release
#   bash scripts/bench-vs-pytorch.sh                                  # ResNet-50, 64 px, batch 16, CPU
#   ARCH=tiny BATCH=64 SIZE=48 ROUNDS=5 bash scripts/bench-vs-pytorch.sh
#   bash scripts/bench-vs-pytorch.sh --arch resnet18 --batch 32 --channels-last
#   DEVICE=cuda BATCH=256 SIZE=224 bash scripts/bench-vs-pytorch.sh   # PyTorch in AMP bf16, channels_last
#
# Settings (a flag overrides its environment variable):
#   LEWEL    --lewel PATH       the lewel binary                       [target/release/lewel]
#   PYTHON   --python PATH      a Python with torch                    [python3]
#   ARCH     --arch A           tiny, resnet18 or resnet50             [resnet50]
#   METHOD   --method M         lewel-b-eman or lewel-b                [lewel-b-eman]
#   BATCH    --batch N          samples per step (two views each)      [16]
#   SIZE     --size N           side of the views in pixels            [64]
#   STEPS    --steps N          measured steps per run (median taken)  [5]
#   WARMUP   --warmup N         unmeasured steps first                 [1]
#   ROUNDS   --rounds N         alternating rounds                     [3]
#   DEVICE   --device D         cpu, cuda or cuda:N                    [cpu]
#   CHANNELS_LAST=1 --channels-last   PyTorch on the CPU stores activations NHWC (oneDNN's layout;
#                               always on for cuda, with --bf16 autocast)
#   THREADS  --threads N        threads of both engines (RAYON_NUM_THREADS for lewel,
#                               torch.set_num_threads); 0: each its default  [0]
#   OUT      --out FILE         append every run's JSON line to FILE
#   BASE     --base PATH        a second lewel binary (an older build: before/after in one run);
#                               it runs first in each round and gets its own columns
#   OFFICIAL --official DIR     a checkout of the official LEWEL code: its own step gets columns too
#
# On cuda, lewel runs at `--precision auto` (bf16 from compute capability 8.0) and PyTorch in
# autocast bf16 with channels_last; the official code takes its --amp path (autocast + GradScaler)
# with autocast in bf16, and channels_last. CI does not run this script (it needs torch).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

LEWEL=${LEWEL:-target/release/lewel}
PYTHON=${PYTHON:-python3}
ARCH=${ARCH:-resnet50}
METHOD=${METHOD:-lewel-b-eman}
BATCH=${BATCH:-16}
SIZE=${SIZE:-64}
STEPS=${STEPS:-5}
WARMUP=${WARMUP:-1}
ROUNDS=${ROUNDS:-3}
DEVICE=${DEVICE:-cpu}
CHANNELS_LAST=${CHANNELS_LAST:-0}
THREADS=${THREADS:-0}
OUT=${OUT:-}
OFFICIAL=${OFFICIAL:-}
BASE=${BASE:-}

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
}

die() {
    echo "bench-vs-pytorch: $*" >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case $1 in
    --lewel) LEWEL=${2:?--lewel needs a value}; shift 2 ;;
    --python) PYTHON=${2:?--python needs a value}; shift 2 ;;
    --arch) ARCH=${2:?--arch needs a value}; shift 2 ;;
    --method) METHOD=${2:?--method needs a value}; shift 2 ;;
    --batch) BATCH=${2:?--batch needs a value}; shift 2 ;;
    --size) SIZE=${2:?--size needs a value}; shift 2 ;;
    --steps) STEPS=${2:?--steps needs a value}; shift 2 ;;
    --warmup) WARMUP=${2:?--warmup needs a value}; shift 2 ;;
    --rounds) ROUNDS=${2:?--rounds needs a value}; shift 2 ;;
    --device) DEVICE=${2:?--device needs a value}; shift 2 ;;
    --channels-last) CHANNELS_LAST=1; shift ;;
    --threads) THREADS=${2:?--threads needs a value}; shift 2 ;;
    --out) OUT=${2:?--out needs a value}; shift 2 ;;
    --official) OFFICIAL=${2:?--official needs a value}; shift 2 ;;
    --base) BASE=${2:?--base needs a value}; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument $1 (--help lists them)" ;;
    esac
done

for v in BATCH SIZE STEPS WARMUP ROUNDS THREADS; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v: a whole number, got '${!v}'"
done
[ "$ROUNDS" -ge 1 ] || die "ROUNDS: at least 1"
[ "$STEPS" -ge 1 ] || die "STEPS: at least 1"
case $DEVICE in
cpu | cuda | cuda:[0-9]*) ;;
*) die "DEVICE: cpu, cuda or cuda:N, got '$DEVICE'" ;;
esac
[ -x "$LEWEL" ] || die "no lewel binary at $LEWEL: cargo build --release (or LEWEL=path)"
[ -z "$BASE" ] || [ -x "$BASE" ] || die "BASE: no lewel binary at $BASE"
command -v "$PYTHON" >/dev/null || die "no $PYTHON (PYTHON=path to a Python with torch)"
"$PYTHON" -c 'import torch' 2>/dev/null || die "$PYTHON cannot import torch (PYTHON=path to a Python with torch)"

# One key of a JSON object on stdin: jq where there is one, else python3.
json_get() {
    if command -v jq >/dev/null; then
        jq -cr ".$1"
    else
        python3 -c 'import json, sys; v = json.load(sys.stdin)[sys.argv[1]]; print(v if isinstance(v, str) else json.dumps(v))' "$1"
    fi
}

lewel_cmd=("$LEWEL" bench --device "$DEVICE" --arch "$ARCH" --method "$METHOD"
    --batch-size "$BATCH" --image-size "$SIZE" --steps "$STEPS" --warmup "$WARMUP" --json)
# The options of both PyTorch drivers (bench_step.py, bench_official.py).
torch_args=(--device "$DEVICE" --arch "$ARCH" --method "$METHOD"
    --batch "$BATCH" --size "$SIZE" --steps "$STEPS" --warmup "$WARMUP" --json)
if [ "$DEVICE" != cpu ]; then
    torch_args+=(--bf16 --channels-last)
elif [ "$CHANNELS_LAST" = 1 ]; then
    torch_args+=(--channels-last)
fi
lewel_env=()
if [ "$THREADS" -gt 0 ]; then
    torch_args+=(--threads "$THREADS")
    lewel_env=(RAYON_NUM_THREADS="$THREADS")
fi
torch_cmd=("$PYTHON" tests/parity/bench_step.py "${torch_args[@]}")

# The official code's step (tests/parity/bench_official.py): the same options, precision as above.
official_cmd=()
if [ -n "$OFFICIAL" ]; then
    [ -d "$OFFICIAL" ] || die "OFFICIAL: no folder $OFFICIAL"
    official_cmd=("$PYTHON" tests/parity/bench_official.py --official "$OFFICIAL" "${torch_args[@]}")
    # Exit 2 and one line: this configuration cannot run there; the official columns are left out.
    rc=0
    check=$("${official_cmd[@]}" --check) || rc=$?
    if [ "$rc" = 2 ]; then
        printf '%s\n' "$check" | tail -n 1
        official_cmd=()
    elif [ "$rc" != 0 ]; then
        die "failed: ${official_cmd[*]} --check"
    fi
fi

echo "lewel:   ${lewel_env[*]} ${lewel_cmd[*]}"
echo "pytorch: ${torch_cmd[*]}"
[ ${#official_cmd[@]} -eq 0 ] || echo "official: ${official_cmd[*]}"

# The JSON line of a run: the last line of its stdout (PyTorch may print warnings before it).
run_json() {
    local out
    out=$("$@") || die "failed: $*"
    out=$(printf '%s\n' "$out" | tail -n 1)
    [ -n "$OUT" ] && printf '%s\n' "$out" >>"$OUT"
    printf '%s\n' "$out"
}

base_cmd=()
if [ -n "$BASE" ]; then
    base_cmd=("$BASE" "${lewel_cmd[@]:1}")
    echo "base:    ${lewel_env[*]} ${base_cmd[*]}"
fi

lewel_s=()
torch_s=()
base_s=()
official_s=()
for r in $(seq 1 "$ROUNDS"); do
    bj=
    [ -n "$BASE" ] && bj=$(run_json env "${lewel_env[@]}" "${base_cmd[@]}")
    lj=$(run_json env "${lewel_env[@]}" "${lewel_cmd[@]}")
    tj=$(run_json "${torch_cmd[@]}")
    oj=
    if [ ${#official_cmd[@]} -gt 0 ]; then
        rc=0
        oj=$("${official_cmd[@]}") || rc=$?
        oj=$(printf '%s\n' "$oj" | tail -n 1)
        if [ "$rc" = 2 ] && [ "$r" = 1 ]; then
            # It cannot run here after all (its one line says why): no official columns.
            printf '%s\n' "$oj"
            official_cmd=()
            oj=
        elif [ "$rc" != 0 ]; then
            die "failed: ${official_cmd[*]}"
        elif [ -n "$OUT" ]; then
            printf '%s\n' "$oj" >>"$OUT"
        fi
    fi
    if [ "$r" = 1 ]; then
        echo "lewel:   $(json_get engine <<<"$lj") | $(json_get device <<<"$lj") | $(json_get threads <<<"$lj") threads"
        echo "pytorch: $(json_get engine <<<"$tj") | $(json_get device <<<"$tj") | $(json_get threads <<<"$tj") threads | channels_last $(json_get channels_last <<<"$tj") | bf16 $(json_get bf16 <<<"$tj")"
        if [ -n "$oj" ]; then
            echo "official: $(json_get engine <<<"$oj") | $(json_get device <<<"$oj") | $(json_get threads <<<"$oj") threads | channels_last $(json_get channels_last <<<"$oj") | amp $(json_get amp <<<"$oj") | ddp $(json_get ddp <<<"$oj")"
            echo "official: parameters $(json_get params <<<"$oj")"
            echo "official: forward passes of a step $(json_get forwards <<<"$oj")"
        fi
        echo "$ARCH $METHOD | batch $BATCH x $SIZE px | $WARMUP warm-up + $STEPS measured steps per run (median) | $ROUNDS rounds, alternating"
        echo
        printf '%-6s %14s %14s %18s' round "lewel s/step" "pytorch s/step" "pytorch / lewel"
        [ -z "$oj" ] || printf ' %15s %19s' "official s/step" "official / lewel"
        [ -z "$BASE" ] || printf ' %14s %18s' "base s/step" "pytorch / base"
        echo
    fi
    l=$(json_get median_s <<<"$lj")
    t=$(json_get median_s <<<"$tj")
    lewel_s+=("$l")
    torch_s+=("$t")
    awk -v r="$r" -v l="$l" -v t="$t" 'BEGIN { printf "%-6s %14.4f %14.4f %18.3f", r, l, t, t / l }'
    if [ -n "$oj" ]; then
        o=$(json_get median_s <<<"$oj")
        official_s+=("$o")
        awk -v o="$o" -v l="$l" 'BEGIN { printf " %15.4f %19.3f", o, o / l }'
    fi
    if [ -n "$BASE" ]; then
        b=$(json_get median_s <<<"$bj")
        base_s+=("$b")
        awk -v b="$b" -v t="$t" 'BEGIN { printf " %14.4f %18.3f", b, t / b }'
    fi
    echo
done

# Medians over the rounds: of each engine's step and of the per-round ratios.
median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
ratios=()
for i in "${!lewel_s[@]}"; do
    ratios+=("$(awk -v l="${lewel_s[$i]}" -v t="${torch_s[$i]}" 'BEGIN { printf "%.6f", t / l }')")
done
ml=$(printf '%s\n' "${lewel_s[@]}" | median)
mt=$(printf '%s\n' "${torch_s[@]}" | median)
mr=$(printf '%s\n' "${ratios[@]}" | median)
awk -v l="$ml" -v t="$mt" -v r="$mr" 'BEGIN { printf "%-6s %14.4f %14.4f %18.3f", "median", l, t, r }'
if [ ${#official_s[@]} -gt 0 ]; then
    oratios=()
    for i in "${!official_s[@]}"; do
        oratios+=("$(awk -v l="${lewel_s[$i]}" -v o="${official_s[$i]}" 'BEGIN { printf "%.6f", o / l }')")
    done
    mo=$(printf '%s\n' "${official_s[@]}" | median)
    mor=$(printf '%s\n' "${oratios[@]}" | median)
    awk -v o="$mo" -v r="$mor" 'BEGIN { printf " %15.4f %19.3f", o, r }'
fi
if [ -n "$BASE" ]; then
    bratios=()
    for i in "${!base_s[@]}"; do
        bratios+=("$(awk -v l="${base_s[$i]}" -v t="${torch_s[$i]}" 'BEGIN { printf "%.6f", t / l }')")
    done
    mb=$(printf '%s\n' "${base_s[@]}" | median)
    mbr=$(printf '%s\n' "${bratios[@]}" | median)
    awk -v b="$mb" -v r="$mbr" 'BEGIN { printf " %14.4f %18.3f", b, r }'
    awk -v b="$mb" -v l="$ml" 'BEGIN { printf "\n\nlewel against base: %.2fx faster (median steps)", b / l }'
fi
echo
awk -v l="$ml" -v t="$mt" -v r="$mr" -v b="$BATCH" 'BEGIN {
    printf "\nlewel %.2f images/s, pytorch %.2f images/s (an image = one sample, its two views); median ratio pytorch/lewel %.3f (above 1: lewel faster)\n", b / l, b / t, r
}'
if [ ${#official_s[@]} -gt 0 ]; then
    awk -v l="$ml" -v o="$mo" -v r="$mor" -v b="$BATCH" 'BEGIN {
        printf "official %.2f images/s; median ratio official/lewel %.3f (above 1: lewel faster)\n", b / o, r
    }'
fi
