#!/usr/bin/env bash
# Builds the test guest for crates/server/tests/vhost_guest.rs: a Debian cloud kernel
# and a busybox initramfs whose /init (tests/guest/init) runs the checks.
#
#   tests/guest/build.sh [CACHE_DIR]     default: target/guest
#
# Prints two lines on stdout, KERNEL=<path> and INITRD=<path>; logs go to stderr.
#
# Idempotent and cached: the output lives in CACHE_DIR/<key>/, where the key names the
# kernel package and version, the busybox-static version and a hash of this script
# and of init. A second run with the same key does nothing (and needs no network);
# a new kernel in the apt lists, a new busybox or an edited init builds a new one and
# removes the older builds.
#
# The kernel is never installed on the host: `linux-image-cloud-amd64` is a
# metapackage, so the package it depends on is fetched with `apt-get download` and
# unpacked with `dpkg -x`. Its virtio modules ship without a usable modules.dep in the
# initramfs, so the dependency order is computed here from each module's own
# `depends=` field (recursively) and written to /modules/order, which /init loads
# with insmod. Compressed modules (.ko.xz, .ko.zst) are decompressed here, because
# busybox's insmod takes plain ELF files only.
#
# Needs: apt-get, dpkg, busybox-static (ci/test.sh installs them), xz/zstd only for
# compressed modules.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${1:-$repo/target/guest}
meta=linux-image-cloud-amd64
# The modules /init needs for a virtio-blk disk on PCI; their dependencies are added.
want_modules=(virtio virtio_ring virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk)

die() { echo "tests/guest/build.sh: $*" >&2; exit 1; }
log() { echo "tests/guest/build.sh: $*" >&2; }

busybox=/bin/busybox
[ -x "$busybox" ] || die "no $busybox: install busybox-static (ci/test.sh does)"
file_out=$(LC_ALL=C file -b "$busybox" 2>/dev/null || true)
case $file_out in *dynamically*) die "$busybox is dynamically linked: install busybox-static" ;; esac
bb_ver=$(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null) ||
	die "busybox-static is not installed (ci/test.sh installs it)"

kpkg=$(apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks \
	--no-replaces --no-enhances "$meta" 2>/dev/null |
	awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')
[ -n "$kpkg" ] || die "apt-cache knows no $meta (run apt-get update; ci/test.sh does)"
kver=$(apt-cache policy "$kpkg" | awk '$1 == "Candidate:" { print $2; exit }')
if [ -z "$kver" ] || [ "$kver" = "(none)" ]; then
	die "no candidate version of $kpkg"
fi

self_hash=$(cat "$0" "$here/init" | sha256sum | cut -c1-12)
key="${kpkg}_${kver}_busybox_${bb_ver}_${self_hash}"
key=${key//[^A-Za-z0-9._+-]/_}
out="$cache/$key"
if [ -f "$out/done" ]; then
	echo "KERNEL=$out/vmlinuz"
	echo "INITRD=$out/initramfs.cpio"
	exit 0
fi

mkdir -p "$cache"
work=$(mktemp -d "$cache/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
log "building $key"
(cd "$work" && apt-get download -q -o APT::Sandbox::User=root "$kpkg=$kver" >&2) ||
	die "apt-get download $kpkg=$kver failed"
dpkg -x "$work"/*.deb "$work/x"
kdir=$(find "$work/x/lib/modules" -mindepth 1 -maxdepth 1 -type d 2>/dev/null | head -n1)
[ -n "$kdir" ] || die "$kpkg has no lib/modules"
vmlinuz=$(find "$work/x/boot" -maxdepth 1 -name 'vmlinuz-*' 2>/dev/null | head -n1)
[ -n "$vmlinuz" ] || die "$kpkg has no boot/vmlinuz-*"

# find_module NAME: the module file's path, or nothing when built in (or absent).
find_module() {
	find "$kdir/kernel" -type f \( -name "$1.ko" -o -name "$1.ko.xz" -o -name "$1.ko.zst" \
		-o -name "${1//_/-}.ko" -o -name "${1//_/-}.ko.xz" -o -name "${1//_/-}.ko.zst" \) |
		head -n1
}
builtin() { grep -qE "/$1\.ko$|/${1//_/-}\.ko$" "$kdir/modules.builtin" 2>/dev/null; }

root="$work/root"
mkdir -p "$root/bin" "$root/dev" "$root/proc" "$root/sys" "$root/tmp" "$root/modules"
: >"$root/modules/order"
declare -A state=()  # module name -> "visiting" | "done"
# add NAME: its dependencies first (depth first), then itself, to /modules/order.
add() {
	local name=$1 path plain deps d
	case ${state[$name]:-} in
	done) return ;;
	visiting) die "module dependency cycle at $name" ;;
	esac
	state[$name]=visiting
	path=$(find_module "$name")
	if [ -z "$path" ]; then
		builtin "$name" || die "module $name is neither in $kpkg nor built in"
		log "$name is built into the kernel"
		state[$name]="done"
		return
	fi
	plain="$root/modules/$name.ko"
	case $path in
	*.xz) xz -dc "$path" >"$plain" ;;
	*.zst) zstd -qdc "$path" >"$plain" ;;
	*) cp "$path" "$plain" ;;
	esac
	# The .modinfo section holds NUL-separated key=value strings; depends= lists
	# the modules this one needs (comma separated, possibly empty).
	deps=$(tr '\0' '\n' <"$plain" | sed -n 's/^depends=//p' | head -n1 | tr ',' ' ')
	for d in $deps; do add "$d"; done
	echo "$name.ko" >>"$root/modules/order"
	state[$name]="done"
}
for m in "${want_modules[@]}"; do add "$m"; done
log "modules: $(tr '\n' ' ' <"$root/modules/order")"

cp "$busybox" "$root/bin/busybox"
cp "$here/init" "$root/init"
chmod 0755 "$root/init" "$root/bin/busybox"
(cd "$root" && find . | LC_ALL=C sort | "$busybox" cpio -o -H newc 2>/dev/null) >"$work/initramfs.cpio"
cp "$vmlinuz" "$work/vmlinuz"

stage="$work/out"
mkdir -p "$stage"
mv "$work/vmlinuz" "$work/initramfs.cpio" "$stage/"
cp "$root/modules/order" "$stage/modules.order"
echo "$key" >"$stage/done"
# Another build of the same key may have finished first: keep whichever landed.
if mv -T "$stage" "$out" 2>/dev/null; then
	for old in "$cache"/*/; do
		[ "${old%/}" = "$out" ] || [ ! -f "$old/done" ] || rm -rf "${old%/}"
	done
fi
[ -f "$out/done" ] || die "the build of $key did not land in $out"
log "built $out"
echo "KERNEL=$out/vmlinuz"
echo "INITRD=$out/initramfs.cpio"
