"""Boot latency and port-IO exit cost: pyvmm beside Debian's QEMU, same guest image.

    python bench/boot_and_exits.py [--runs 10]

(1) time from starting the VMM process to the guest's first serial byte;
(2) the round trip of a port-IO exit handled by the VMM (the `hello` guest's
    bench_pio=N mode: N `outb` to port 0x80 from ring 0, timed with the TSC).
Prints a Markdown table (median and min over the runs).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HELLO = ROOT / "guest" / "build" / "hello.elf"
QEMU = shutil.which("qemu-system-x86_64")
QEMU_ARGS = ["-M", "microvm,x-option-roms=off,rtc=off", "-accel", "kvm", "-cpu", "qemu64,+invtsc",
             "-m", "256M", "-nodefaults", "-no-user-config", "-display", "none", "-serial",
             "stdio", "-monitor", "none", "-no-reboot", "-device",
             "isa-debug-exit,iobase=0xf4,iosize=4"]


def pyvmm_cmd(cmdline: str) -> list[str]:
    return [sys.executable, "-m", "vmm", "run", "--kernel", str(HELLO), "--cmdline", cmdline]


def qemu_cmd(cmdline: str) -> list[str]:
    return [QEMU, *QEMU_ARGS, "-kernel", str(HELLO), "-append", cmdline]


def first_byte_ms(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         stdin=subprocess.DEVNULL, cwd=ROOT)
    p.stdout.read(1)
    t = (time.perf_counter() - t0) * 1000
    p.stdout.read()
    p.wait()
    return t


def pio_ns(cmd: list[str]) -> float:
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120).stdout
    return float(re.search(r"bench_pio: \d+ exits, (\d+) ns each", out).group(1))


def row(name, values, unit):
    return f"| {name} | {statistics.median(values):.1f} {unit} | {min(values):.1f} {unit} |"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--exits", type=int, default=20000)
    args = ap.parse_args()
    vmms = [("pyvmm", pyvmm_cmd)] + ([("QEMU microvm", qemu_cmd)] if QEMU else [])
    lines = ["| measurement | median | min |", "|---|---|---|"]
    results = {}
    for name, cmd in vmms:
        boot = [first_byte_ms(cmd("")) for _ in range(args.runs)]
        pio = [pio_ns(cmd(f"bench_pio={args.exits}")) for _ in range(max(3, args.runs // 3))]
        results[name] = (statistics.median(boot), statistics.median(pio))
        lines.append(row(f"{name}: start to first serial byte", boot, "ms"))
        lines.append(row(f"{name}: port-IO exit round trip", [p / 1000 for p in pio], "µs"))
    print("\n".join(lines))
    if len(results) == 2:
        (pb, pp), (qb, qp) = results["pyvmm"], results["QEMU microvm"]
        print(f"\npyvmm/QEMU: first byte {pb / qb:.2f}x, port-IO exit {pp / qp:.2f}x")
    return 0


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
