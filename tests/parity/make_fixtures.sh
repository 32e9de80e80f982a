#!/usr/bin/env bash
# Regenerates the committed LEWEL parity fixtures under tests/parity/fixtures/.
# Needs python3 with torch (CPU is enough) and safetensors. Takes well under a minute.
#
# For each configuration NAME:
#   NAME.in.safetensors                 initial state, with LARS momentum buffers
#   NAME.views.safetensors              view1, view2
#   NAME.<method>.out.safetensors       reference OUT of one step (float64 compute)
#   NAME.<method>.noise.safetensors     per-entry discrepancy of the same step computed in
#                                       float32 (max over 1 and 2 threads): what a correct
#                                       float32 engine may differ by; used by `compare --noise`
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REF=(python3 "$HERE/lewel_reference.py")
FIX="$HERE/fixtures"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$FIX"

LR=0.3
WD=1.5e-6
EMA_M=0.99
HEADS=4
METHODS=(lewel-b-eman lewel-b)

# name depth div batch size seed residual_gamma
# size 40 for depth 18: at 32 px the layer4 map is 1x1 (L = 1), which makes the attention
# softmax identically 1; 40 px gives 20 -> 10 -> 10 -> 5 -> 3 -> 2 (L = 4, odd sizes on the way).
# residual_gamma 0.1 and seed 1 for depth 50: conditioning, see README.md.
CONFIGS=(
  "r18_div16 18 16 4 40 0 0.1"
  "r50_div32 50 32 4 64 1 0.1"
)

for cfg in "${CONFIGS[@]}"; do
  read -r name depth div batch size seed rg <<<"$cfg"
  in="$FIX/$name.in.safetensors"
  views="$FIX/$name.views.safetensors"
  "${REF[@]}" make --depth "$depth" --div "$div" --batch "$batch" --size "$size" \
    --seed "$seed" --residual-gamma "$rg" --momentum-buffers --state "$in" --views "$views"
  for method in "${METHODS[@]}"; do
    out="$FIX/$name.$method.out.safetensors"
    args=(--state "$in" --views "$views" --method "$method" --lr "$LR" --wd "$WD"
          --ema-m "$EMA_M" --lewel-num-heads "$HEADS" --lewel-loss-weight 0.5
          --lewel-scale 1.0 --lars-exclude current --lars-eta 0.001 --momentum 0.9)
    "${REF[@]}" step "${args[@]}" --out "$out"
    # float32 runs with two summation orders (thread counts): their max discrepancy per entry
    "${REF[@]}" step "${args[@]}" --compute-dtype float32 --threads 1 --out "$TMP/f32.safetensors" >/dev/null
    "${REF[@]}" step "${args[@]}" --compute-dtype float32 --threads 2 --out "$TMP/f32b.safetensors" >/dev/null
    "${REF[@]}" noise "$out" "$TMP/f32.safetensors" "$TMP/f32b.safetensors" \
      --out "$FIX/$name.$method.noise.safetensors"
    echo "  float32 emulation (1 thread) vs this reference, default tolerances (informative):"
    "${REF[@]}" compare "$TMP/f32.safetensors" "$out" | grep -v '^  ' | sed 's/^/    /' || true
  done
done

chmod 0644 "$FIX"/*.safetensors
echo "fixture sizes:"
du -b "$FIX"/*.safetensors | awk '{printf "  %9d  %s\n", $1, $2; t += $1} END {printf "  %9d  total bytes\n", t}'
