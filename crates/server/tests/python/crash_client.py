#!/usr/bin/python3
"""Crash-test client for tests/crash.rs: writes and flushes through one NBD
connection with several requests in flight and logs every step, so that the test
can tell, after the server was killed with SIGKILL, which writes a completed FLUSH
(or their own FUA) made durable.

Every 4 KiB block written holds one 32-byte record repeated 128 times:
    b"RBLKCRSH" | tag u64 | block u64 | seq u64        (little endian)
`tag` names the volume, `block` the block's own index and `seq` the write (unique
per volume), so a read-back block names exactly the write it holds. A block never
written reads as zeros (seq 0).

Log (one line per event, line-buffered, in the order the client saw them; the
client outlives the server, only the server is killed):
    C                         connected
    W seq first nblocks fua   write about to be sent (fua: 0/1)
    A seq                     write acknowledged (success)
    X seq errno               write failed
    F id                      flush about to be sent
    FD id                     flush completed (success)
    FX id errno               flush failed
    R                         control plan done (mode control)
    END reason                the client stops (connection lost, time limit)

No two writes in flight overlap: a block's writes are sent one after another, each
after the previous one was answered, so their order is the order of the log.

Modes:
  load     random writes (1..--max-blocks blocks, a hot region gets rewritten
           often), a flush every few writes, some writes with FUA, --depth requests
           in flight; runs until the connection is lost (the server was killed) or
           --max-seconds pass (exit 3: nobody killed the server).
  control  runs --plan synchronously (one request at a time), logs R and idles
           until the connection is lost or the process is killed. Plan items,
           comma-separated: W:BLOCK (write), U:BLOCK (write with FUA), F (flush).
  dump     for each --job URI OUT FLUSH: connects, flushes first when FLUSH is 1
           (makes the content about to be read durable), reads the whole export
           into the file OUT and disconnects.

Usage: crash_client.py load|control --uri URI --log FILE [options]
       crash_client.py dump --job URI OUT FLUSH [--job ...]
"""
import argparse
import errno
import random
import struct
import sys
import time

import nbd

BLOCK = 4096
MAGIC = b"RBLKCRSH"


