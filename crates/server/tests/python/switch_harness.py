#!/usr/bin/python3
"""Backup switchover harness: every acknowledged write, in admission order.

Writers (one NBD connection each, one write in flight each, disjoint regions) write
4 KiB blocks whose bytes name (writer, seq, block). The main thread takes backups
under this load with ringblk-ctl. Afterwards each backup export is read back and
checked against the write log:

  prefix   per writer, the backup holds exactly writes 1..k (each block shows the
           newest write with seq <= k; k = the newest seq found);
  before   every write acknowledged before the backup command was sent is in it;
  after    no write sent after the command returned is in it;
  one cut  the last included write of every writer was sent before the first
           excluded write of any writer was acknowledged (a single switch point).

Usage: switch_harness.py BASE_URI CTL RPC_SOCKET [--backups N] [--negative-control]
Prints 'N passed, N failed'; exits 1 on any failure.
"""
import struct
import subprocess
import sys
import threading
import time

import nbd

BLOCK = 4096
WRITERS = 4
REGION_BLOCKS = 256


def pattern(writer, seq, block):
    head = struct.pack("<QQQ", writer + 1, seq, block)
    return (head * (BLOCK // len(head) + 1))[:BLOCK]


def decode(data):
    writer, seq, block = struct.unpack("<QQQ", data[:24])
    if writer == 0:
        return None
    if data != pattern(writer - 1, seq, block):
        return "torn"
    return (writer - 1, seq, block)


class Writer(threading.Thread):
    def __init__(self, uri, idx, stop):
        super().__init__(daemon=True)
        self.uri, self.idx, self.stop = uri, idx, stop
        self.log = []  # (seq, block, send_ns, ack_ns)
        self.error = None

    def run(self):
        try:
            h = nbd.NBD()
            h.connect_uri(self.uri)
            seq = 0
            base = self.idx * REGION_BLOCKS
            while not self.stop.is_set():
                seq += 1
                block = base + (seq * 7919) % REGION_BLOCKS
                data = pattern(self.idx, seq, block)
                t0 = time.monotonic_ns()
                h.pwrite(data, block * BLOCK)
                t1 = time.monotonic_ns()
                self.log.append((seq, block, t0, t1))
            h.shutdown()
        except Exception as e:  # reported as a failure, not swallowed
            self.error = repr(e)


def read_image(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    total = WRITERS * REGION_BLOCKS * BLOCK
    out = bytearray()
    for off in range(0, total, 1 << 20):
        out += h.pread(min(1 << 20, total - off), off)
    h.shutdown()
    return bytes(out)


def check_backup(image, writers, cmd_start, cmd_end):
    """Returns a list of violations for one backup image."""
    bad = []
    cut = {}
    for w in writers:
        seen = [decode(image[b * BLOCK:(b + 1) * BLOCK])
                for b in range(w.idx * REGION_BLOCKS, (w.idx + 1) * REGION_BLOCKS)]
        if "torn" in seen:
            bad.append(f"writer {w.idx}: torn block")
            continue
        k = max([s[1] for s in seen if s is not None and s[0] == w.idx], default=0)
        cut[w.idx] = k
        expect = {}
        for seq, block, _, _ in w.log:
            if seq <= k:
                expect[block] = seq
        for i, s in enumerate(seen):
            block = w.idx * REGION_BLOCKS + i
            want = expect.get(block)
            got = None if s is None else s[1]
            if got != want:
                bad.append(f"writer {w.idx} block {block}: backup has seq {got}, prefix 1..{k} says {want}")
                break
        log = {seq: (t0, t1) for seq, _, t0, t1 in w.log}
        for seq, (t0, t1) in log.items():
            if t1 < cmd_start and seq > k:
                bad.append(f"writer {w.idx}: write {seq} acked before the command is missing")
                break
            if t0 > cmd_end and seq <= k:
                bad.append(f"writer {w.idx}: write {seq} sent after the command returned is in the backup")
                break
    logs = {w.idx: {seq: (t0, t1) for seq, _, t0, t1 in w.log} for w in writers}
    last_in = [logs[i][k][0] for i, k in cut.items() if k in logs[i]]
    first_out = [logs[i][k + 1][1] for i, k in cut.items() if (k + 1) in logs[i]]
    if last_in and first_out and max(last_in) > min(first_out):
        bad.append("no single switch point: an included write was sent after an excluded one was acknowledged")
    return bad, cut


def main():
    base, ctl, rpc = sys.argv[1], sys.argv[2], sys.argv[3]
    backups = 6
    negative = "--negative-control" in sys.argv
    if "--backups" in sys.argv:
        backups = int(sys.argv[sys.argv.index("--backups") + 1])
    stop = threading.Event()
    writers = [Writer(base + "/v", i, stop) for i in range(WRITERS)]
    for w in writers:
        w.start()
    taken = []
    time.sleep(0.3)
    for n in range(backups):
        t0 = time.monotonic_ns()
        subprocess.run([ctl, "--rpc", rpc, "backup", "create", "v", f"h{n}"], check=True,
                       stdout=subprocess.DEVNULL)
        t1 = time.monotonic_ns()
        taken.append((f"h{n}", t0, t1))
        time.sleep(0.2)
    stop.set()
    for w in writers:
        w.join(60)
    passed = failed = 0
    for w in writers:
        if w.error or len(w.log) < 50:
            print(f"FAIL writer {w.idx}: error={w.error} writes={len(w.log)}")
            failed += 1
    for name, t0, t1 in taken:
        image = read_image(f"{base}/v@{name}")
        if negative:
            # Plant a write from after the switch: the newest write of writer 0.
            seq, block, _, _ = writers[0].log[-1]
            image = image[:block * BLOCK] + pattern(0, seq, block) + image[(block + 1) * BLOCK:]
        bad, cut = check_backup(image, writers, t0, t1)
        if bad:
            failed += 1
            print(f"FAIL {name}: " + "; ".join(bad[:3]))
        else:
            passed += 1
            print(f"ok {name}: includes writes " + ", ".join(
                f"w{i}:1..{k} of {len(writers[i].log)}" for i, k in sorted(cut.items())))
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
