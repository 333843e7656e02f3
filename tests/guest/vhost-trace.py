#!/usr/bin/env python3
"""Logs the vhost-user messages between a front end (QEMU) and a back end.

    tests/guest/vhost-trace.py FRONT_SOCKET BACK_SOCKET [LOG]

Listens on FRONT_SOCKET (give it to QEMU's -chardev socket,path=...), connects to
BACK_SOCKET (ringblk's --vhost socket or qemu-storage-daemon's export) for each
front-end connection, and forwards bytes and file descriptors (SCM_RIGHTS) both ways
unchanged, printing one line per message: direction, request name, flags, size and
the first payload words (features as hex). A debugging aid for the vhost_guest
test's peer, not part of any test.
"""
import array
import os
import select
import socket
import struct
import sys

FRONT_REQ = {
    1: "GET_FEATURES", 2: "SET_FEATURES", 3: "SET_OWNER", 4: "RESET_OWNER",
    5: "SET_MEM_TABLE", 6: "SET_LOG_BASE", 7: "SET_LOG_FD", 8: "SET_VRING_NUM",
    9: "SET_VRING_ADDR", 10: "SET_VRING_BASE", 11: "GET_VRING_BASE",
    12: "SET_VRING_KICK", 13: "SET_VRING_CALL", 14: "SET_VRING_ERR",
    15: "GET_PROTOCOL_FEATURES", 16: "SET_PROTOCOL_FEATURES", 17: "GET_QUEUE_NUM",
    18: "SET_VRING_ENABLE", 19: "SEND_RARP", 20: "NET_SET_MTU",
    21: "SET_BACKEND_REQ_FD", 22: "IOTLB_MSG", 23: "SET_VRING_ENDIAN",
    24: "GET_CONFIG", 25: "SET_CONFIG", 26: "CREATE_CRYPTO_SESSION",
    27: "CLOSE_CRYPTO_SESSION", 28: "POSTCOPY_ADVISE", 29: "POSTCOPY_LISTEN",
    30: "POSTCOPY_END", 31: "GET_INFLIGHT_FD", 32: "SET_INFLIGHT_FD",
    33: "GPU_SET_SOCKET", 34: "RESET_DEVICE", 36: "GET_MAX_MEM_SLOTS",
    37: "ADD_MEM_REG", 38: "REM_MEM_REG", 39: "SET_STATUS", 40: "GET_STATUS",
    41: "GET_SHARED_OBJECT", 42: "SET_DEVICE_STATE_FD", 43: "CHECK_DEVICE_STATE",
}


class Stream:
    """One direction: forwards bytes and fds, decodes message headers for the log."""

    def __init__(self, name, src, dst, names, log):
        self.name, self.src, self.dst, self.names, self.log = name, src, dst, names, log

    def recv_exact(self, n, fds):
        """n bytes (or fewer at EOF); file descriptors that came with them into fds."""
        data = b""
        while len(data) < n:
            chunk, anc, _flags, _addr = self.src.recvmsg(n - len(data), socket.CMSG_SPACE(64 * 4))
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % 4])
            if not chunk:
                break
            data += chunk
        return data

    def pump(self):
        """Forwards one whole message with its fds (the kernel attaches the sender's fds
        to the bytes of its sendmsg; reading message by message keeps them there)."""
        fds = array.array("i")
        head = self.recv_exact(12, fds)
        if len(head) < 12:
            return False
        req, flags, size = struct.unpack("<III", head)
        payload = self.recv_exact(size, fds)
        if len(payload) < size:
            return False
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)] if fds else []
        self.dst.sendmsg([head + payload], anc)
        for fd in fds:
            os.close(fd)
        self.log_message(req, flags, payload, len(fds))
        return True

    def log_message(self, req, flags, payload, nfds):
        size = len(payload)
        reply = " reply" if flags & 0x4 else ""
        need = " need_reply" if flags & 0x8 else ""
        name = self.names.get(req, f"REQ{req}")
        words = ""
        if size == 8:
            (v,) = struct.unpack("<Q", payload)
            words = f" u64={v:#x}"
        elif size >= 8:
            n = min(size // 4, 6)
            words = " " + " ".join(f"{w:#x}" for w in struct.unpack_from(f"<{n}I", payload))
        fds = f" fds={nfds}" if nfds else ""
        self.log.write(f"{self.name} {name}{reply}{need} size={size}{words}{fds}\n")
        self.log.flush()


def serve(front_path, back_path, log):
    try:
        os.unlink(front_path)
    except FileNotFoundError:
        pass
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(front_path)
    lst.listen(4)
    n = 0
    while True:
        front, _ = lst.accept()
        n += 1
        back = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        back.connect(back_path)
        log.write(f"--- connection {n}\n")
        # Both directions carry front-end request numbers, except the back end's own
        # channel (SET_BACKEND_REQ_FD), which this proxy does not follow.
        a = Stream("F>B", front, back, FRONT_REQ, log)
        b = Stream("B>F", back, front, FRONT_REQ, log)
        by_sock = {front: a, back: b}
        open_ = True
        while open_:
            ready, _, _ = select.select([front, back], [], [])
            for s in ready:
                try:
                    if not by_sock[s].pump():
                        open_ = False
                except OSError as e:
                    log.write(f"--- {by_sock[s].name} error {e}\n")
                    open_ = False
        log.write(f"--- connection {n} closed\n")
        log.flush()
        front.close()
        back.close()


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    out = open(sys.argv[3], "w") if len(sys.argv) > 3 else sys.stdout
    serve(sys.argv[1], sys.argv[2], out)
