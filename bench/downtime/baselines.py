"""The sweep's baselines on the same ticker guest image.

(a) a naive snapshot done in-process with pyvmm's own API: pause, save state, copy
    guest RAM to a file and back, restore, resume;
(b) Debian's QEMU doing a local live migration with RAM in a shared /dev/shm file
    and `x-ignore-shared` (RAM not copied).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from pathlib import Path

from bench.downtime.heartbeat import TICK_RX, heartbeat_views, joined_lines
from bench.vmms import BUILD, HEARTBEAT_US, BenchError, Cleanup, Proc
from vmm.client import QmpClient
from vmm.client.cpr import wait_migration
from vmm.errors import VmmError
from vmm.memory import MiB

QEMU = shutil.which("qemu-system-x86_64")


# -- baseline (a): naive snapshot, in-process with pyvmm's own API -----------------------------
def run_naive(reg: Cleanup, size: int, reps: int, on_rep) -> list[dict]:
    """pause, save state, guest RAM -> file -> guest RAM, restore, resume; time pause..resume."""
    from vmm.machine import Machine, MachineConfig

    results = []
    chunk = 64 * MiB
    for rep in range(reps):
        lines: list[tuple[float, str]] = []
        buf = bytearray()

        def console(b: bytes):
            t = time.monotonic()
            buf.extend(b)
            while b"\n" in buf:
                i = buf.index(b"\n")
                lines.append((t, buf[:i].decode(errors="replace").rstrip("\r")))
                del buf[:i + 1]

        m = Machine(MachineConfig(kernel=str(BUILD / "ticker.elf"), memory=size,
                                  cmdline=f"period_us={HEARTBEAT_US}", console=console))
        path = reg.tmp / "naive-snapshot.ram"
        try:
            m.create()
            m.boot()
            m.start()
            deadline = time.monotonic() + 30
            while not any(TICK_RX.search(x) and " 20 " in x for _, x in lines[-50:]):
                if time.monotonic() > deadline:
                    raise BenchError("naive baseline: the ticker did not tick")
                time.sleep(0.01)
            time.sleep(0.2)
            t_cmd = time.monotonic()
            t0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            m.pause()
            t_paused = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            state = m.save_state()
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                for r in m.memory.regions:
                    view = m.memory.view(r.gpa, r.size)
                    for off in range(0, r.size, chunk):
                        os.write(fd, view[off:off + chunk])
                t_saved = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
                os.lseek(fd, 0, os.SEEK_SET)
                for r in m.memory.regions:
                    view = m.memory.view(r.gpa, r.size)
                    for off in range(0, r.size, chunk):
                        os.readv(fd, [view[off:off + chunk]])
            finally:
                os.close(fd)
                path.unlink()
            t_loaded = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            m.restore_state(state)
            m.resume()
            t1 = m.wait_entered()
            t_done = time.monotonic()
            time.sleep(0.3)
            rec = {"mode": "naive", "size": size, "ram": "untouched", "load": "idle", "rep": rep,
                   "host_us": (t1 - t0) / 1000,
                   "phases_us": {"stop": (t_paused - t0) / 1000,
                                 "save": (t_saved - t_paused) / 1000,
                                 "restore": (t_loaded - t_saved) / 1000,
                                 "resume": (t1 - t_loaded) / 1000}}
            rec.update(heartbeat_views(list(lines), t_cmd, t_done))
            results.append(rec)
        finally:
            m.close()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        on_rep()
    return results


# -- baseline (b): QEMU live migration with shared RAM and x-ignore-shared -------------------
def qemu_cmd(size: int, shm: Path, qmp_path: Path, incoming: Path | None) -> list[str]:
    mb = size // MiB
    cmd = [QEMU, "-M", "microvm,x-option-roms=off,rtc=off,memory-backend=ram0", "-accel", "kvm",
           "-cpu", "qemu64", "-m", f"{mb}M",
           "-object", f"memory-backend-file,id=ram0,size={mb}M,mem-path={shm},share=on",
           "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
           "-monitor", "none", "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
           "-qmp", f"unix:{qmp_path},server=on,wait=off",
           "-kernel", str(BUILD / "ticker.elf"), "-append", f"period_us={HEARTBEAT_US}"]
    if incoming:
        cmd += ["-incoming", f"unix:{incoming}"]
    return cmd


def wait_socket(path: Path, proc: Proc, timeout: float = 20.0):
    """Until QEMU accepts on `path` (the file appears at bind(), before listen())."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.proc.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"QEMU did not start: {proc.stderr[-2000:]}")
        if path.exists():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                try:
                    s.connect(str(path))
                    return
                except OSError:
                    pass
        time.sleep(0.005)


def run_qemu(reg: Cleanup, size: int, reps: int, on_rep) -> list[dict]:
    results = []
    for rep in range(reps):
        shm = Path(f"/dev/shm/pyvmm-bench-{os.getpid()}-{rep}")
        reg.files.append(shm)
        sq, dq, mig = reg.tmp / "qsrc.qmp", reg.tmp / "qdst.qmp", reg.tmp / "qmig.sock"
        for f in (sq, dq, mig):
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
        try:
            src = Proc(qemu_cmd(size, shm, sq, None), reg)
            src.wait_for(r"tick 20 ", timeout=60)
            dst = Proc(qemu_cmd(size, shm, dq, mig), reg)
            wait_socket(dq, dst)
            wait_socket(sq, src)
            with QmpClient(str(sq)) as s, QmpClient(str(dq)) as d:
                for c in (s, d):
                    c.execute("migrate-set-capabilities", capabilities=[
                        {"capability": "x-ignore-shared", "state": True}])
                time.sleep(0.2)
                t_cmd = time.monotonic()
                s.execute("migrate", uri=f"unix:{mig}")
                try:   # the source QEMU does not go away: gone=(), any error propagates
                    info = wait_migration(lambda: s.execute("query-migrate"), 60.0, gone=(),
                                          poll=0.005)
                except VmmError:
                    raise BenchError("QEMU migration did not finish") from None
                t_done = time.monotonic()
                if info["status"] != "completed":
                    raise BenchError(f"QEMU migration {info['status']}: {info.get('error-desc')}")
                # QMP event timestamps are the host's wall clock, shared by both QEMUs:
                # source STOP -> destination RESUME, in µs (query-migrate's `downtime`
                # is whole milliseconds)
                stop = s.wait_event("STOP", timeout=10)["timestamp"]
                resume = d.wait_event("RESUME", timeout=10)["timestamp"]
            time.sleep(0.3)
            ev_us = (resume["seconds"] - stop["seconds"]) * 1e6 + \
                resume["microseconds"] - stop["microseconds"]
            rec = {"mode": "qemu", "size": size, "ram": "untouched", "load": "idle", "rep": rep,
                   "host_us": ev_us, "qemu_downtime_ms": info.get("downtime"), "phases_us": {},
                   "qemu_total_ms": info.get("total-time"),
                   "qemu_ram_transferred": info.get("ram", {}).get("transferred")}
            rec.update(heartbeat_views(joined_lines([src, dst]), t_cmd, t_done))
            results.append(rec)
        finally:
            reg.reap()
            with contextlib.suppress(FileNotFoundError):
                shm.unlink()
        on_rep()
    return results

