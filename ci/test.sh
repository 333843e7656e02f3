#!/usr/bin/env bash
# ringblk's one test command (the README's): installs the system tools the tests
# drive when they are missing, then runs formatting, lints and every test.
#
#   ci/test.sh            everything CI runs
#   RINGBLK_SKIP_APT=1    do not try to install packages (you installed them yourself)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

step() { printf '\n==> %s\n' "$*"; }

# ---------------------------------------------------------------------------
# System tools the integration tests drive (real clients, never mocks).
# command -> Debian package
declare -A TOOLS=(
  [fio]=fio
  [nbdinfo]=libnbd-bin
  [nbdcopy]=libnbd-bin
  [nbdsh]=python3-libnbd
  [nbdkit]=nbdkit
  [qemu-img]=qemu-utils
  [qemu-io]=qemu-utils
  [qemu-nbd]=qemu-utils
  [losetup]=mount
)
missing=()
for cmd in "${!TOOLS[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${TOOLS[$cmd]}")
done
# python3-libnbd installs for Debian's /usr/bin/python3, which may not be first on PATH.
if ! /usr/bin/python3 -c 'import nbd' >/dev/null 2>&1; then
  missing+=(python3-libnbd)
fi
if [ ${#missing[@]} -gt 0 ] && [ -z "${RINGBLK_SKIP_APT:-}" ]; then
  pkgs=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
  step "installing missing test tools: $pkgs"
  if [ "$(id -u)" -ne 0 ]; then
    echo "ci/test.sh: need root to apt-get install: $pkgs" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $pkgs
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets -- -D warnings

# PLAN12 (issue #12) section g: the target crate's module ranks (no upward import,
# hence no module circle), the private layers' visibility and the crates' dependency
# directions. Enforced since step 5.3; --self-test first shows that each rule catches
# a violation planted in a temp copy, so a green run of the check means something.
step "ci/layers.py --self-test (each layer rule catches a planted violation)"
python3 ci/layers.py --self-test
step "ci/layers.py (layering of ringblk-target, visibility, crate deps, no NBD in the target: enforced)"
python3 ci/layers.py --after-5-2

step "cargo test --workspace"
cargo test --workspace

step "ci/loom.sh (block map model checking)"
ci/loom.sh

# Benchmarks print figures and never fail on speed; CI runs their smoke modes with
# debug binaries only to keep the scripts working.
step "benchmark smoke runs (figures are not checked)"
export RINGBLK_PROFILE=debug
bench/compare.sh --smoke
# vhost-user-blk: ringblk vs qemu-storage-daemon (qemu-utils) vs local fio, via libblkio.
bench/compare.sh --vhost --smoke
bench/switch-bench.sh --smoke
if [ -f bench/src/bin/reactor_bench.rs ]; then
  cargo run -q -p ringblk-bench --bin reactor_bench -- --smoke
fi

step "all tests passed"
