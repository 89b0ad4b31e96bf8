"""How fast a migration's destination writes pass 1 into RAM: pwritev, or a copy.

    python3 bench/apply_pages.py [--size 1G] [--rounds 3]

Applies SIZE of PAGE sections (256 whole pages each, as the sender packs them) with
csrc/migrate.c's pyvmm_mig_apply into RAM that GuestMemory.prealloc() allocated, once
with pwritev on the memfd (how pages go into RAM allocated as they come) and once
copied into the mapping (how they go into RAM --mem-prealloc allocated), and prints
both rates.  Either way the pages are already allocated: this is the write alone.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from vmm.memory import GuestMemory, parse_size  # noqa: E402
from vmm.migration.pages import BATCH_PAGES, PAGE, Applier  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    mem = GuestMemory(size)
    mem.prealloc()
    data = os.urandom(PAGE)
    sections = [b"".join(struct.pack("<Q", (first + i) << 12) + data for i in range(BATCH_PAGES))
                for first in range(0, size // PAGE, BATCH_PAGES)]
    pages = Applier(mem)
    try:
        for _ in range(args.rounds):
            for copy in (False, True):
                mem.preallocated = copy   # (what Applier.apply looks at to choose)
                t = time.perf_counter()
                for section in sections:
                    pages.apply(memoryview(section))
                dt = time.perf_counter() - t
                print(f"{'copied into the mapping' if copy else 'pwritev on the memfd  '}: "
                      f"{size / dt / 1e9:.2f} GB/s")
    finally:
        mem.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
