"""Baseline (c): QEMU 10's own cpr-transfer and cpr-exec, interleaved with pyvmm.

pyvmm's live update is modelled on these two modes, so this is the like-for-like
comparison: the same ticker guest (period_us=1000) on the same host, RAM in a
shared memfd (`memory-backend-memfd,share=on`, `aux-ram-share=on` for the
implicit blocks), each rep one pyvmm update then one QEMU update of the same
configuration, and for both VMMs the same measure taken the same way:

* the serial line goes to one FIFO that every VMM of the run (old and new, or
  the image before and after the exec) has as its stdout; a reader process
  (bench/downtime/stamper.py) reads it with poll() and stamps each line on
  arrival (CLOCK_MONOTONIC);
* switch gap: the gap between two heartbeat lines that contains the VMM's own
  stop..resume interval; window gap: the largest gap within ±0.5 s of the stop;
  steady gaps: the median and largest gap in the second before the update
  (the jitter a gap is measured against), and in the first rep of each row over
  the ten seconds before it (issue 12's steady-running goal: the largest gap
  between 1 ms ticks over 10 s), as the host saw the lines and as the guest's
  own clock (t_us) saw the ticks;
* the guest's own clock and maxgap (bench/downtime/heartbeat.py);
* each VMM's self-reported downtime: pyvmm's `x-downtime-us`; QEMU's
  `vmstate_downtime_checkpoint` trace events, src-downtime-start (old) to
  dst-precopy-bh-vm-started (new), stamped by QEMU itself (`-msg timestamp=on`).

QEMU 10.2.2 is built by bench/qemu10.py (not installed on the host); without it
the sweep lists this baseline under "Not run" with the command that builds it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench import qemu10
from bench.downtime.baselines import wait_socket
from bench.downtime.heartbeat import TICK_RX, heartbeat_views
from bench.lab import stop_process, wait_until_no_child
from bench.vmms import (BUILD, HEARTBEAT_US, ROOT, BenchError, Cleanup, do_update, pyvmm_cmd,
                        qmp_connect)
from vmm.memory import GiB, MiB

WINDOW_S = 0.5      # the window gap: the largest gap within this of the stop
STEADY_S = 1.0      # the steady gaps: the second of running before the update
STEADY_LONG_S = 10.0   # ... and in each row's first rep, the ten seconds before it
# QEMU 10.2's log trace backend with -msg timestamp=on: "<ISO 8601 UTC> <event> <args>"
_TRACE_RX = re.compile(r"^(\S+Z) vmstate_downtime_checkpoint (\S+)")


class SerialFifo:
    """A FIFO that the VMMs of one run write the guest's serial line to (as their
    stdout); a reader process (bench/downtime/stamper.py) stamps each line on
    arrival and a thread here collects them.  The benchmark holds a write end too,
    so no VMM exiting ends the stream."""

    def __init__(self, path: Path):
        os.mkfifo(path, 0o600)
        self.path = path
        self.rfd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self.wfd = os.open(path, os.O_WRONLY)     # what each VMM gets as its stdout
        self.lines: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._reader = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("stamper.py"))],
            stdin=self.rfd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self):
        for raw in self._reader.stdout:
            t, _, line = raw.rstrip(b"\n").partition(b" ")
            with self._cond:
                self.lines.append((float(t), line.decode(errors="replace").rstrip("\r")))
                self._cond.notify_all()

    def snapshot(self) -> list[tuple[float, str]]:
        with self._cond:
            return list(self.lines)

    def wait_for(self, pattern: str, timeout: float, start: int = 0) -> None:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while not any(rx.search(line) for _, line in self.lines[start:]):
                left = deadline - time.monotonic()
                if self._reader.poll() is not None:
                    raise BenchError("the serial line's reader (bench/downtime/stamper.py) "
                                     f"exited: {self._reader.stderr.read().decode().strip()}")
                if left <= 0:
                    tail = "\n".join(line for _, line in self.lines[-10:])
                    raise BenchError(f"no serial line matching {pattern!r} within {timeout}s;"
                                     f" last lines:\n{tail}")
                self._cond.wait(min(left, 0.5))

    def close(self):
        self._reader.terminate()
        self._reader.wait(5)
        self._thread.join(2)
        for fd in (self.rfd, self.wfd):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class FifoProc:
    """A VMM whose stdout is the run's SerialFifo; its stderr is kept (QEMU's trace
    lines).  Registered for clean-up like bench.vmms.Proc."""

    def __init__(self, cmd: list[str], fifo: SerialFifo, reg: Cleanup):
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdout=fifo.wfd, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, cwd=ROOT)
        self.err_lines: list[str] = []
        threading.Thread(target=self._read_err, daemon=True).start()
        reg.procs.append(self)

    def _read_err(self):
        for raw in self.proc.stderr:
            self.err_lines.append(raw.decode(errors="replace").rstrip("\n"))

    @property
    def stderr(self) -> str:
        return "\n".join(self.err_lines)

    def stop(self):
        stop_process(self.proc)


def wait_listening(path: Path, proc: FifoProc, what: str, timeout: float = 20.0):
    """Until an incoming VMM has bound its cpr socket (it then blocks reading it)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.proc.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"{what} did not start: {proc.stderr[-2000:]}")
        time.sleep(0.005)


