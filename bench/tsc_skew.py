"""How far apart this host's CPUs' TSCs are, now and then (no KVM involved).

    python3 bench/tsc_skew.py [--runs 20] [--seconds 5]

A guest on a PVM host reads the host's TSC (KVM keeps every vCPU's offset at 0 and
ignores TSC writes there), so guest/smp.c's cross-CPU check sees whatever skew the
host's own CPUs have.  This builds csrc/tools/tsc_skew.c with the system's cc and runs
it `--runs` times, one line per run, then the worst: the figure tests/test_smp.py's
TSC_SKEW_MAX must stay above.
"""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "csrc/tools/tsc_skew.c"
BINARY = ROOT / "build/tsc_skew"


def build() -> Path:
    if not BINARY.exists() or BINARY.stat().st_mtime < SOURCE.stat().st_mtime:
        BINARY.parent.mkdir(exist_ok=True)
        subprocess.run(["cc", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread", str(SOURCE),
                        "-o", str(BINARY)], check=True)
    return BINARY


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=5)
    args = ap.parse_args(argv)
    binary = build()
    worst, seen = 0, 0
    for i in range(args.runs):
        out = subprocess.run([str(binary), str(args.seconds)], check=True, text=True,
                             capture_output=True).stdout.strip()
        print(f"run {i + 1}: {out}", flush=True)
        m = re.search(r"back=(\d+) worst=(\d+)", out)
        seen += int(m.group(1)) > 0
        worst = max(worst, int(m.group(2)))
    print(f"{seen} of {args.runs} runs saw a CPU's TSC behind another's; worst {worst} cycles")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
