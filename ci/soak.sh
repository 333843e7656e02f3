#!/usr/bin/env bash
# The hardening soak (crates/server/tests/soak.rs): 16 fio jobs of 4 KiB-32 MiB
# verified reads and writes while backups are created and released every 200 ms
# and hostile clients (unread zero-length READs, bare 32 MiB WRITE headers, FLUSH
# storms) run beside them. CI runs it for 20 s inside `cargo test`; this script runs
# it longer on a release build.
#
#   ci/soak.sh               10 minutes (release build)
#   ci/soak.sh --secs N      N seconds
#   ci/soak.sh --debug ...   debug build (what CI runs)
set -euo pipefail
cd "$(dirname "$0")/.."

secs=600
profile=(--release)
while [ $# -gt 0 ]; do
  case "$1" in
    --long) secs=600 ;;
    --secs) secs=${2:?--secs needs a number}; shift ;;
    --debug) profile=() ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "ci/soak.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
# The test drives ringblk-ctl, which `cargo test -p ringblk-server` does not build.
cargo build "${profile[@]}" -p ringblk-ctl
RINGBLK_SOAK_SECS=$secs exec cargo test "${profile[@]}" -p ringblk-server --test soak \
  -- --nocapture soak_every_size
