#!/usr/bin/env python3
"""Records the client->server bytes of real NBD clients as fuzz seeds.

record_proxy.py LISTEN_PORT SERVER_PORT OUT_PREFIX
Each accepted connection is forwarded to 127.0.0.1:SERVER_PORT; what the client
sent is written to OUT_PREFIX.N with a leading 0 byte (fuzz_handshake's "one feed
call" split selector), so the file replays the client's whole session.
Stops after 60 s without a new connection.
"""
import socket
import sys
import threading

listen_port, server_port, prefix = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
MAX_BYTES = 64 * 1024  # keep seeds small: the rest of a long session adds nothing


def pump(src, dst, record):
    try:
        while True:
            b = src.recv(65536)
            if not b:
                break
            if record is not None and len(record) < MAX_BYTES:
                record.extend(b[: MAX_BYTES - len(record)])
            dst.sendall(b)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def main():
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", listen_port))
    ls.listen(16)
    ls.settimeout(60)
    n = 0
    while True:
        try:
            c, _ = ls.accept()
        except socket.timeout:
            return
        s = socket.create_connection(("127.0.0.1", server_port))
        rec = bytearray()
        t1 = threading.Thread(target=pump, args=(c, s, rec))
        t2 = threading.Thread(target=pump, args=(s, c, None))
        t1.start()
        t2.start()

        def save(t1=t1, t2=t2, rec=rec, n=n):
            t1.join()
            t2.join()
            with open(f"{prefix}.{n}", "wb") as f:
                f.write(b"\0" + bytes(rec))

        threading.Thread(target=save).start()
        n += 1


if __name__ == "__main__":
    main()
