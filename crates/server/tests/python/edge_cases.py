#!/usr/bin/python3
"""NBD protocol edge cases against a running ringblk server, with python3-libnbd.

Usage: edge_cases.py HOST PORT [--negative-control]

The server must export
  vol0  a writable 64 MiB file volume with 512-byte blocks (sparse at start), and
  ro    a read-only 1 MiB volume whose every byte is 0x5a.

libnbd's strict mode is off (set_strict_mode(0)) so that bad requests reach the server
instead of being refused client-side. Every check compares exact bytes or the exact
errno libnbd reports (nbd.Error.errno). After each refused request the same connection
is used again, proving the byte stream stayed in step.

Prints one line per test, then "N passed, M failed"; exits 1 if anything failed.
With --negative-control only deliberately wrong checks run: each must FAIL, proving the
assertions used above can fail at all.
"""

import errno
import os
import sys
import traceback

import nbd

MiB = 1024 * 1024
VOL0_SIZE = 64 * MiB
RO_SIZE = 1 * MiB
RO_BYTE = 0x5A
PAYLOAD_MAX = 32 * MiB
U64 = 1 << 64
HOLE_ZERO = nbd.STATE_HOLE | nbd.STATE_ZERO

HOST = None
PORT = None


class CheckFailed(Exception):
    pass


def check(cond, what):
    if not cond:
        raise CheckFailed(what)


def uri(export):
    return "nbd://%s:%d/%s" % (HOST, PORT, export)


def connect(export="vol0", structured=True, meta=False):
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.set_request_structured_replies(structured)
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri(export))
    return h


def close(*handles):
    for h in handles:
        try:
            h.shutdown()
        except nbd.Error:
            pass


def expect_errno(fn, want, what):
    """fn() must fail with nbd.Error whose errno is exactly `want`.

    In this libnbd binding `Error.errnum` is the number and `Error.errno` its name."""
    try:
        fn()
    except nbd.Error as e:
        check(
            e.errnum == want and e.errno == errno.errorcode[want],
            "%s: errno %s (%s), expected %s (%d); message: %s"
            % (what, e.errnum, e.errno, errno.errorcode[want], want, e.string),
        )
        return
    raise CheckFailed("%s: succeeded, expected %s" % (what, errno.errorcode[want]))


def pattern(tag, n):
    """n bytes that differ per tag and per 8-byte word."""
    seed = os.urandom(8)
    words = (n + 15) // 16
    out = b"".join(seed + tag.to_bytes(4, "big") + i.to_bytes(4, "big") for i in range(words))
    return out[:n]


def expect_bytes(h, count, offset, want, what):
    got = h.pread(count, offset)
    check(len(got) == len(want), "%s: read %d bytes, expected %d" % (what, len(got), len(want)))
    if got != want:
        at = next(i for i in range(len(want)) if got[i] != want[i])
        raise CheckFailed(
            "%s: bytes differ first at +%d: got %r, expected %r"
            % (what, at, bytes(got[at:at + 8]), bytes(want[at:at + 8]))
        )


def still_in_step(h, offset, data, what):
    """The connection still answers correctly: a normal read returns known bytes."""
    expect_bytes(h, len(data), offset, data, what + " (connection in step afterwards)")


def extents(h, count, offset, flags=0):
    """base:allocation extents as [(length, flags)], and the contexts seen."""
    seen = []

    def cb(metacontext, off, entries, err):
        seen.append((metacontext, off, list(entries)))
        return 0

    h.block_status(count, offset, cb, flags)
    check(len(seen) == 1, "block status: %d context callbacks, expected 1" % len(seen))
    ctx, off, entries = seen[0]
    check(ctx == nbd.CONTEXT_BASE_ALLOCATION, "block status context %r" % ctx)
    check(off == offset, "block status offset %d, expected %d" % (off, offset))
    check(len(entries) >= 2 and len(entries) % 2 == 0, "block status entries %r" % entries)
    return list(zip(entries[0::2], entries[1::2]))


# Each test gets its own 1 MiB region of vol0.
def region(n):
    return (8 + n) * MiB


# ---------------------------------------------------------------------------------------
# Tests


