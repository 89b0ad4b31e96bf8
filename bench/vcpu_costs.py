"""What each added vCPU costs a live update, in one process (docs/BENCHMARKS.md, "Downtime
against the vCPU count").

    python3 bench/vcpu_costs.py [--reps 40] [--vcpus 1,2,4,8]      # as root, with /dev/kvm

For each vCPU count it boots the smp guest idle (vCPU 0 works, the others halt; the
shape `pyvmm bench downtime --vcpus ... --vcpu-load idle` updates) and repeats what a
cpr-transfer does to the vCPUs, without the processes around it: pause every vCPU,
save_state(); restore_state() into a second machine of the same shape, paused, that
wrote its own state back first (as the new VMM does before the stop,
Incoming.prepare); resume the first and wait until its last vCPU is back in KVM_RUN.  Prints the median and p90 of each step in µs and
each median's least-squares slope per added vCPU.  End to end, the same costs are
lost in the noise of a shared 2-core host; here they are measured alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vmm.machine import FdConsole, Machine, MachineConfig  # noqa: E402
from vmm.memory import MiB  # noqa: E402

STEPS = ("pause", "save", "restore", "wake")


def now() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def measure(vcpus: int, reps: int, console) -> dict[str, list[float]]:
    """Each step's times in µs over `reps` rounds on an idle smp guest with `vcpus`."""
    sleepers = f" sleepers={vcpus - 1} wake_ms=500" if vcpus > 1 else ""
    config = MachineConfig(kernel=str(ROOT / "guest/build/smp.elf"), memory=256 * MiB,
                           vcpus=vcpus, cmdline="ipi_us=1000" + sleepers, console=console)
    m, new = Machine(config), Machine(config)
    times: dict[str, list[float]] = {step: [] for step in STEPS}
    try:
        m.create()
        m.boot()
        m.start()
        new.create(cpuids=[v.cpuid_bytes for v in m.vcpus], restoring=True)
        new.start(paused=True)
        own = new.save_state()
        time.sleep(0.5)
        for v in m.vcpus:
            v.warm_up()
        for _ in range(reps):
            time.sleep(0.005)
            new.restore_state(own, advance_time=False)
            t0 = now()
            m.pause()
            t1 = now()
            state = m.save_state()
            t2 = now()
            new.restore_state(state)
            t3 = now()
            m.resume()
            t4 = m.wait_entered()
            for step, (a, b) in zip(STEPS, ((t0, t1), (t1, t2), (t2, t3), (t3, t4))):
                times[step].append((b - a) / 1000)
    finally:
        m.close()
        new.close()
    return times


def slope(points: list[tuple[int, float]]) -> float:
    mx = statistics.mean(n for n, _ in points)
    my = statistics.mean(y for _, y in points)
    return sum((n - mx) * (y - my) for n, y in points) / sum((n - mx) ** 2 for n, _ in points)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--vcpus", default="1,2,4,8")
    args = ap.parse_args()
    counts = [int(n) for n in args.vcpus.split(",")]
    console = FdConsole(os.open(os.devnull, os.O_WRONLY))
    medians: dict[str, list[tuple[int, float]]] = {step: [] for step in STEPS}
    print("| vCPUs | " + " | ".join(f"{s} µs (median / p90)" for s in STEPS) + " |")
    print("|---|" + "---|" * len(STEPS))
    for n in counts:
        times = measure(n, args.reps, console)
        cells = []
        for step in STEPS:
            med = statistics.median(times[step])
            medians[step].append((n, med))
            cells.append(f"{med:.0f} / {statistics.quantiles(times[step], n=10)[8]:.0f}")
        print(f"| {n} | " + " | ".join(cells) + " |", flush=True)
    if len(counts) > 1:
        print("| slope µs/vCPU | " + " | ".join(f"{slope(medians[s]):.0f}" for s in STEPS) + " |")


if __name__ == "__main__":
    main()
