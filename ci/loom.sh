#!/usr/bin/env bash
# loom model checks of the lock-free block map (crates/blockmap/tests/loom.rs).
#
# The two-thread models are explored exhaustively; the three-thread park/wake
# model up to LOOM_MAX_PREEMPTIONS preemptions per execution (default 2: ~10 s;
# 3 takes ~100 s). Raise it locally for a deeper search:
#   LOOM_MAX_PREEMPTIONS=3 ci/loom.sh
# Release build for speed, with debug assertions on so the map's internal
# invariant checks run in every explored interleaving. Its own target dir,
# because `--cfg loom` rebuilds every crate.
set -euo pipefail
cd "$(dirname "$0")/.."

export LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-2}"
export CARGO_PROFILE_RELEASE_DEBUG_ASSERTIONS=true
export CARGO_PROFILE_RELEASE_OVERFLOW_CHECKS=true
# Compile time dominates this job: no LTO, parallel codegen, no debug info.
export CARGO_PROFILE_RELEASE_LTO=false
export CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16
export CARGO_PROFILE_RELEASE_DEBUG=false
RUSTFLAGS="--cfg loom ${RUSTFLAGS:-}" CARGO_TARGET_DIR="$PWD/target/loom" \
    cargo test -p ringblk-blockmap --release --test loom -- --test-threads=2 "$@"
