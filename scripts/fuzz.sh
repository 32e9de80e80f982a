#!/usr/bin/env bash
# Fuzzes lewel's readers of untrusted bytes for a fixed number of executions per target:
#   packed      packed dataset files (Packed::from_bytes, entry/label/bytes/checked_bytes)
#   checkpoint  safetensors states (checkpoint::read_bytes, loaded into a small model's store)
#   manifest    a run's checkpoint.json (run::parse_manifest, the config's checks)
#   image       image bytes (decode::decode, jpeg_info, jpeg_check_complete, then both training
#               views and the eval transform)
#   config      TOML configs (given_from_toml_str, from_given, validate)
# The target bodies are lewel::fuzzing's (src/fuzzing.rs); `cargo test` runs them on fuzz/seeds/.
#
#   scripts/fuzz.sh [TARGET|all] [RUNS]      # default: all targets, 200000 executions each
#
# Needs the nightly toolchain and cargo-fuzz (`cargo +nightly install cargo-fuzz`). The corpus
# grows in fuzz/corpus/<target>/ (seeded from fuzz/seeds/<target>/, not committed); a crash is
# saved in fuzz/artifacts/<target>/ and stops that target with a non-zero status: minimise it with
# `cargo +nightly fuzz tmin <target> <file>`, fix the library, and keep the input as a regression
# test. One job per target, one target at a time; FUZZ_ARGS adds libFuzzer flags (e.g.
# FUZZ_ARGS=-max_total_time=600).
set -euo pipefail
cd "$(dirname "$0")/.."

all=(packed checkpoint manifest image config)
target=${1:-all}
runs=${2:-200000}
if [[ $target == all ]]; then
    targets=("${all[@]}")
elif [[ " ${all[*]} " == *" $target "* ]]; then
    targets=("$target")
else
    echo "fuzz.sh: unknown target '$target' (expected all or one of: ${all[*]})" >&2
    exit 2
fi

# Largest input per target: room for the seeds (the checkpoint seeds are ~25 KB) and their mutations.
max_len() {
    case $1 in
        checkpoint) echo 65536 ;;
        packed | image) echo 16384 ;;
        *) echo 4096 ;;
    esac
}

# cargo fuzz builds optimised with debug assertions (an arithmetic overflow is a crash, not a
# silent wrap) and AddressSanitizer. New inputs go to fuzz/corpus/<target>/; fuzz/seeds/<target>/ is
# read as a second corpus, not written.
status=0
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    echo "== $t: $runs executions"
    start=$SECONDS
    dict=()
    [[ -f fuzz/dicts/$t.dict ]] && dict=(-dict="fuzz/dicts/$t.dict")
    # shellcheck disable=SC2086
    if ! cargo +nightly fuzz run "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
        -runs="$runs" -max_len="$(max_len "$t")" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 "${dict[@]}" ${FUZZ_ARGS:-}; then
        echo "== $t: FAILED (input saved under fuzz/artifacts/$t/)"
        status=1
    fi
    echo "== $t: $((SECONDS - start)) s"
done
exit $status