def pattern(tag, block, seq):
    return struct.pack("<8sQQQ", MAGIC, tag, block, seq) * (BLOCK // 32)


def payload(tag, first, n, seq):
    return b"".join(pattern(tag, b, seq) for b in range(first, first + n))


def err_of(e):
    code = getattr(e, "errno", None)
    return code if code else errno.EIO


class Log:
    def __init__(self, path):
        self.f = open(path, "a", buffering=1)

    def __call__(self, *parts):
        self.f.write(" ".join(str(p) for p in parts) + "\n")


def connect(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def dead(h):
    try:
        return h.aio_is_dead() or h.aio_is_closed()
    except nbd.Error:
        return True


def run_load(a, log):
    rng = random.Random(a.seed)
    h = connect(a.uri)
    log("C")
    blocks = a.blocks
    hot = min(a.hot_blocks, blocks)
    seq = a.seq_base
    fid = 0
    inflight = {}  # cookie -> ("w", seq, first, n) | ("f", id)
    busy = set()
    since_flush = 0
    flush_at = rng.randint(1, 2 * a.flush_every)
    deadline = time.monotonic() + a.max_seconds
    reason = None

    def pick():
        for _ in range(16):
            r = rng.random()
            if r < 0.5:
                n = 1
            elif r < 0.75:
                n = rng.randint(2, 4)
            else:
                n = rng.randint(5, a.max_blocks)
            n = min(n, blocks)
            if rng.random() < 0.25:
                first = rng.randrange(0, max(1, hot - n + 1))
            else:
                first = rng.randrange(0, blocks - n + 1)
            if not any(b in busy for b in range(first, first + n)):
                return first, n
        return None

    def reap():
        for cookie in list(inflight):
            try:
                done = h.aio_command_completed(cookie)
            except nbd.Error as e:
                item = inflight.pop(cookie)
                if item[0] == "w":
                    log("X", item[1], err_of(e))
                    busy.difference_update(range(item[2], item[2] + item[3]))
                else:
                    log("FX", item[1], err_of(e))
                continue
            if done:
                item = inflight.pop(cookie)
                if item[0] == "w":
                    log("A", item[1])
                    busy.difference_update(range(item[2], item[2] + item[3]))
                else:
                    log("FD", item[1])

    while reason is None:
        if time.monotonic() > deadline:
            reason = "time-limit"
            break
        try:
            while len(inflight) < a.depth:
                if since_flush >= flush_at:
                    fid += 1
                    log("F", fid)
                    c = h.aio_flush()
                    inflight[c] = ("f", fid)
                    since_flush = 0
                    flush_at = rng.randint(1, 2 * a.flush_every)
                    continue
                p = pick()
                if p is None:
                    break
                first, n = p
                seq += 1
                fua = 1 if rng.random() < a.fua else 0
                buf = payload(a.tag, first, n, seq)
                log("W", seq, first, n, fua)
                c = h.aio_pwrite(buf, first * BLOCK, flags=nbd.CMD_FLAG_FUA if fua else 0)
                inflight[c] = ("w", seq, first, n)
                busy.update(range(first, first + n))
                since_flush += 1
            h.poll(1000)
        except nbd.Error as e:
            reason = "error:%s" % err_of(e)
        try:
            reap()
        except nbd.Error as e:
            reason = reason or "error:%s" % err_of(e)
        if dead(h):
            reason = reason or "connection-lost"
    # Whatever is still in flight can only fail now; log how each ended.
    try:
        reap()
    except nbd.Error:
        pass
    for cookie, item in list(inflight.items()):
        if item[0] == "w":
            log("X", item[1], errno.ENOTCONN)
        else:
            log("FX", item[1], errno.ENOTCONN)
    log("END", reason)
    return 3 if reason == "time-limit" else 0


def run_control(a, log):
    h = connect(a.uri)
    log("C")
    seq = a.seq_base
    fid = 0
    for item in a.plan.split(","):
        kind, _, arg = item.partition(":")
        if kind in ("W", "U"):
            b = int(arg)
            seq += 1
            fua = 1 if kind == "U" else 0
            log("W", seq, b, 1, fua)
            h.pwrite(payload(a.tag, b, 1, seq), b * BLOCK, nbd.CMD_FLAG_FUA if fua else 0)
            log("A", seq)
        elif kind == "F":
            fid += 1
            log("F", fid)
            h.flush()
            log("FD", fid)
        else:
            raise SystemExit("bad plan item %r" % item)
    log("R")
    # Hold the connection (no disconnect, so no flush at disconnect) until the
    # server is gone.
    deadline = time.monotonic() + a.max_seconds
    while not dead(h) and time.monotonic() < deadline:
        try:
            h.poll(200)
        except nbd.Error:
            break
    log("END", "connection-lost" if dead(h) else "time-limit")
    return 0


def run_dump(a):
    for uri, out, flush in a.job:
        h = connect(uri)
        if flush == "1":
            h.flush()
        size = h.get_size()
        step = 4 << 20
        with open(out, "wb") as f:
            off = 0
            while off < size:
                n = min(step, size - off)
                f.write(h.pread(n, off))
                off += n
        h.shutdown()
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["load", "control", "dump"])
    p.add_argument("--uri")
    p.add_argument("--log")
    p.add_argument("--job", nargs=3, action="append", default=[],
                   metavar=("URI", "OUT", "FLUSH"))
    p.add_argument("--tag", type=int, default=1)
    p.add_argument("--seq-base", type=int, default=0)
    p.add_argument("--blocks", type=int, default=8192)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--max-blocks", type=int, default=16)
    p.add_argument("--hot-blocks", type=int, default=256)
    p.add_argument("--flush-every", type=int, default=12)
    p.add_argument("--fua", type=float, default=0.05)
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument("--plan", default="")
    a = p.parse_args()
    if a.mode == "dump":
        return run_dump(a)
    log = Log(a.log)
    if a.mode == "load":
        return run_load(a, log)
    return run_control(a, log)


if __name__ == "__main__":
    sys.exit(main())
