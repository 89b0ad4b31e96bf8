"""The small costs behind a live update's downtime, one by one (docs/CPR.md, BENCHMARKS.md §1).

    python3 bench/cpr_costs.py            # as root, with /dev/kvm; ~20 s

Prints medians of: the interpreter's start as the cpr-exec image runs it
(`-I -S`), importing `threading` in a fresh interpreter, creating a KVM VM and
its memory slots per RAM size (and destroying it), a vCPU's get_state() and
set_state() (the first call, cffi types cold, then warm), the VM's get_state() and
set_state(), saving and encoding a machine's state, decoding it, pausing a
running vCPU, and saving and restoring the paused machine's state (its threads
parked, as in a live update).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vmm.machine import FdConsole, Machine, MachineConfig, create_kvm_parts  # noqa: E402
from vmm import state  # noqa: E402
from vmm.memory import GiB, MiB, GuestMemory  # noqa: E402


def ms(t0: int) -> float:
    return (time.perf_counter_ns() - t0) / 1e6


def timed(call) -> tuple[float, object]:
    """How long call() took in us, and what it returned."""
    t0 = time.perf_counter_ns()
    out = call()
    return (time.perf_counter_ns() - t0) / 1000, out


def alternating(first, second, reps: int) -> tuple[float, float]:
    """Median us of first() and of second(), called one after the other `reps` times."""
    a, b = [], []
    for _ in range(reps):
        a.append(timed(first)[0])
        b.append(timed(second)[0])
    return statistics.median(a), statistics.median(b)


def interpreter(reps: int = 20) -> None:
    for code in ("pass", "import threading"):
        times = []
        for _ in range(reps):
            t0 = time.perf_counter_ns()
            subprocess.run([sys.executable, "-I", "-S", "-c", code], check=True)
            times.append(ms(t0))
        print(f"python -I -S -c {code!r:20} median {statistics.median(times):6.2f} ms")


def vm_build(sizes=(256 * MiB, GiB, 4 * GiB, 16 * GiB), reps: int = 3) -> None:
    for size in sizes:
        mem = GuestMemory(size)
        build, close = [], []
        for _ in range(reps):
            t0 = time.perf_counter_ns()
            kvm, vm, cpus = create_kvm_parts(mem, 1)
            build.append(ms(t0))
            t0 = time.perf_counter_ns()
            for v in cpus:
                v.close()
            vm.close()
            kvm.close()
            close.append(ms(t0))
        mem.close()
        print(f"KVM VM + slots + vCPU, {size // MiB:6d} MiB: build {statistics.median(build):6.2f} ms,"
              f" destroy {statistics.median(close):6.2f} ms")


def vcpu_state_and_pause(reps: int = 200) -> None:
    fd = os.open(os.devnull, os.O_WRONLY)
    m = Machine(MachineConfig(kernel=str(ROOT / "guest/build/ticker.elf"), memory=256 * MiB,
                              cmdline="period_us=1000", console=FdConsole(fd)))
    try:
        m.create()
        m.boot()
        v = m.vcpus[0]
        v.msr_indices()
        first_get, saved = timed(v.get_state)
        first_set, _ = timed(lambda: v.set_state(saved))
        gets, sets = alternating(v.get_state, lambda: v.set_state(saved), reps // 4)
        print(f"vCPU get_state: first {first_get:.0f} us, then median {gets:.0f} us;"
              f" set_state: first {first_set:.0f} us, then median {sets:.0f} us")
        vm_state = m.vm.get_state()
        gets, sets = alternating(m.vm.get_state, lambda: m.vm.set_state(vm_state), reps // 4)
        print(f"VM get_state median {gets:.0f} us, set_state {sets:.0f} us")
        blob = state.dumps(m.save_state())
        enc, dec = alternating(lambda: state.dumps(m.save_state()), lambda: state.loads(blob),
                               reps // 4)
        print(f"state blob ({len(blob)} bytes): save_state + encode median "
              f"{enc:.0f} us, decode {dec:.0f} us")
        m.start()
        time.sleep(0.3)
        pauses = []
        for _ in range(reps):
            time.sleep(0.003)
            t0 = time.perf_counter_ns()
            m.pause()
            pauses.append(ms(t0) * 1000)
            m.resume()
        print(f"pause a running vCPU: median {statistics.median(pauses):.0f} us")
        m.pause()   # as in a live update: the vCPU threads exist, parked
        saved = m.save_state()
        saves, restores = alternating(m.save_state,
                                      lambda: m.restore_state(saved, advance_time=False), reps)
        print(f"paused machine: save_state median {saves:.0f} us, restore_state {restores:.0f} us")
    finally:
        m.close()
        os.close(fd)


if __name__ == "__main__":
    interpreter()
    vm_build()
    vcpu_state_and_pause()
