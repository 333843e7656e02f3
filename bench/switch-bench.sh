#!/usr/bin/env bash
# Backup switchover under load; see bench/switch_bench.py. Flags: --quick, --smoke.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 bench/switch_bench.py "$@"