def test_read_past_end():
    h = connect()
    last = VOL0_SIZE - 512
    data = pattern(1, 512)
    h.pwrite(data, last)
    expect_errno(lambda: h.pread(512, VOL0_SIZE), errno.EINVAL, "read at the end")
    expect_errno(lambda: h.pread(1024, last), errno.EINVAL, "read straddling the end")
    expect_errno(lambda: h.pread(512, VOL0_SIZE + MiB), errno.EINVAL, "read past the end")
    expect_errno(lambda: h.trim(1024, last), errno.EINVAL, "trim straddling the end")
    expect_errno(lambda: h.cache(1024, last), errno.EINVAL, "cache straddling the end")
    still_in_step(h, last, data, "read past end")
    close(h)


def test_write_past_end():
    h = connect()
    last = VOL0_SIZE - 512
    data = pattern(2, 512)
    h.pwrite(data, last)
    expect_errno(lambda: h.pwrite(pattern(3, 512), VOL0_SIZE), errno.ENOSPC, "write at the end")
    expect_errno(lambda: h.pwrite(pattern(3, 1024), last), errno.ENOSPC, "write straddling the end")
    expect_errno(lambda: h.zero(1024, last), errno.ENOSPC, "write-zeroes straddling the end")
    # Nothing of the refused requests reached the last block.
    still_in_step(h, last, data, "write past end")
    close(h)


def test_offset_wraparound():
    h = connect()
    base = region(0)
    data = pattern(4, 4096)
    h.pwrite(data, base)
    top = U64 - 512
    expect_errno(lambda: h.pread(1024, top), errno.EINVAL, "read wrapping 2^64")
    expect_errno(lambda: h.pread(512, top), errno.EINVAL, "read ending exactly at 2^64")
    expect_errno(lambda: h.pwrite(pattern(5, 1024), top), errno.EINVAL, "write wrapping 2^64")
    expect_errno(lambda: h.zero(1024, top), errno.EINVAL, "write-zeroes wrapping 2^64")
    expect_errno(lambda: h.trim(1024, top), errno.EINVAL, "trim wrapping 2^64")
    expect_errno(lambda: h.cache(1024, top), errno.EINVAL, "cache wrapping 2^64")
    still_in_step(h, base, data, "wraparound")
    close(h)


def test_oversize_read_structured():
    h = connect()
    check(h.get_structured_replies_negotiated(), "structured replies not negotiated")
    base = region(1)
    data = pattern(6, 8192)
    h.pwrite(data, base)
    expect_errno(lambda: h.pread(PAYLOAD_MAX + 512, 0), errno.EOVERFLOW, "read of 32 MiB + 512")
    still_in_step(h, base, data, "oversize read")
    # The maximum itself is fine.
    got = h.pread(PAYLOAD_MAX, 0)
    check(len(got) == PAYLOAD_MAX, "32 MiB read returned %d bytes" % len(got))
    check(got[base:base + len(data)] == data, "32 MiB read has the wrong bytes")
    close(h)


def test_oversize_read_simple():
    h = connect(structured=False)
    check(not h.get_structured_replies_negotiated(), "structured replies negotiated")
    base = region(2)
    data = pattern(7, 8192)
    h.pwrite(data, base)
    expect_errno(lambda: h.pread(PAYLOAD_MAX + 512, 0), errno.EINVAL, "simple read of 32 MiB + 512")
    still_in_step(h, base, data, "oversize simple read")
    close(h)


def test_oversize_write():
    for structured in (True, False):
        h = connect(structured=structured)
        base = region(3)
        data = pattern(8, 8192)
        h.pwrite(data, base)
        big = b"\xee" * (PAYLOAD_MAX + 512)
        expect_errno(lambda: h.pwrite(big, 0), errno.EINVAL, "write of 32 MiB + 512 (structured=%s)" % structured)
        # The refused payload was consumed, not parsed as requests, and not written.
        still_in_step(h, base, data, "oversize write")
        check(b"\xee" * 512 not in h.pread(1 * MiB, 0), "refused write reached the disk")
        close(h)


