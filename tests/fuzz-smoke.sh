#!/bin/sh
# Builds every cargo-fuzz target and runs each briefly (FUZZ_SECONDS, default 20) from
# its committed corpus. A crash fails; its reproducer is left in fuzz/artifacts/.
set -eu
cd "$(dirname "$0")/../fuzz"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked --quiet
cargo fuzz build --sanitizer none -O
seconds="${FUZZ_SECONDS:-20}"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for target in $(cargo fuzz list); do
    mkdir -p "$scratch/$target"
    # New inputs go to the scratch directory; the committed corpus stays as it is.
    if ! cargo fuzz run --sanitizer none -O "$target" "$scratch/$target" "corpus/$target" -- \
        -max_total_time="$seconds" -print_final_stats=1 >"$scratch/$target.log" 2>&1; then
        tail -40 "$scratch/$target.log"
        echo "fuzz-smoke: $target crashed; reproducer in fuzz/artifacts/$target" >&2
        exit 1
    fi
    echo "fuzz-smoke: $target: $(grep -E 'stat::number_of_executed_units' "$scratch/$target.log" | awk '{print $2}') runs in ${seconds}s, no crash"
done
