"""Stamp serial lines on arrival, in a process of its own.

Run by bench/downtime/qemu10.py's SerialFifo with the FIFO's read end as stdin:
each line that arrives is written to stdout as "<CLOCK_MONOTONIC seconds> <line>".
The stamp is taken here, as soon as the read returns, so it does not wait for the
benchmark's own threads (which share a GIL with the QMP client and the VMMs'
stderr readers).  At normal priority: a
SCHED_FIFO reader was tried and dropped, since it preempts the VMM it measures
on every write (QEMU writes each byte: its steady median gap went from 1.0 to
2.3 ms; docs/BENCHMARKS.md, "cpr-exec's launcher").
"""

import os
import select
import sys
import time


def main() -> int:
    os.set_blocking(0, False)
    poller = select.poll()
    poller.register(0, select.POLLIN)
    buf = b""
    out = sys.stdout.buffer
    while True:
        poller.poll()
        try:
            data = os.read(0, 65536)
        except BlockingIOError:
            continue
        t = time.monotonic()
        if not data:
            return 0
        buf += data
        *done, buf = buf.split(b"\n")
        if done:
            out.write(b"".join(b"%.6f %s\n" % (t, line) for line in done))
            out.flush()


if __name__ == "__main__":
    sys.exit(main())
