"""Steady running: the gaps between a 1 ms ticker's heartbeats under pyvmm and QEMU 10.

    python3 bench/steady.py [--seconds 10] [--rounds 3]      # as root, with /dev/kvm
    python3 bench/steady.py --period-us 1 --seconds 3        # what a heartbeat line costs

Issue 12's steady-running goal compares the largest gap between two ticks over ten
seconds; `pyvmm bench downtime --baselines qemu10` reports that one number per row,
and one maximum per VMM is mostly the host's noise.  This boots the ticker guest
(period_us=1000) under pyvmm, then under QEMU 10.2.2 (`-M microvm` and `-cpu qemu64`
as the downtime bench runs it, but plain RAM and no monitor: nothing here is
updated), `--rounds` times in turn, lets each run about `--seconds` after boot,
and prints the whole distribution of the gaps: as the lines reached the host (read
with blocking reads, stamped CLOCK_MONOTONIC) and by the guest's own clock (t_us),
median, p99, p99.9, max and how many exceeded 5 ms, and the CPU time the hypervisor
under this machine took from it meanwhile (/proc/stat's steal, all CPUs): stalls
no scheduler here can see.  Without QEMU 10 built (python3 bench/qemu10.py) only
pyvmm runs.  With `--period-us 1` the ticker prints as fast as it can, so the
median gap by the guest's clock is what one 45-byte heartbeat line costs the guest
under each VMM (its port I/O): a line longer than the period makes every pause
that lands in it cost a whole tick more (docs/BENCHMARKS.md, "The heartbeat's
own cost").
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import qemu10  # noqa: E402
from bench.downtime.heartbeat import TICK_RX  # noqa: E402

KERNEL = ROOT / "guest/build/ticker.elf"
SKIP = 100   # ticks of boot left out


def command(vmm: str, ticks: int, period_us: int = 1000, kernel: Path = KERNEL) -> list[str]:
    args = f"period_us={period_us} count={ticks}"
    if vmm == "pyvmm":
        return [sys.executable, "-m", "vmm", "run", "--kernel", str(kernel), "--cmdline", args]
    return [str(qemu10.binary()), "-L", qemu10.FIRMWARE_DIR,
            "-M", "microvm,x-option-roms=off,rtc=off", "-accel", "kvm", "-cpu", "qemu64",
            "-m", "256M", "-nodefaults", "-no-user-config", "-display", "none",
            "-serial", "stdio", "-monitor", "none", "-no-reboot",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
            "-kernel", str(kernel), "-append", args]


def heartbeats(vmm: str, ticks: int, period_us: int = 1000,
               kernel: Path = KERNEL) -> tuple[list[float], list[int]]:
    """Arrival times (s) and the guest's t_us of each tick line, boot left out."""
    p = subprocess.Popen(command(vmm, ticks, period_us, kernel), stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, cwd=ROOT)
    arrived, t_us, buf = [], [], b""
    while chunk := os.read(p.stdout.fileno(), 65536):
        now = time.monotonic()
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            m = TICK_RX.search(line.decode(errors="replace"))
            if m:
                arrived.append(now)
                t_us.append(int(m.group(2)))
    p.wait()
    return arrived[SKIP:], t_us[SKIP:]


def steal_ms() -> float:
    """CPU time stolen from this machine since boot, all CPUs (/proc/stat, ms)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()   # "cpu user nice system idle iowait irq softirq steal"
    return int(fields[8]) * 1000 / os.sysconf("SC_CLK_TCK")


def describe(gaps_ms: list[float]) -> str:
    g = sorted(gaps_ms)
    q = lambda f: g[min(len(g) - 1, int(len(g) * f))]   # noqa: E731
    return (f"median {q(0.5):.2f}  p99 {q(0.99):.2f}  p99.9 {q(0.999):.2f}  max {g[-1]:.2f}  "
            f">5 ms: {sum(x > 5 for x in g)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--period-us", type=int, default=1000,
                    help="the ticker's period (1: as fast as it prints)")
    ap.add_argument("--kernel", type=Path, default=KERNEL,
                    help="another build of the ticker guest (e.g. an older commit's)")
    args = ap.parse_args()
    vmms = ["pyvmm"] + (["qemu10"] if qemu10.binary() else [])
    if len(vmms) == 1:
        print(f"QEMU {qemu10.VERSION} is not built ({qemu10.HOW_TO_BUILD}): pyvmm only")
    # (a tick at most every period, and a line takes 0.4-1.2 ms of port I/O here)
    ticks = SKIP + int(args.seconds * 1e6 / max(args.period_us, 400))
    print("gaps between two tick lines in ms: as the host read them | by the guest's clock | "
          "CPU time stolen by the hypervisor below meanwhile")
    for _ in range(args.rounds):
        for vmm in vmms:
            stolen = steal_ms()
            arrived, t_us = heartbeats(vmm, ticks, args.period_us, args.kernel.resolve())
            stolen = steal_ms() - stolen
            host = [(b - a) * 1e3 for a, b in zip(arrived, arrived[1:])]
            guest = [(b - a) / 1e3 for a, b in zip(t_us, t_us[1:])]
            print(f"{vmm:6} {arrived[-1] - arrived[0]:5.1f} s | {describe(host)} | "
                  f"{describe(guest)} | steal {stolen:.0f} ms", flush=True)


if __name__ == "__main__":
    main()
