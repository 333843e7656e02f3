#!/usr/bin/env python3
# Recording TCP proxy: listens on 127.0.0.1:3261, forwards to 127.0.0.1:3260, and writes
# each connection's bytes per direction to conn<N>.i2t / conn<N>.t2i.
import socket, threading, sys
def pump(src, dst, path):
    with open(path, "wb") as f:
        while True:
            b = src.recv(65536)
            if not b:
                break
            f.write(b); f.flush()
            dst.sendall(b)
    try: dst.shutdown(socket.SHUT_WR)
    except OSError: pass
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", 3261)); ls.listen(8)
n = 0
while True:
    c, _ = ls.accept(); n += 1
    u = socket.create_connection(("127.0.0.1", 3260))
    threading.Thread(target=pump, args=(c, u, f"conn{n}.i2t"), daemon=True).start()
    threading.Thread(target=pump, args=(u, c, f"conn{n}.t2i"), daemon=True).start()