def test_unknown_command_flags():
    h = connect()
    base = region(4)
    data = pattern(9, 4096)
    h.pwrite(data, base)
    expect_errno(lambda: h.pread(512, base, 1 << 15), errno.EINVAL, "read with flag 1<<15")
    expect_errno(lambda: h.pwrite(pattern(10, 4096), base, 1 << 15), errno.EINVAL, "write with flag 1<<15")
    expect_errno(lambda: h.pwrite(pattern(10, 4096), base, 1 << 9), errno.EINVAL, "write with flag 1<<9")
    expect_errno(lambda: h.flush(1 << 15), errno.EINVAL, "flush with flag 1<<15")
    expect_errno(lambda: h.zero(4096, base, 1 << 15), errno.EINVAL, "write-zeroes with flag 1<<15")
    # A known flag on a command it does not apply to.
    expect_errno(lambda: h.pread(512, base, nbd.CMD_FLAG_NO_HOLE), errno.EINVAL, "read with NO_HOLE")
    expect_errno(lambda: h.pwrite(data, base, nbd.CMD_FLAG_REQ_ONE), errno.EINVAL, "write with REQ_ONE")
    # But FUA is valid on every command once advertised: the server MUST accept it.
    check(h.pread(4096, base, nbd.CMD_FLAG_FUA) == data, "read with FUA has the wrong bytes")
    h.flush(nbd.CMD_FLAG_FUA)
    still_in_step(h, base, data, "unknown flags")
    close(h)


def test_block_status_without_context():
    h = connect()
    check(not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "context negotiated without asking")
    base = region(5)
    data = pattern(11, 4096)
    h.pwrite(data, base)
    expect_errno(lambda: h.block_status(4096, base, lambda *a: 0), errno.EINVAL, "block status without context")
    still_in_step(h, base, data, "block status without context")
    close(h)


def test_simple_replies():
    h = connect(structured=False, meta=True)
    check(not h.get_structured_replies_negotiated(), "structured replies negotiated")
    base = region(6)
    data = pattern(12, 64 * 1024)
    h.pwrite(data, base)
    expect_bytes(h, len(data), base, data, "simple read after write")
    h.zero(8192, base + 4096)
    want = data[:4096] + bytes(8192) + data[4096 + 8192:]
    expect_bytes(h, len(data), base, want, "simple read after zero")
    h.flush()
    expect_errno(lambda: h.block_status(4096, base, lambda *a: 0), errno.EINVAL, "block status with simple replies")
    # DF is advertised only with structured replies.
    expect_errno(lambda: h.pread(4096, base, nbd.CMD_FLAG_DF), errno.EINVAL, "read with DF and simple replies")
    still_in_step(h, base, want, "simple replies")
    close(h)


def test_zero_length_requests():
    for structured in (True, False):
        h = connect(structured=structured, meta=structured)
        base = region(7)
        data = pattern(13, 4096)
        h.pwrite(data, base)
        check(h.pread(0, base) == b"", "zero-length read returned data")
        check(h.pread(0, VOL0_SIZE) == b"", "zero-length read at the end returned data")
        h.pwrite(b"", base)
        h.zero(0, base)
        h.trim(0, base)
        h.cache(0, base)
        expect_errno(lambda: h.pread(0, VOL0_SIZE + 512), errno.EINVAL, "zero-length read past the end")
        if structured:
            expect_errno(lambda: h.block_status(0, base, lambda *a: 0), errno.EINVAL, "zero-length block status")
        # The zero-length zero/trim changed nothing.
        still_in_step(h, base, data, "zero-length requests")
        close(h)


def test_read_only_export():
    h = connect("ro")
    check(h.is_read_only(), "ro export is not read-only")
    check(h.get_size() == RO_SIZE, "ro size %d" % h.get_size())
    want = bytes([RO_BYTE]) * 4096
    expect_errno(lambda: h.pwrite(b"\x01" * 4096, 0), errno.EPERM, "write to read-only")
    expect_errno(lambda: h.pwrite(b"\x01" * 4096, 0, nbd.CMD_FLAG_FUA), errno.EPERM, "FUA write to read-only")
    expect_errno(lambda: h.trim(4096, 0), errno.EPERM, "trim on read-only")
    expect_errno(lambda: h.zero(4096, 0), errno.EPERM, "write-zeroes on read-only")
    expect_errno(lambda: h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO), errno.EPERM, "fast zero on read-only")
    # EPERM comes first, even for a write past the end.
    expect_errno(lambda: h.pwrite(b"\x01" * 512, RO_SIZE), errno.EPERM, "write past the end of read-only")
    h.flush()
    h.cache(4096, 0)
    expect_bytes(h, 4096, 0, want, "read-only data")
    expect_bytes(h, 4096, RO_SIZE - 4096, want, "read-only data at the end")
    close(h)


