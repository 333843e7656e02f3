#!/usr/bin/env bash
# The reactor benchmark of issue 2, in release mode, from the repository root (so the
# default data file lands in ./target/bench-data on the real disk, not /tmp).
#
#   bench/reactor-bench.sh                  3 rounds of 10 s, 1 GiB file, 10 s idle; each
#                                           round runs fio, then the reactor once per submit
#                                           policy (default: batch and eager), and prints
#                                           one ratio to fio per policy
#   bench/reactor-bench.sh --submit every4  other reactor submit policies: batch, eager,
#                                           everyN (comma-separated list)
#   bench/reactor-bench.sh --poll busy      any reactor_bench flag (see --help)
#   bench/reactor-bench.sh --smoke          the few-second CI version (both policies)
#
# Needs fio (ci/test.sh installs it). Run it on a quiet machine: it compares against
# fio on the same disk, so anything else doing I/O or burning CPU skews the ratio
# (watch the steal column: runs with much steal are not comparable).
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo run --quiet --release -p ringblk-bench --bin reactor_bench -- "$@"
