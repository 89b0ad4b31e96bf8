"""What writing into fresh guest RAM costs on this host, and what --mem-prealloc buys.

    python3 bench/fresh_pages.py [--size 4G] [--rest 20]

A migration's destination writes every page of pass 1 into RAM it has just made.
On a host that backs its own memory lazily (a VM whose free pages go back to its
hypervisor, as this project's CI machine), a first write to a page costs far more
than a copy.  This writes SIZE into a new memfd (pwrite, 1 MiB at a time, as
csrc/migrate.c's pwritev does), then into a new memfd that GuestMemory.prealloc()
allocated first (MADV_POPULATE_WRITE), each after `--rest` seconds of nothing (so
that the pages the previous step freed have gone back), and prints the rates.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from vmm.memory import GuestMemory, parse_size  # noqa: E402

CHUNK = 1 << 20


def write_all(mem: GuestMemory) -> float:
    buf = os.urandom(CHUNK)
    t = time.monotonic()
    for off in range(0, mem.size, CHUNK):
        os.pwrite(mem.fd, buf, off)
    return time.monotonic() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="4G")
    ap.add_argument("--rest", type=float, default=20.0)
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    mb = size / 1e6
    time.sleep(args.rest)
    mem = GuestMemory(size)
    w = write_all(mem)
    mem.close()
    print(f"fresh memfd: written at {mb / w:.0f} MB/s ({w:.2f} s)")
    time.sleep(args.rest)
    mem = GuestMemory(size)
    t = time.monotonic()
    mem.prealloc()
    p = time.monotonic() - t
    w = write_all(mem)
    mem.close()
    print(f"preallocated: prealloc {p:.2f} s ({mb / p:.0f} MB/s), then written at "
          f"{mb / w:.0f} MB/s ({w:.2f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