def test_fua_writes():
    a = connect()
    check(a.can_fua(), "FUA not advertised")
    base = region(8)
    data = pattern(14, 128 * 1024)
    a.pwrite(data, base, nbd.CMD_FLAG_FUA)
    a.zero(4096, base, nbd.CMD_FLAG_FUA)
    a.trim(4096, base + 8192, nbd.CMD_FLAG_FUA)
    want = bytes(4096) + data[4096:8192] + bytes(4096) + data[12288:]
    b = connect()
    expect_bytes(b, len(want), base, want, "FUA data from another connection")
    close(a, b)


def test_cache():
    h = connect()
    check(h.can_cache(), "CACHE not advertised")
    base = region(9)
    data = pattern(15, 4096)
    h.pwrite(data, base)
    h.cache(MiB, base)
    h.cache(100, base + 1)  # a hint: need not be aligned
    h.cache(VOL0_SIZE, 0)  # no payload, so no 32 MiB cap
    expect_errno(lambda: h.cache(512, VOL0_SIZE), errno.EINVAL, "cache past the end")
    still_in_step(h, base, data, "cache")
    close(h)


def test_block_status_hole_after_trim():
    h = connect(meta=True)
    check(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "base:allocation not negotiated")
    check(h.can_trim(), "TRIM not advertised")
    base = region(10)
    h.pwrite(pattern(16, MiB), base)
    ext = extents(h, MiB, base)
    check(ext[0][1] == 0 and ext[0][0] >= MiB, "written range not reported as data: %r" % ext)
    h.trim(256 * 1024, base + 256 * 1024)
    ext = extents(h, MiB, base)
    check(ext[0] == (256 * 1024, 0), "first extent after trim: %r" % ext)
    check(ext[1] == (256 * 1024, HOLE_ZERO), "trimmed extent is not a hole: %r" % ext)
    check(ext[2][1] == 0, "data after the hole: %r" % ext)
    ext = extents(h, MiB, base + 256 * 1024)
    check(ext[0] == (256 * 1024, HOLE_ZERO), "block status at the hole: %r" % ext)
    one = extents(h, MiB, base, nbd.CMD_FLAG_REQ_ONE)
    check(len(one) == 1 and one[0] == (256 * 1024, 0), "REQ_ONE: %r" % one)
    expect_bytes(h, 256 * 1024, base + 256 * 1024, bytes(256 * 1024), "trimmed range reads as zeros")
    close(h)


def test_opt_list():
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(uri("vol0"))
    check(h.aio_is_negotiating(), "not negotiating in opt mode")
    names = []
    n = h.opt_list(lambda name, description: names.append((name, description)) or 0)
    check(n == 2, "opt_list returned %d" % n)
    check(sorted(x[0] for x in names) == ["ro", "vol0"], "exports listed: %r" % names)
    # Negotiation continues after LIST.
    h.opt_go()
    check(h.get_size() == VOL0_SIZE, "size after LIST then GO: %d" % h.get_size())
    h.pread(4096, 0)
    close(h)


def test_opt_info_unknown_export():
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(uri("vol0"))
    h.set_export_name("no-such-export")
    expect_errno(h.opt_info, errno.ENOENT, "opt_info on an unknown export")
    check(h.aio_is_negotiating(), "negotiation ended after a failed INFO")
    h.set_export_name("ro")
    h.opt_info()
    check(h.get_size() == RO_SIZE and h.is_read_only(), "INFO ro: size %d" % h.get_size())
    h.set_export_name("no-such-export")
    expect_errno(h.opt_go, errno.ENOENT, "opt_go on an unknown export")
    h.set_export_name("vol0")
    h.opt_go()
    check(h.get_size() == VOL0_SIZE and not h.is_read_only(), "GO vol0")
    h.pread(4096, 0)
    close(h)


def test_multi_conn():
    a, b, c = connect(), connect(), connect()
    for h in (a, b, c):
        check(h.can_multi_conn(), "CAN_MULTI_CONN not advertised")
    base = region(11)
    data = pattern(17, 256 * 1024)
    a.pwrite(data, base)
    b.flush()
    expect_bytes(c, len(data), base, data, "C reads what A wrote after B flushed")
    data2 = pattern(18, 4096)
    c.pwrite(data2, base, nbd.CMD_FLAG_FUA)
    a.zero(4096, base + 4096)
    b.flush()
    want = data2 + bytes(4096) + data[8192:]
    expect_bytes(b, len(want), base, want, "B reads C's FUA write and A's zero")
    close(a, b, c)


