#!/usr/bin/env bash
# Crash soak: the kill -9 test of crates/server/tests/crash.rs with many cycles, in
# release mode. Each cycle: a real NBD client writes and flushes, the server is
# killed with SIGKILL at a random moment (with a backup active or a release merging
# in some cycles), `ringblk check` runs on the data dir, the server restarts and
# every block is checked against what the client's flushes made durable.
#
#   ci/crash-soak.sh                  500 cycles, random seed
#   ci/crash-soak.sh --cycles 100     fewer cycles
#   ci/crash-soak.sh --seed 12345     replay a run's plan (the seed is printed)
#   ci/crash-soak.sh --debug          debug binaries (what CI's 20 cycles use)
#   ci/crash-soak.sh --keep           keep the data and work dirs at the end
#
# Progress: one line per cycle. Exit status: 0 when every cycle passed; else the
# test's failure (cycle, seed, block, expected writes, actual content, and where the
# logs and the data dir were kept) and a non-zero status.
set -euo pipefail
cd "$(dirname "$0")/.."

cycles=500
seed=""
profile=release
keep=""
usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --cycles) cycles=${2:?--cycles needs a number}; shift 2 ;;
    --cycles=*) cycles=${1#*=}; shift ;;
    --seed) seed=${2:?--seed needs a number}; shift 2 ;;
    --seed=*) seed=${1#*=}; shift ;;
    --debug) profile=debug; shift ;;
    --keep) keep=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "crash-soak.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done
case "$cycles" in ''|*[!0-9]*) echo "crash-soak.sh: --cycles must be a number" >&2; exit 2 ;; esac
if [ -z "$seed" ]; then
  seed=$(( $(od -An -N4 -tu4 /dev/urandom | tr -d ' ') % 1000000007 ))
fi
case "$seed" in *[!0-9]*) echo "crash-soak.sh: --seed must be a number" >&2; exit 2 ;; esac

if ! /usr/bin/python3 -c 'import nbd' >/dev/null 2>&1; then
  echo "crash-soak.sh: /usr/bin/python3 lacks the nbd module (apt-get install python3-libnbd; ci/test.sh installs it)" >&2
  exit 1
fi

cargo_flags=()
[ "$profile" = release ] && cargo_flags+=(--release)

echo "==> crash soak: $cycles cycles, seed $seed, $profile build"
# The test runs the workspace's binaries (ringblk and ringblk-ctl): build them and
# the test first, so that the times below are the soak's alone.
cargo build -q "${cargo_flags[@]}" --workspace --bins
cargo test -q "${cargo_flags[@]}" -p ringblk-server --test crash --no-run
start=$(date +%s)
log=$(mktemp "${TMPDIR:-/tmp}/crash-soak.XXXXXX.log")
set +e
RINGBLK_CRASH_CYCLES=$cycles RINGBLK_CRASH_SEED=$seed RINGBLK_CRASH_KEEP=$keep \
  cargo test -q "${cargo_flags[@]}" -p ringblk-server --test crash -- --nocapture --test-threads 1 2>&1 |
  tee "$log" | grep --line-buffered -E '^crash:|panicked|failed'
status=${PIPESTATUS[0]}
set -e
end=$(date +%s)
elapsed=$((end - start))
passed=$(grep -cE '^crash: cycle [0-9]+:' "$log" || true)
echo "==> crash soak summary"
echo "    seed:            $seed (ci/crash-soak.sh --seed $seed --cycles $cycles replays the plan)"
echo "    cycles passed:   $passed of $cycles (+ the negative control cycle)"
echo "    wall time:       ${elapsed} s ($(awk -v t="$elapsed" -v n="$cycles" 'BEGIN { if (n > 0) printf "%.2f", t / n; else print "-" }') s per cycle)"
grep -E '^crash:   ' "$log" | sed 's/^crash:  /   /' || true
if [ "$status" -ne 0 ]; then
  echo "==> FAILED (exit $status); full output in $log"
  sed -n '/panicked at/,$p' "$log" | head -80 || true
  exit "$status"
fi
echo "==> all $cycles cycles passed; full output in $log"
