"""`pyvmm bench downtime`: CPR live-update downtime, swept over RAM size, mode, load.

    python3 -m vmm.bench.downtime [--quick] [--sizes 256M,1G,4G,16G] [--reps 5] [--out DIR]

For every (mode, RAM size, RAM untouched|touched, idle|UDP load) it boots a
guest in a real pyvmm process, live-updates it `--reps` times and records three
views of the downtime:

* host:    `x-downtime-us` from the new VMM's `query-migrate` (stop -> last vCPU
           back in KVM_RUN), plus the phase breakdown `x-phases-us`;
* guest:   ticker's `maxgap_us` after the update (the guest's largest gap
           between two loop iterations), and the largest gap between two
           heartbeat lines (ticker period_us=1000) as timestamped on the host
           when they arrive on pyvmm's stdout;
* network: the largest gap in a 1 ms UDP echo stream through netecho, in a
           network namespace made for the run, with lost/duplicated datagrams.

Baselines on the same guest image: (a) a naive snapshot done with pyvmm's own
API in-process (pause, save state, copy guest RAM to a file and back, restore,
resume); (b) Debian's QEMU doing a local live migration with RAM in a shared
/dev/shm file and `x-ignore-shared` (RAM not copied), downtime from the
source's `query-migrate`.

Writes results.md, results.json, downtime_vs_ram.png, phases.png to --out.
Everything started (processes, namespaces, /dev/shm files) is removed at the
end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..lab import WatchedProcess
from ..errors import VmmError
from ..memory import parse_size

ROOT = Path(__file__).resolve().parent.parent.parent
BUILD = ROOT / "guest" / "build"
QEMU = shutil.which("qemu-system-x86_64")
MiB = 1 << 20
GiB = 1 << 30
PHASES = ["stop", "quiesce", "notify", "save", "transfer", "restore", "resume"]
TICK_RX = re.compile(r"tick (\d+) t_us=(\d+) maxgap_us=(\d+)")
HEARTBEAT_US = 1000


class BenchError(Exception):
    pass


# -- processes whose stdout lines are timestamped on arrival ---------------------------------
class Proc(WatchedProcess):
    """A child of the benchmark, registered for clean-up (vmm.lab.WatchedProcess)."""

    def __init__(self, cmd: list[str], registry: "Cleanup", env: dict | None = None):
        super().__init__(cmd, env=env, cwd=ROOT)
        registry.procs.append(self)

    def wait_for(self, pattern: str, timeout: float = 30.0, start: int = 0) -> re.Match:
        m = self.search(pattern, timeout, start)
        if m:
            return m
        tail = "\n".join(line for _, line in self.snapshot()[-20:])
        raise BenchError(f"no line matching {pattern!r} within {timeout}s from {self.cmd[:6]}"
                         f" (exit {self.proc.poll()}); output:\n{tail}\nstderr:\n"
                         f"{self.stderr[-2000:]}")


class Cleanup:
    """Everything a run started: processes, namespaces, files. close() removes it all."""

    def __init__(self):
        self.procs: list[Proc] = []
        self.files: list[Path] = []
        self.stack = contextlib.ExitStack()
        self.tmp = Path(tempfile.mkdtemp(prefix="pyvmm-bench-"))

    def close(self):
        for p in self.procs:
            with contextlib.suppress(Exception):
                p.stop()
        self.procs.clear()
        with contextlib.suppress(Exception):
            self.stack.close()
        for f in self.files:
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
        self.files.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def reap(self):
        """Stop the processes of a finished run (keeps namespaces and the temp dir)."""
        for p in self.procs:
            with contextlib.suppress(Exception):
                p.stop()
        self.procs.clear()


# -- QMP -----------------------------------------------------------------------------------------
def qmp_connect(path, timeout: float = 15.0):
    from ..qmp_client import QmpClient
    deadline = time.monotonic() + timeout
    while True:
        try:
            return QmpClient(str(path), timeout=10.0)
        except (OSError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def wait_old(q, timeout: float = 60.0):
    """Poll query-migrate on the old VMM until it settles; None if it went away."""
    from ..qmp_client import QmpError
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            info = q.execute("query-migrate")
        except (QmpError, OSError, EOFError, ConnectionError):
            return None
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info
        time.sleep(0.005)
    raise BenchError("live update did not finish")


def new_info(path, timeout: float = 30.0) -> dict:
    """query-migrate on the VMM now running the guest (reconnect across an exec)."""
    from ..qmp_client import QmpError
    deadline = time.monotonic() + timeout
    while True:
        try:
            with qmp_connect(path) as q:
                info = q.execute("query-migrate")
            if info.get("status") == "completed" and "x-downtime-us" in info:
                return info
            if info.get("status") == "failed":
                raise BenchError(f"live update failed: {info.get('error-desc')}")
        except (QmpError, OSError, ConnectionError):
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"no completed live update reported on {path}")
        time.sleep(0.01)


# -- pyvmm ---------------------------------------------------------------------------------------
def pyvmm_cmd(*args: str, ns: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "vmm", *args]
    return ["ip", "netns", "exec", ns, *cmd] if ns else cmd


class Guest:
    """One guest configuration: which kernel, its cmdline, what the run waits for."""

    def __init__(self, ram: str, load: str, size: int):
        self.ram, self.load, self.size = ram, load, size
        if load == "udp":
            from ..lab import GUEST_IP
            self.kernel, self.cmdline, self.ready = "netecho", f"ip={GUEST_IP} stats=0", \
                r"netecho: up"
        elif ram == "touched":
            mb = size // MiB - 32
            self.kernel, self.cmdline, self.ready = "pattern", f"pattern_mb={mb}", r"^pass 1$"
        else:
            self.kernel, self.cmdline, self.ready = "ticker", f"period_us={HEARTBEAT_US}", \
                r"tick 20 "
        if load == "udp" and ram == "touched":
            raise BenchError("UDP load runs use netecho, which does not touch RAM")

    @property
    def ticks(self) -> bool:
        return self.kernel == "ticker"


def start_vmm(reg: Cleanup, g: Guest, name: str, ns=None, tap=None) -> tuple[Proc, Path]:
    qmp_path = reg.tmp / f"{name}.qmp"
    args = ["run", "--kernel", str(BUILD / f"{g.kernel}.elf"), "--memory", f"{g.size // MiB}M",
            "--cmdline", g.cmdline, "--qmp", str(qmp_path)]
    if tap:
        args += ["--net", f"tap,ifname={tap}"]
    p = Proc(pyvmm_cmd(*args, ns=ns), reg)
    return p, qmp_path


def start_incoming(reg: Cleanup, name: str, ns=None) -> tuple[Proc, Path, Path]:
    sock, qmp_path = reg.tmp / f"{name}.cpr", reg.tmp / f"{name}.qmp"
    p = Proc(pyvmm_cmd("run", "--incoming", f"cpr-transfer:{sock}", "--qmp", str(qmp_path),
                       ns=ns), reg)
    deadline = time.monotonic() + 20
    while not sock.exists():
        if p.proc.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"incoming pyvmm did not start: {p.stderr[-2000:]}")
        time.sleep(0.005)
    return p, sock, qmp_path


def steps_after_stop(info: dict) -> list:
    """query-migrate's finer steps as [what, µs after the stop], kept in results.json
    so that a slow update can be explained afterwards."""
    t_stop = dict(info.get("x-timeline", [])).get("stop")
    if t_stop is None:
        return []
    return [[what, (t - t_stop) / 1000] for what, t in info.get("x-steps", [])]


def do_update(mode: str, qmp_path: Path, sock: Path | None = None,
              new_qmp: Path | None = None) -> tuple[dict, float, float]:
    """Run one live update; return (new VMM's query-migrate, t_command, t_done)."""
    with qmp_connect(qmp_path) as q:
        if mode == "exec":
            q.execute("migrate-set-parameters", mode="cpr-exec")
            t0 = time.monotonic()
            q.execute("migrate", uri="exec:")
        else:
            q.execute("migrate-set-parameters", mode="cpr-transfer")
            addr = {"transport": "socket", "type": "unix", "path": str(sock)}
            t0 = time.monotonic()
            q.execute("migrate", channels=[{"channel-type": "main", "addr": addr},
                                           {"channel-type": "cpr", "addr": addr}])
        info = wait_old(q)
    if info is not None and info.get("status") != "completed":
        raise BenchError(f"cpr-{mode} {info.get('status')}: {info.get('error-desc')}")
    info = new_info(qmp_path if mode == "exec" else new_qmp)
    return info, t0, time.monotonic()


# -- the guest's and the host's view of the heartbeat -----------------------------------------
def joined_lines(procs: list[Proc]) -> list[tuple[float, str]]:
    """Stdout of the VMMs that ran the guest one after another, a split line joined."""
    out: list[tuple[float, str]] = []
    carry = ""
    for i, p in enumerate(procs):
        lines = p.snapshot()
        if carry and lines:
            lines[0] = (lines[0][0], carry + lines[0][1])
            carry = ""
        if p.partial and lines and i + 1 < len(procs):
            carry = lines.pop()[1]
        out += lines
    return out


def heartbeat_views(lines, t_cmd: float, t_done: float) -> dict:
    """Guest maxgap before/after the update; largest host-side gap between two ticks."""
    ticks = [(t, int(m.group(1)), int(m.group(3)), int(m.group(2))) for t, line in lines
             if (m := TICK_RX.search(line))]
    before = [x for x in ticks if x[0] < t_cmd]
    after = [x for x in ticks if x[0] >= t_cmd]
    if not before or not after:
        return {}
    window = [before[-1]] + [x for x in after if x[0] <= t_done + 0.2]
    gaps = [(b[0] - a[0]) * 1e6 for a, b in zip(window, window[1:])]
    ns = [x[1] for x in window]
    gmax_before = before[-1][2]
    gmax_after = max(x[2] for x in window)
    # the guest's own clock (t_us, from its TSC) between two consecutive ticks: unlike
    # maxgap it also sees a pause that caught the guest inside its write syscall
    tgaps = [b[3] - a[3] for a, b in zip(window, window[1:]) if b[1] == a[1] + 1]
    return {"heartbeat_gap_us": max(gaps) if gaps else None,
            "guest_tick_gap_us": max(tgaps) if tgaps else None,
            "guest_maxgap_before_us": gmax_before,
            "guest_maxgap_after_us": gmax_after,
            # the guest's gap is visible only if it beat the largest one seen before
            "guest_gap_us": gmax_after if gmax_after > gmax_before else None,
            "ticks_continuous": ns == list(range(ns[0], ns[0] + len(ns)))}


# -- one pyvmm configuration -------------------------------------------------------------------
def run_pyvmm(reg: Cleanup, mode: str, size: int, ram: str, load: str, reps: int,
              on_rep) -> list[dict]:
    """`reps` live updates of one configuration; one record per update.

    The ticker guest is booted afresh for each update (its maxgap is a running
    maximum); the pattern guest is booted once, touches all its RAM, and then
    is updated `reps` times in a row (chained new VMMs for cpr-transfer).
    """
    g = Guest(ram, load, size)
    results = []
    ns = tap = None
    if load == "udp":
        from ..lab import netns_with_tap
        ns, tap = reg.stack.enter_context(netns_with_tap())
    fresh_each = g.ticks or load == "udp"
    cur = cur_qmp = None
    n = 0
    for rep in range(reps):
        if cur is None or fresh_each:
            reg.reap()
            cur, cur_qmp = start_vmm(reg, g, f"vm{rep}", ns, tap)
            chain = [cur]
            cur.wait_for(g.ready, timeout=max(60, size / GiB * 40))
        time.sleep(0.2 if g.ticks else 0.05)
        sock = new_qmp = None
        if mode == "transfer":
            n += 1
            new, sock, new_qmp = start_incoming(reg, f"new{n}", ns)
        stream = None
        if load == "udp":
            from ..lab import GUEST_IP, in_ns
            stream = subprocess.Popen(in_ns(ns, sys.executable, "-m", "vmm.traffic", GUEST_IP,
                                            "1500", "0.001"), stdout=subprocess.PIPE,
                                      text=True, cwd=ROOT)
            time.sleep(0.5)
        try:
            info, t_cmd, t_done = do_update(mode, cur_qmp, sock, new_qmp)
        except BaseException:
            if stream:
                stream.kill()
                stream.wait()
            raise
        if mode == "exec":
            # Let the holder tear the old VM down (at nice 19) before the next update:
            # each update is measured from a settled host, not on top of the last one's exit.
            from ..lab import wait_until_no_child
            wait_until_no_child(cur.pid, lambda comm, state: comm == "pyvmm-holder", 30)
        rec = {"mode": mode, "size": size, "ram": ram, "load": load, "rep": rep,
               "host_us": info["x-downtime-us"],
               "phases_us": {k: info.get("x-phases-us", {}).get(k) for k in PHASES},
               "steps_us": steps_after_stop(info)}
        if mode == "transfer":
            chain.append(new)
            if cur.proc.wait(30) != 0:
                raise BenchError(f"old pyvmm exited {cur.proc.returncode}: {cur.stderr[-2000:]}")
            cur, cur_qmp = new, new_qmp
        if g.ticks:
            time.sleep(0.3)
            rec.update(heartbeat_views(joined_lines(chain), t_cmd, t_done))
        if stream:
            out, _ = stream.communicate(timeout=60)
            r = json.loads(out)
            got = r["got"]
            rec.update({"net_gap_us": r["max_gap_ms"] * 1000 if r["max_gap_ms"] else None,
                        "udp_sent": r["sent"], "udp_lost": r["sent"] - len(set(got)),
                        "udp_dup": len(got) - len(set(got))})
        results.append(rec)
        on_rep()
    reg.reap()
    return results


# -- baseline (a): naive snapshot, in-process with pyvmm's own API -----------------------------
def run_naive(reg: Cleanup, size: int, reps: int, on_rep) -> list[dict]:
    """pause, save state, guest RAM -> file -> guest RAM, restore, resume; time pause..resume."""
    from ..machine import Machine, MachineConfig

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
    from ..qmp_client import QmpClient
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
                deadline = time.monotonic() + 60
                while True:
                    info = s.execute("query-migrate")
                    if info.get("status") in ("completed", "failed", "cancelled"):
                        break
                    if time.monotonic() > deadline:
                        raise BenchError("QEMU migration did not finish")
                    time.sleep(0.005)
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


# -- statistics, report, plots -------------------------------------------------------------
def pct(values, q):
    v = sorted(values)
    if not v:
        return None
    k = (len(v) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def summary(values):
    v = [x for x in values if x is not None]
    if not v:
        return None
    return {"n": len(v), "median": statistics.median(v), "p95": pct(v, 0.95), "max": max(v)}


def fmt_ms(s, key="median"):
    return "–" if not s else f"{s[key] / 1000:.2f}"


def fmt_triplet(s):
    return "–" if not s else f"{s['median'] / 1000:.2f} / {s['p95'] / 1000:.2f} / " \
                             f"{s['max'] / 1000:.2f}"


def size_name(size: int) -> str:
    return f"{size // GiB}G" if size % GiB == 0 else f"{size // MiB}M"


MODE_NAME = {"exec": "pyvmm cpr-exec", "transfer": "pyvmm cpr-transfer",
             "naive": "naive snapshot (pyvmm, RAM→file→RAM)",
             "qemu": "QEMU 7.2 migrate, x-ignore-shared"}


def group(records):
    groups: dict[tuple, list] = {}
    for r in records:
        groups.setdefault((r["mode"], r["size"], r["ram"], r["load"]), []).append(r)
    return groups


def table(records, skipped: list[str]) -> str:
    order = {"exec": 0, "transfer": 1, "naive": 2, "qemu": 3}
    rows = ["| what | RAM | RAM state | load | n | host ms (median / p95 / max) | "
            "guest maxgap ms (median / p95 / max) | guest t_us tick gap ms (median / p95 / max) | "
            "heartbeat gap ms (median / p95 / max) | "
            "UDP echo gap ms (median / p95 / max) | UDP lost / dup |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    groups = group(records)
    for key in sorted(groups, key=lambda k: (order[k[0]], k[1], k[2], k[3])):
        rs = groups[key]
        mode, size, ram, load = key
        gg = [r.get("guest_gap_us") for r in rs]
        nvis = sum(1 for x in gg if x is not None)
        guest = fmt_triplet(summary(gg))
        if any("guest_maxgap_after_us" in r for r in rs) and nvis < len(rs):
            guest += f" ({nvis}/{len(rs)} above the prior max)"
        loss = "–"
        if any("udp_sent" in r for r in rs):
            loss = f"{sum(r['udp_lost'] for r in rs)} / {sum(r['udp_dup'] for r in rs)} " \
                   f"of {sum(r['udp_sent'] for r in rs)}"
        rows.append(f"| {MODE_NAME[mode]} | {size_name(size)} | {ram} | {load} | {len(rs)} | "
                    f"{fmt_triplet(summary([r['host_us'] for r in rs]))} | {guest} | "
                    f"{fmt_triplet(summary([r.get('guest_tick_gap_us') for r in rs]))} | "
                    f"{fmt_triplet(summary([r.get('heartbeat_gap_us') for r in rs]))} | "
                    f"{fmt_triplet(summary([r.get('net_gap_us') for r in rs]))} | {loss} |")
    out = ["## Downtime", "", *rows, "",
           "host: pyvmm's `x-downtime-us` (stop -> last vCPU back in KVM_RUN in the new VMM); "
           "naive: pause -> resume in-process; QEMU: source STOP event -> destination RESUME "
           "event (QMP timestamps). guest maxgap: ticker's `maxgap_us` after the update, "
           "counted only when it rose above its value before (a pause that catches the guest "
           "inside its write syscall is not in maxgap). guest t_us tick gap: the largest "
           "difference of the guest's own `t_us` between two consecutive ticks across the "
           "update (period 1 ms). heartbeat gap: the largest gap between two tick lines as "
           "they arrived on the host (pipe included). UDP echo gap: the largest gap between "
           "two echoes of a 1 ms stream through netecho. Guest and heartbeat views exist only "
           "for the ticker guest (untouched RAM, idle).", ""]

    out += ["## Phases (median µs, host view, idle)", "",
            "| mode | RAM | RAM state | " + " | ".join(PHASES) + " |",
            "|---|---|---|" + "---|" * len(PHASES)]
    for key in sorted(groups, key=lambda k: (order[k[0]], k[1], k[2], k[3])):
        mode, size, ram, load = key
        if mode not in ("exec", "transfer", "naive") or load != "idle":
            continue
        cells = []
        for ph in PHASES:
            s = summary([r["phases_us"].get(ph) for r in groups[key]])
            cells.append("–" if not s else f"{s['median']:.0f}")
        out.append(f"| {MODE_NAME[mode]} | {size_name(size)} | {ram} | " + " | ".join(cells)
                   + " |")
    out += ["", "pyvmm's timeline ends at the `resume` mark (last vCPU back in KVM_RUN), so "
            "`restore` runs up to it and `resume` has no length of its own. Naive: stop = "
            "pause, save = state + RAM -> file, restore = file -> RAM, resume = restore_state + "
            "resume.", ""]

    ratios = []
    for size in sorted({k[1] for k in groups}):
        for mode in ("exec", "transfer"):
            mine = groups.get((mode, size, "untouched", "idle"))
            if not mine:
                continue
            m = statistics.median(r["host_us"] for r in mine)
            for base in ("naive", "qemu"):
                b = groups.get((base, size, "untouched", "idle"))
                if b:
                    bm = statistics.median(r["host_us"] for r in b)
                    ratios.append(f"| {size_name(size)} | cpr-{mode} | {MODE_NAME[base]} | "
                                  f"{m / 1000:.2f} | {bm / 1000:.2f} | {m / bm:.3g} |")
    if ratios:
        out += ["## pyvmm / baseline (median host downtime, untouched RAM, idle)", "",
                "| RAM | pyvmm | baseline | pyvmm ms | baseline ms | ratio |",
                "|---|---|---|---|---|---|", *ratios, ""]
    if skipped:
        out += ["## Not run", "", *[f"- {s}" for s in skipped], ""]
    return "\n".join(out)


def plots(records, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group(records)
    sizes = sorted({k[1] for k in groups})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    styles = {"naive": ("k", "--", "s"), "qemu": ("tab:red", "--", "^")}
    for ax, mode in zip(axes, ("exec", "transfer")):
        for ram, load, color in (("untouched", "idle", "tab:blue"), ("touched", "idle", "tab:green"),
                                 ("untouched", "udp", "tab:orange")):
            xs, ys, lo, hi = [], [], [], []
            for size in sizes:
                rs = groups.get((mode, size, ram, load))
                if rs:
                    s = summary([r["host_us"] for r in rs])
                    xs.append(size / GiB)
                    ys.append(s["median"] / 1000)
                    lo.append(0)
                    hi.append((s["p95"] - s["median"]) / 1000)
            if xs:
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", color=color, capsize=3,
                            label=f"cpr-{mode}, {ram} RAM, {load} (median, bar to p95)")
        for base, (color, ls, mk) in styles.items():
            xs, ys = [], []
            for size in sizes:
                rs = groups.get((base, size, "untouched", "idle"))
                if rs:
                    xs.append(size / GiB)
                    ys.append(statistics.median(r["host_us"] for r in rs) / 1000)
            if xs:
                ax.plot(xs, ys, color=color, ls=ls, marker=mk, label=MODE_NAME[base])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks([s / GiB for s in sizes], [size_name(s) for s in sizes])
        ax.set_xlabel("guest RAM")
        ax.set_title(f"pyvmm cpr-{mode}: downtime vs RAM (host view)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))   # beside the bars, never over them
    axes[0].set_ylabel("downtime, ms (log)")
    fig.tight_layout()
    p1 = out / "downtime_vs_ram.png"
    fig.savefig(p1, dpi=110, bbox_inches="tight")
    plt.close(fig)

    # One panel per mode, each on its own scale (cpr-exec's bars are ten times taller).
    modes = [m for m in ("exec", "transfer")
             if any(k[0] == m and k[3] == "idle" for k in groups)]
    fig, axes = plt.subplots(1, max(len(modes), 1), figsize=(12, 4.8), squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, mode in zip(axes[0], modes):
        keys = [k for k in sorted(groups, key=lambda k: (k[2], k[1]))
                if k[0] == mode and k[3] == "idle"]
        base = [0.0] * len(keys)
        for i, ph in enumerate(PHASES):
            vals = []
            for k in keys:
                s = summary([r["phases_us"].get(ph) for r in groups[k]])
                vals.append(s["median"] / 1000 if s else 0.0)
            ax.bar(range(len(keys)), vals, bottom=base, color=colors(i), label=ph)
            base = [a + b for a, b in zip(base, vals)]
        ax.set_xticks(range(len(keys)), [f"{size_name(k[1])}\n{k[2]}" for k in keys],
                      fontsize=8)
        ax.set_ylabel("ms (median of each phase)")
        ax.set_title(f"pyvmm cpr-{mode}: phases (host view, idle)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))   # beside the bars, never over them
    fig.tight_layout()
    p2 = out / "phases.png"
    fig.savefig(p2, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return [p1, p2]


def host_description() -> str:
    def run(*cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return "?"
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = run("free", "-g").splitlines()
    return (f"kernel {run('uname', '-r')}, {run('nproc')} CPUs ({cpu}), "
            f"RAM: {' '.join(mem[1].split()[:2]) if len(mem) > 1 else '?'} GiB total (free -g), "
            f"Python {platform.python_version()}, "
            f"{run(QEMU, '--version').splitlines()[0] if QEMU else 'no QEMU'}")


# -- the sweep ------------------------------------------------------------------------------
def plan(args) -> tuple[list[tuple], list[str]]:
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    modes = args.modes.split(",")
    rams = args.ram.split(",")
    jobs, baselines, skipped = [], [], []
    touched_max = parse_size(args.touched_max)
    naive_max = parse_size(args.naive_max)
    for size in sizes:
        for mode in modes:
            for ram in rams:
                if ram == "touched" and size > touched_max:
                    skipped.append(f"cpr-{mode}, {size_name(size)} touched: above --touched-max "
                                   f"{args.touched_max} (touching it takes too long)")
                    continue
                jobs.append(("pyvmm", mode, size, ram, "idle", args.reps))
            if "udp" in args.loads and (args.udp_sizes is None or size in args.udp_sizes):
                jobs.append(("pyvmm", mode, size, "untouched", "udp", args.udp_reps or args.reps))
        if "naive" in args.baselines:
            if size <= naive_max:
                baselines.append(("naive", "naive", size, "untouched", "idle", args.reps))
            else:
                skipped.append(f"naive snapshot at {size_name(size)}: above --naive-max "
                               f"{args.naive_max} (the copy would need {size_name(size)} more "
                               "host RAM)")
        if "qemu" in args.baselines:
            if QEMU:
                baselines.append(("qemu", "qemu", size, "untouched", "idle", args.reps))
            else:
                skipped.append("QEMU baseline: qemu-system-x86_64 is not installed")
    # Baselines last: the naive one writes GiBs through the page cache, whose
    # after-effects would otherwise land on the next pyvmm runs.
    return jobs + baselines, skipped


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="pyvmm bench downtime",
                                 description="CPR live-update downtime benchmark suite")
    ap.add_argument("--sizes", default="256M,1G,4G,16G",
                    help="guest RAM sizes, comma-separated (default 256M,1G,4G,16G)")
    ap.add_argument("--modes", default="exec,transfer",
                    help="exec and/or transfer, comma-separated (default both)")
    ap.add_argument("--ram", default="untouched,touched",
                    help="untouched (ticker) and/or touched (pattern guest, after pass 1)")
    ap.add_argument("--loads", default="idle,udp", help="idle and/or udp (netecho + 1 ms stream)")
    ap.add_argument("--baselines", default="naive,qemu", help="naive,qemu or none")
    ap.add_argument("--reps", type=int, default=5, help="updates per configuration (default 5)")
    ap.add_argument("--udp-reps", type=int, default=None,
                    help="updates per UDP-load configuration (default: --reps)")
    ap.add_argument("--touched-max", default="4G", help="largest RAM size run touched")
    ap.add_argument("--naive-max", default="4G", help="largest RAM size for the naive baseline")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), metavar="DIR",
                    help="where results.json, the Markdown table and the plots go "
                         "(default bench/results)")
    ap.add_argument("--quick", action="store_true",
                    help="256M and 1G, 2 reps, idle, one UDP-load run (< 2 minutes)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    args.udp_sizes = None
    for size in args.sizes.split(","):
        try:
            parse_size(size)
        except VmmError as e:
            ap.exit(1, f"{ap.prog}: error: --sizes: {e}\n")
    if not set(args.modes.split(",")) <= {"exec", "transfer"}:
        ap.exit(1, f"{ap.prog}: error: --modes {args.modes!r}: use exec, transfer or both\n")
    if args.reps < 1 or (args.udp_reps is not None and args.udp_reps < 1):
        ap.exit(1, f"{ap.prog}: error: --reps and --udp-reps take a whole number above 0\n")
    if args.quick:
        args.sizes, args.reps = "256M,1G", 2
        args.udp_sizes, args.udp_reps = [256 * MiB], 1
    if args.baselines == "none":
        args.baselines = ""
    return args


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(argv if argv is not None else sys.argv[1:])
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("pyvmm bench downtime: /dev/kvm is not usable", file=sys.stderr)
        return 1
    if "udp" in args.loads and os.geteuid() != 0:
        print("pyvmm bench downtime: UDP load needs root (netns + tap); use --loads idle",
              file=sys.stderr)
        return 1
    missing = [g for g in ("ticker", "pattern", "netecho") if not (BUILD / f"{g}.elf").exists()]
    if missing:
        print(f"pyvmm bench downtime: build the guests first (make -C guest): missing {missing}",
              file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs, skipped = plan(args)
    total = sum(j[-1] for j in jobs)
    old_term = signal.signal(signal.SIGTERM, _sigterm)
    reg = Cleanup()
    records: list[dict] = []
    failures: list[str] = []
    started = time.monotonic()
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn)
    console = Console(stderr=True)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, disable=args.no_progress)
    try:
        with progress:
            task = progress.add_task("downtime", total=total)
            for kind, mode, size, ram, load, reps in jobs:
                what = f"{MODE_NAME[mode]} {size_name(size)} {ram} {load}"
                progress.update(task, description=what)
                advance = lambda: progress.advance(task)   # noqa: E731
                try:
                    if kind == "pyvmm":
                        records += run_pyvmm(reg, mode, size, ram, load, reps, advance)
                    elif kind == "naive":
                        records += run_naive(reg, size, reps, advance)
                    else:
                        records += run_qemu(reg, size, reps, advance)
                except BenchError as e:
                    failures.append(f"{what}: {str(e).splitlines()[0]}")
                    console.print(f"[red]failed[/red] {what}: {e}")
                finally:
                    reg.reap()
                    reg.stack.close()
                    reg.stack = contextlib.ExitStack()
    except KeyboardInterrupt:
        console.print("interrupted: cleaning up")
        return 130
    finally:
        reg.close()
        signal.signal(signal.SIGTERM, old_term)
    elapsed = time.monotonic() - started
    cmd = "pyvmm bench downtime " + " ".join(argv if argv is not None else sys.argv[1:])
    head = [f"# pyvmm downtime benchmark", "",
            f"- command: `{cmd.strip()}`",
            f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
            f"- host: {host_description()}",
            f"- took {elapsed:.0f} s", ""]
    text = "\n".join(head) + "\n" + table(records, skipped + [f"FAILED {f}" for f in failures])
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(records, indent=1))
    pngs = plots(records, out) if records else []
    print(text)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, "
          + ", ".join(str(p) for p in pngs))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
