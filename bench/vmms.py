"""The pyvmm processes a benchmark starts, live-updates and cleans up (downtime, soak).

Each process is a WatchedProcess (bench/lab.py): its stdout lines are stamped with
the time they arrive, so a guest's heartbeat can be read from the host's side.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.lab import GUEST_IP, WatchedProcess
from vmm.client import QmpClient, QmpError
from vmm.client.cpr import wait_migration
from vmm.errors import VmmError
from vmm.memory import MiB

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "guest" / "build"
HEARTBEAT_US = 1000     # the ticker guest's period: one heartbeat line per ms
#: The cpr-exec-command with which an older pyvmm (an upgrade's source) execs this
#: installation: -I, because 0.1.0 puts its own module search path in the new image's
#: PYTHONPATH (docs/CPR.md, "Upgrades and compatibility").
UPGRADE_EXEC_COMMAND = [sys.executable, "-I", "-m", "vmm"]


class BenchError(Exception):
    """A benchmark run failed (the sweep records it and goes on with the next one)."""


# -- processes whose stdout lines are timestamped on arrival ---------------------------------
class Proc(WatchedProcess):
    """A child of the benchmark, registered for clean-up (bench.lab.WatchedProcess)."""

    def __init__(self, cmd: list[str], registry: "Cleanup", env: dict | None = None,
                 cwd: Path = ROOT):
        super().__init__(cmd, env=env, cwd=cwd)
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
    deadline = time.monotonic() + timeout
    while True:
        try:
            return QmpClient(str(path), timeout=10.0)
        except (OSError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def new_info(path, timeout: float = 30.0) -> dict:
    """query-migrate on the VMM now running the guest (reconnect across an exec)."""
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
class Source:
    """The pyvmm that runs the guest before the update: this tree's, or (an upgrade,
    `--from REV`) an older release's built tree (bench/release_tree.py), run from its
    own directory so that `-m vmm` imports its own code."""

    def __init__(self, rev: str | None = None, log=None):
        self.rev, self.cwd, self.command = rev, ROOT, [sys.executable, "-m", "vmm"]
        if rev is not None:
            from bench import release_tree
            self.cwd = release_tree.release_tree(rev, log=log)
            self.command = release_tree.pyvmm_command(self.cwd)

    @property
    def exec_command(self) -> list[str] | None:
        """cpr-exec-command for an upgrade (None: the source's own resume command)."""
        return UPGRADE_EXEC_COMMAND if self.rev is not None else None


THIS = Source()


def pyvmm_cmd(*args: str, ns: str | None = None, source: Source = THIS) -> list[str]:
    cmd = [*source.command, *args]
    return ["ip", "netns", "exec", ns, *cmd] if ns else cmd


class Guest:
    """One guest configuration: which kernel, its cmdline, what the run waits for."""

    def __init__(self, ram: str, load: str, size: int, vcpus: int | None = None):
        """vcpus: the vCPU sweep's smp guest on that many vCPUs instead of the RAM/load
        matrix's guests; its load "busy" (every vCPU works and sends IPIs) or "idle"
        (vCPU 0 works, the others halt and are woken by an IPI twice a second)."""
        self.ram, self.load, self.size, self.vcpus = ram, load, size, vcpus
        if vcpus is not None:
            sleep = f" sleepers={vcpus - 1} wake_ms=500" if load == "idle" and vcpus > 1 else ""
            self.kernel, self.cmdline, self.ready = "smp", "beat_ms=1000" + sleep, \
                rf"smp: {vcpus} CPUs online"
        elif load == "udp":
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


def start_vmm(reg: Cleanup, g: Guest, name: str, ns=None, tap=None,
              source: Source = THIS) -> tuple[Proc, Path]:
    qmp_path = reg.tmp / f"{name}.qmp"
    args = ["run", "--kernel", str(BUILD / f"{g.kernel}.elf"), "--memory", f"{g.size // MiB}M",
            "--cmdline", g.cmdline, "--qmp", str(qmp_path)]
    if g.vcpus is not None:
        args += ["--vcpus", str(g.vcpus)]
    if tap:
        args += ["--net", f"tap,ifname={tap}"]
    p = Proc(pyvmm_cmd(*args, ns=ns, source=source), reg, cwd=source.cwd)
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


#: cpr-transfer updates with x-early-start (`pyvmm bench downtime --early-start`): the new
#: VMM runs the guest once it has the vCPU state, before its device restore.
EARLY_START = False


def do_update(mode: str, qmp_path: Path, sock: Path | None = None,
              new_qmp: Path | None = None,
              exec_command: list[str] | None = None) -> tuple[dict, float, float]:
    """Run one live update; return (new VMM's query-migrate, t_command, t_done)."""
    with qmp_connect(qmp_path) as q:
        if mode == "exec":
            params = {"cpr-exec-command": exec_command} if exec_command else {}
            q.execute("migrate-set-parameters", mode="cpr-exec", **params)
            t0 = time.monotonic()
            q.execute("migrate", uri="exec:")
        else:
            early = {"x-early-start": True} if EARLY_START else {}
            q.execute("migrate-set-parameters", mode="cpr-transfer", **early)
            addr = {"transport": "socket", "type": "unix", "path": str(sock)}
            t0 = time.monotonic()
            q.execute("migrate", channels=[{"channel-type": "main", "addr": addr},
                                           {"channel-type": "cpr", "addr": addr}])
        try:
            info = wait_migration(lambda: q.execute("query-migrate"), 60.0, poll=0.005)
        except VmmError as e:
            raise BenchError(str(e)) from None
    if info is not None and info.get("status") != "completed":
        raise BenchError(f"cpr-{mode} {info.get('status')}: {info.get('error-desc')}")
    info = new_info(qmp_path if mode == "exec" else new_qmp)
    return info, t0, time.monotonic()


def on_sigterm(signum, frame):
    """SIGTERM stops a benchmark the way Ctrl-C does: everything it started is removed."""
    raise KeyboardInterrupt
