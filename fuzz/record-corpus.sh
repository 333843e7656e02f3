#!/usr/bin/env bash
# Records seed inputs for the handshake fuzz target from real clients (fio, qemu-io,
# qemu-img, nbdcopy, nbdinfo) talking to a real ringblk through record_proxy.py.
# The export is named "disk" (64 MiB, 4 KiB blocks) to match fuzz::StaticCatalog.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p ringblk-server --bin ringblk
work=$(mktemp -d)
trap 'kill $srv $proxy 2>/dev/null || true; rm -rf "$work"' EXIT
./target/debug/ringblk serve --listen 127.0.0.1:10871 --data-dir "$work" --rpc "$work/ringblk.sock" \
  --volume disk=,backend=mem,size=64M,block-size=4096 >/dev/null 2>&1 &
srv=$!
out=fuzz/corpus/handshake
python3 fuzz/record_proxy.py 10872 10871 "$work/rec" &
proxy=$!
sleep 1
U=nbd://127.0.0.1:10872/disk
fio --name=rec --ioengine=nbd --uri=$U --rw=randrw --bs=4k --iodepth=4 --size=1M \
  --number_ios=32 --verify=crc32c --verify_state_save=0 >/dev/null
qemu-io -f raw $U -c 'write -P 0x5a 0 8k' -c 'read -P 0x5a 0 8k' -c 'write -z 8k 8k' \
  -c 'discard 16k 4k' -c 'write -f -P 1 32k 4k' -c 'flush' >/dev/null
qemu-img map --output=json $U >/dev/null
head -c 65536 /dev/urandom > "$work/src.bin"
nbdcopy "$work/src.bin" $U
nbdcopy $U "$work/dst.bin"
nbdinfo --list nbd://127.0.0.1:10872 >/dev/null
nbdinfo --map $U >/dev/null
sleep 1
# Connections are numbered in accept order (the clients above run in that order;
# fio and nbdcopy may open more than one connection each).
i=0
for f in $(ls "$work"/rec.* | sort -t. -k2 -n); do
  cp "$f" "$out/recorded-$i"
  i=$((i+1))
done
echo "recorded $i sessions into $out"
