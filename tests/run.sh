#!/bin/sh
# The whole test suite: installs what it needs, then builds and runs every test.
set -eu
cd "$(dirname "$0")/.."
tests/setup.sh
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
# The fuzz entry points exist only with the `fuzzing` features; the replay test needs them.
features=cellvm/fuzzing,cellvm-jailer/fuzzing
cargo build --release --workspace --all-targets --features "$features"
# Every unsafe block explained, and no other lint either (the workspace turns on
# clippy::undocumented_unsafe_blocks).
cargo clippy --release --workspace --all-targets --features "$features" -- -D warnings
# The campaigns (long runs of the registry and of kills) are benchmarks of a kind: run
# them by name (`cargo test --release --test jailer_campaign -- --nocapture`).
cargo test --release --workspace --features "$features" -- --test-threads=2 --skip campaign_
tests/fuzz-smoke.sh
