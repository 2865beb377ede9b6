#!/bin/sh
# The whole test suite: installs what it needs, then builds and runs every test.
set -eu
cd "$(dirname "$0")/.."
tests/setup.sh
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
# The fuzz entry points exist only with the `fuzzing` features; the replay test needs them.
features=cellvm/fuzzing,cellvm-jailer/fuzzing
cargo build --release --workspace --all-targets --features "$features"
cargo test --release --workspace --features "$features" -- --test-threads=2
tests/fuzz-smoke.sh
