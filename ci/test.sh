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

# --- issue #13 guest test (crates/server/tests/vhost_guest.rs): QEMU and busybox ------
# qemu-system-x86 must match the installed qemu-utils (one QEMU release on the machine).
# When qemu-utils came from the release's backports suite (a ~bpoNN version), that suite
# is added as an apt source built at run time from the URI of the machine's own Debian
# entry, so no mirror address lives in this repository. busybox-static builds the guest's
# initramfs (tests/guest/build.sh); the kernel is downloaded there, never installed.
guest_pkgs=()
qemu_ver=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
if [ -n "$qemu_ver" ] && \
   [ "$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || true)" != "$qemu_ver" ]; then
  guest_pkgs+=("qemu-system-x86=$qemu_ver")
fi
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' ||
  guest_pkgs+=(busybox-static)
if [ ${#guest_pkgs[@]} -gt 0 ] && [ -z "${RINGBLK_SKIP_APT:-}" ]; then
  step "installing the guest test's tools: ${guest_pkgs[*]}"
  if [ "$(id -u)" -ne 0 ]; then
    echo "ci/test.sh: need root to apt-get install: ${guest_pkgs[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt_target=()
  if [[ "$qemu_ver" == *~bpo* ]]; then
    codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
    # The URI of the entry that serves "$codename" itself (deb822 or one-line format).
    debian_uri=$(awk -v c="$codename" '
      /^URIs:/ { uri = $2 }
      /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == c && uri != "") { print uri; exit } }
      /^deb / { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { if ($(i+1) == c) { print $i; exit } } }
    ' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | head -n1)
    if [ -z "$debian_uri" ]; then
      echo "ci/test.sh: no apt source for $codename found; cannot add $codename-backports" >&2
      exit 1
    fi
    printf 'Types: deb\nURIs: %s\nSuites: %s-backports\nComponents: main\nSigned-By: %s\n' \
      "$debian_uri" "$codename" /usr/share/keyrings/debian-archive-keyring.gpg \
      >/etc/apt/sources.list.d/ringblk-backports.sources
    apt_target=(-t "$codename-backports")
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${apt_target[@]}" "${guest_pkgs[@]}"
fi
# --- end of the issue #13 guest block ------------------------------------------------

# --- issue #14 iSCSI tests (crates/server/tests/iscsi.rs, crates/iscsi/tests) ---------
# libiscsi-bin (iscsi-ls, iscsi-inq, iscsi-perf, iscsi-test-cu) and qemu's iscsi://
# driver, qemu-block-extra, at exactly the installed qemu-utils version (from the suite
# that version came from: backports are enabled by the block above when needed).
iscsi_pkgs=()
command -v iscsi-test-cu >/dev/null 2>&1 || iscsi_pkgs+=(libiscsi-bin)
qemu_ver=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
if [ -n "$qemu_ver" ] && \
   [ "$(dpkg-query -W -f='${Version}' qemu-block-extra 2>/dev/null || true)" != "$qemu_ver" ]; then
  iscsi_pkgs+=("qemu-block-extra=$qemu_ver")
fi
if [ ${#iscsi_pkgs[@]} -gt 0 ] && [ -z "${RINGBLK_SKIP_APT:-}" ]; then
  step "installing the iSCSI tests' tools: ${iscsi_pkgs[*]}"
  if [ "$(id -u)" -ne 0 ]; then
    echo "ci/test.sh: need root to apt-get install: ${iscsi_pkgs[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${iscsi_pkgs[@]}"
fi
# --- end of the issue #14 iSCSI block -------------------------------------------------

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
# NBD over TLS (#16): ringblk vs qemu-nbd, same certificates (ringblk tls-init).
bench/compare.sh --tls --smoke
bench/switch-bench.sh --smoke
if [ -f bench/src/bin/reactor_bench.rs ]; then
  cargo run -q -p ringblk-bench --bin reactor_bench -- --smoke
fi

step "all tests passed"