# -- the measure, the same for both VMMs -----------------------------------------------------
def switch_views(lines, t_stop: float, t_resume: float, steady_s: float = STEADY_S) -> dict:
    """The host-stamped heartbeat around one update whose own stop and resume times
    (CLOCK_MONOTONIC seconds) are given, and the steady running in the `steady_s`
    seconds before it: see the module docstring."""
    ticks = [(t, m) for t, line in lines if (m := TICK_RX.search(line))]
    ts = [t for t, _ in ticks]
    gaps = [(a, b) for a, b in zip(ts, ts[1:])]
    over = [b - a for a, b in gaps if b > t_stop and a < t_resume]
    window = [b - a for a, b in gaps if b > t_stop - WINDOW_S and a < t_resume + WINDOW_S]
    lo, hi = t_stop - steady_s - 0.1, t_stop - 0.1
    steady = sorted(b - a for a, b in gaps if lo <= a and b < hi)
    # the guest's own clock between consecutive ticks in that window
    calm = [(int(m.group(1)), int(m.group(2))) for t, m in ticks if lo <= t < hi]
    guest = [tb - ta for (na, ta), (nb, tb) in zip(calm, calm[1:]) if nb == na + 1]
    return {"switch_gap_us": max(over) * 1e6 if over else None,
            "window_gap_us": max(window) * 1e6 if window else None,
            "steady_s": steady_s,
            "steady_median_gap_us": steady[len(steady) // 2] * 1e6 if steady else None,
            "steady_max_gap_us": steady[-1] * 1e6 if steady else None,
            "steady_guest_max_gap_us": max(guest) if guest else None}


def qemu_trace_marks(stderr: str, wall_to_mono: float) -> dict[str, float]:
    """QEMU's vmstate_downtime_checkpoint events as CLOCK_MONOTONIC seconds."""
    out = {}
    for line in stderr.splitlines():
        m = _TRACE_RX.match(line)
        if m:
            wall = datetime.datetime.fromisoformat(m.group(1).replace("Z", "+00:00"))
            out[m.group(2)] = wall.timestamp() - wall_to_mono
    return out


def _record(vmm: str, mode: str, size: int, rep: int, lines, t_cmd, t_done,
            t_stop, t_resume, steady_s: float) -> dict:
    rec = {"mode": f"qemu10-{mode}" if vmm == "qemu10" else mode, "vs": "qemu10",
           "size": size, "ram": "untouched", "load": "idle", "rep": rep,
           "host_us": (t_resume - t_stop) * 1e6, "phases_us": {}}
    rec.update(heartbeat_views(lines, t_cmd, t_done))
    rec.update(switch_views(lines, t_stop, t_resume, steady_s))
    return rec


# -- one update of each ----------------------------------------------------------------------
def qemu10_cmd(binary: Path, size: int, qmp_path: Path) -> list[str]:
    mb = size // MiB
    return [str(binary), "-L", qemu10.FIRMWARE_DIR,
            "-M", "microvm,x-option-roms=off,rtc=off,memory-backend=ram0,aux-ram-share=on",
            "-accel", "kvm", "-cpu", "qemu64", "-m", f"{mb}M",
            "-object", f"memory-backend-memfd,id=ram0,size={mb}M,share=on",
            "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
            "-monitor", "none", "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
            "-qmp", f"unix:{qmp_path},server=on,wait=off",
            "-msg", "timestamp=on", "-trace", "vmstate_downtime_checkpoint",
            "-kernel", str(BUILD / "ticker.elf"), "-append", f"period_us={HEARTBEAT_US}"]


def _fresh(*paths: Path):
    for f in paths:
        with contextlib.suppress(FileNotFoundError):
            f.unlink()


def steady_window(rep: int) -> float:
    """How long the guest runs untouched before the update: ten seconds in a row's
    first rep (for both VMMs), a second in the others."""
    return STEADY_LONG_S if rep == 0 else STEADY_S


def qemu10_update(reg: Cleanup, binary: Path, mode: str, size: int, rep: int) -> dict:
    """Boot the ticker under QEMU 10, let it run, live-update it once; one record."""
    fifo = SerialFifo(reg.tmp / f"q10-serial-{rep}")
    try:
        qmp, new_qmp = reg.tmp / "q10.qmp", reg.tmp / "q10new.qmp"
        mig, cpr, state = reg.tmp / "q10mig.sock", reg.tmp / "q10cpr.sock", reg.tmp / "q10.state"
        _fresh(qmp, new_qmp, mig, cpr, state)
        cmd = qemu10_cmd(binary, size, qmp)
        old = FifoProc(cmd, fifo, reg)
        fifo.wait_for(r"tick 20 ", timeout=max(60, size / GiB * 40))
        wait_socket(qmp, old)
        new = None
        if mode == "transfer":
            channel = {"channel-type": "cpr",
                       "addr": {"transport": "socket", "type": "unix", "path": str(cpr)}}
            new = FifoProc(qemu10_cmd(binary, size, new_qmp) +
                           ["-incoming", f"unix:{mig}", "-incoming", json.dumps(channel)],
                           fifo, reg)
            wait_listening(cpr, new, "incoming QEMU 10")
        steady_s = steady_window(rep)
        time.sleep(0.2 + steady_s)
        wall_to_mono = time.time() - time.monotonic()
        with qmp_connect(qmp) as q:
            if mode == "transfer":
                q.execute("migrate-set-parameters", mode="cpr-transfer")
                t_cmd = time.monotonic()
                q.execute("migrate", channels=[
                    {"channel-type": "main",
                     "addr": {"transport": "socket", "type": "unix", "path": str(mig)}},
                    channel])
            else:
                q.execute("migrate-set-parameters", mode="cpr-exec",
                          **{"cpr-exec-command": cmd + ["-incoming", f"file:{state}"]})
                t_cmd = time.monotonic()
                q.execute("migrate", uri=f"file:{state}")
        # The update is done when the QEMU that runs the guest now (the new process,
        # or the same one after its exec) has traced its vm_start.
        running = new or old
        deadline = time.monotonic() + 60
        while "dst-precopy-bh-vm-started" not in running.stderr:
            if time.monotonic() > deadline or running.proc.poll() is not None:
                raise BenchError(f"QEMU 10 cpr-{mode}: the guest did not run again: "
                                 f"{(old.stderr + running.stderr)[-1500:]}")
            time.sleep(0.002)
        t_done = time.monotonic()
        time.sleep(WINDOW_S + 0.1)
        marks = qemu_trace_marks((new or old).stderr + "\n" + old.stderr, wall_to_mono)
        if "src-downtime-start" not in marks or "dst-precopy-bh-vm-started" not in marks:
            raise BenchError(f"QEMU 10 cpr-{mode}: no vmstate_downtime_checkpoint trace "
                             f"lines: {(new or old).stderr[-1500:]}")
        return _record("qemu10", mode, size, rep, fifo.snapshot(), t_cmd, t_done,
                       marks["src-downtime-start"], marks["dst-precopy-bh-vm-started"],
                       steady_s)
    finally:
        reg.reap()
        fifo.close()
        _fresh(reg.tmp / "q10.state")


def pyvmm_update(reg: Cleanup, mode: str, size: int, rep: int) -> dict:
    """The same for pyvmm: the ticker's serial line (pyvmm's stdout) into a FIFO."""
    fifo = SerialFifo(reg.tmp / f"pv-serial-{rep}")
    try:
        qmp, new_qmp, sock = reg.tmp / "pv.qmp", reg.tmp / "pvnew.qmp", reg.tmp / "pv.cpr"
        _fresh(qmp, new_qmp, sock)
        old = FifoProc(pyvmm_cmd("run", "--kernel", str(BUILD / "ticker.elf"),
                                 "--memory", f"{size // MiB}M",
                                 "--cmdline", f"period_us={HEARTBEAT_US}", "--qmp", str(qmp)),
                       fifo, reg)
        fifo.wait_for(r"tick 20 ", timeout=max(60, size / GiB * 40))
        if mode == "transfer":
            new = FifoProc(pyvmm_cmd("run", "--incoming", f"cpr-transfer:{sock}",
                                     "--qmp", str(new_qmp)), fifo, reg)
            wait_listening(sock, new, "incoming pyvmm")
        steady_s = steady_window(rep)
        time.sleep(0.2 + steady_s)
        info, t_cmd, t_done = do_update(mode, qmp, sock, new_qmp)
        time.sleep(WINDOW_S + 0.1)
        if mode == "exec":   # the next run starts on a settled host (as in runs.py)
            wait_until_no_child(old.proc.pid, lambda comm, state: comm == "pyvmm-holder", 30)
        timeline = dict(info.get("x-timeline", []))
        if "stop" not in timeline:
            raise BenchError(f"pyvmm cpr-{mode}: query-migrate has no x-timeline stop mark")
        t_stop = timeline["stop"] / 1e9
        return _record("pyvmm", mode, size, rep, fifo.snapshot(), t_cmd, t_done, t_stop,
                       t_stop + info["x-downtime-us"] / 1e6, steady_s)
    finally:
        reg.reap()
        fifo.close()


def run_qemu10(reg: Cleanup, mode: str, size: int, reps: int, on_rep) -> list[dict]:
    """`reps` pairs: one pyvmm update, then one QEMU 10 update, of the same guest."""
    binary = qemu10.binary()
    if binary is None:
        raise BenchError(f"QEMU {qemu10.VERSION} is not built: {qemu10.HOW_TO_BUILD}")
    results = []
    for rep in range(reps):
        results.append(pyvmm_update(reg, mode, size, rep))
        results.append(qemu10_update(reg, binary, mode, size, rep))
        on_rep()
    return results