def test_unaligned_requests():
    h = connect()
    check(h.get_block_size(nbd.SIZE_MINIMUM) == 512, "minimum block size")
    base = region(12)
    data = pattern(19, 4096)
    h.pwrite(data, base)
    expect_errno(lambda: h.pread(512, base + 1), errno.EINVAL, "unaligned read offset")
    expect_errno(lambda: h.pread(100, base), errno.EINVAL, "unaligned read length")
    expect_errno(lambda: h.pwrite(b"\x01" * 100, base), errno.EINVAL, "unaligned write length")
    expect_errno(lambda: h.pwrite(b"\x01" * 512, base + 256), errno.EINVAL, "unaligned write offset")
    expect_errno(lambda: h.zero(100, base), errno.EINVAL, "unaligned write-zeroes")
    still_in_step(h, base, data, "unaligned")
    close(h)


def test_fast_zero_and_df():
    h = connect()
    base = region(13)
    data = pattern(20, 16384)
    h.pwrite(data, base)
    if h.can_fast_zero():
        h.zero(4096, base, nbd.CMD_FLAG_FAST_ZERO)
    else:
        h.zero(4096, base)
    h.zero(4096, base + 8192, nbd.CMD_FLAG_NO_HOLE)
    want = bytes(4096) + data[4096:8192] + bytes(4096) + data[12288:]
    check(h.can_df(), "DF not advertised with structured replies")
    chunks = []

    def cb(subbuf, offset, status, err):
        chunks.append((offset, bytes(subbuf), status))
        return 0

    buf = h.pread_structured(len(want), base, cb, nbd.CMD_FLAG_DF)
    check(bytes(buf) == want, "DF read has the wrong bytes")
    check(len(chunks) == 1 and chunks[0][0] == base, "DF read not in one chunk: %d" % len(chunks))
    close(h)


# ---------------------------------------------------------------------------------------
# Negative controls: each of these MUST fail.


def negative_wrong_bytes():
    h = connect()
    base = region(20)
    h.pwrite(pattern(30, 4096), base)
    try:
        expect_bytes(h, 4096, base, pattern(31, 4096), "deliberately wrong bytes")
    finally:
        close(h)


def negative_wrong_errno():
    h = connect()
    try:
        # The server answers ENOSPC here.
        expect_errno(lambda: h.pwrite(b"\x01" * 512, VOL0_SIZE), errno.EINVAL, "deliberately wrong errno")
    finally:
        close(h)


def negative_error_expected_on_success():
    h = connect()
    try:
        expect_errno(lambda: h.pread(4096, 0), errno.EINVAL, "a valid read deliberately expected to fail")
    finally:
        close(h)


def negative_hole_expected_on_data():
    h = connect(meta=True)
    base = region(21)
    h.pwrite(pattern(32, 4096), base)
    try:
        ext = extents(h, 4096, base)
        check(ext[0][1] == HOLE_ZERO, "deliberately expecting a hole on written data: %r" % ext)
    finally:
        close(h)


TESTS = [
    test_read_past_end,
    test_write_past_end,
    test_offset_wraparound,
    test_oversize_read_structured,
    test_oversize_read_simple,
    test_oversize_write,
    test_unknown_command_flags,
    test_block_status_without_context,
    test_simple_replies,
    test_zero_length_requests,
    test_read_only_export,
    test_fua_writes,
    test_cache,
    test_block_status_hole_after_trim,
    test_opt_list,
    test_opt_info_unknown_export,
    test_multi_conn,
    test_unaligned_requests,
    test_fast_zero_and_df,
]

NEGATIVE = [
    negative_wrong_bytes,
    negative_wrong_errno,
    negative_error_expected_on_success,
    negative_hole_expected_on_data,
]


def main():
    global HOST, PORT
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    negative = "--negative-control" in sys.argv[1:]
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    HOST, PORT = args[0], int(args[1])
    passed = failed = 0
    for test in NEGATIVE if negative else TESTS:
        try:
            test()
        except (CheckFailed, nbd.Error) as e:
            failed += 1
            print("FAIL %s: %s" % (test.__name__, e))
        except Exception:
            failed += 1
            print("FAIL %s: unexpected exception\n%s" % (test.__name__, traceback.format_exc()))
        else:
            passed += 1
            print("PASS %s" % test.__name__)
        sys.stdout.flush()
    print("%d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
