"""A numbered UDP stream to a guest's echo port (netecho), and what came back.

Used by the tests, the demo and the benchmarks, run inside the network
namespace that holds the tap (never towards any other address).

Usage: python -m bench.traffic HOST COUNT INTERVAL_S [PAYLOAD]
Sends COUNT datagrams "seq:<n>:" + padding, one every INTERVAL_S, receives the
echoes, and prints one JSON line: the sequence numbers received in order, the
largest gap between two consecutive echoes (the network's view of downtime),
and the timestamps of the first and last echo.
"""

import json
import socket
import sys
import time


def main():
    host, count, interval = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    size = int(sys.argv[4]) if len(sys.argv) > 4 else 64
    print(json.dumps(udp_stream(host, count, interval, size)))


def udp_stream(host: str, count: int, interval: float, size: int = 64) -> dict:
    """Send `count` numbered datagrams, one every `interval` s; collect the echoes."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.connect((host, 7))
    s.setblocking(False)
    got, times = [], []
    start = time.monotonic()
    sent = 0
    deadline = None
    while True:
        now = time.monotonic()
        if sent < count and now >= start + sent * interval:
            head = f"seq:{sent}:".encode()
            s.send(head + b"x" * max(0, size - len(head)))
            sent += 1
            if sent == count:
                deadline = now + 3.0
        try:
            while True:
                data = s.recv(65536)
                got.append(int(data.split(b":")[1]))
                times.append(time.monotonic())
        except BlockingIOError:
            pass
        if deadline and (len(got) >= count or time.monotonic() > deadline):
            break
        time.sleep(min(interval / 4, 0.001))
    s.close()
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {"sent": sent, "got": got, "max_gap_ms": max(gaps) * 1000 if gaps else None,
            "first": times[0] if times else None}


if __name__ == "__main__":
    main()
