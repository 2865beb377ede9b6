#!/bin/sh
# The whole test suite: installs what it needs, then builds and runs every test.
set -eu
cd "$(dirname "$0")/.."
tests/setup.sh
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
cargo build --release --workspace --all-targets
cargo test --release --workspace -- --test-threads=2
tests/fuzz-smoke.sh
