"""A plain socket copy: the yardstick a migration's pass 1 is held against.

The receiver (run in one host namespace) accepts one TCP connection and reads
until EOF; the sender (in the other) sends N bytes from a memfd with
`os.sendfile`, as a VMM would send guest RAM.  The receiver prints one JSON line:
bytes, seconds from the connection's first byte to EOF, and MB/s (10^6 bytes).

    python -m bench.sockcopy recv PORT
    python -m bench.sockcopy send HOST PORT NBYTES
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

CHUNK = 1 << 20


def receive(port: int, ready=None) -> dict:
    """Accept one connection on `port` and read it to EOF; `ready()` once listening."""
    with socket.create_server(("0.0.0.0", port), reuse_port=False) as srv:
        if ready:
            ready()
        conn, _ = srv.accept()
    buf = bytearray(CHUNK)
    got = 0
    with conn:
        n = conn.recv_into(buf)
        t0 = time.monotonic()
        while n:
            got += n
            n = conn.recv_into(buf)
        dt = time.monotonic() - t0
    return {"bytes": got, "seconds": dt, "MBps": got / dt / 1e6 if dt else 0.0}


def send(host: str, port: int, nbytes: int) -> None:
    """Send `nbytes` of a memfd (every page written, none all zeros) to host:port."""
    fd = os.memfd_create("sockcopy")
    try:
        os.ftruncate(fd, nbytes)
        page = bytes(range(256)) * 16
        with os.fdopen(os.dup(fd), "r+b", buffering=0) as f:
            for _ in range(0, nbytes, len(page) * 256):
                f.write(page * 256)
        with socket.create_connection((host, port), timeout=30) as s:
            s.settimeout(None)          # blocking: sendfile on a timeout socket gives EAGAIN
            off = 0
            while off < nbytes:
                off += os.sendfile(s.fileno(), fd, off, nbytes - off)
    finally:
        os.close(fd)


def main(argv: list[str]) -> int:
    if argv[:1] == ["recv"] and len(argv) == 2:
        print(json.dumps(receive(int(argv[1]), ready=lambda: print("listening", flush=True))))
        return 0
    if argv[:1] == ["send"] and len(argv) == 4:
        send(argv[1], int(argv[2]), int(argv[3]))
        return 0
    print("usage: python -m bench.sockcopy recv PORT | send HOST PORT NBYTES", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
