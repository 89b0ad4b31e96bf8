"""Shared fixtures: build the toy guests once, run pyvmm as a real process, read its serial."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.lab import WatchedProcess

ROOT = Path(__file__).resolve().parent.parent
GUEST_DIR = ROOT / "guest"
GUEST_BUILD = GUEST_DIR / "build"


@pytest.fixture(scope="session")
def guests() -> Path:
    """Build every toy guest (idempotent) and return guest/build."""
    subprocess.run(["make", "-s", "-C", str(GUEST_DIR)], check=True)
    return GUEST_BUILD


def pyvmm_cmd(*args: str) -> list[str]:
    """The pyvmm command line, run with this very interpreter (never a shell shim)."""
    return [sys.executable, "-m", "vmm", *args]


def need_kvm():
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no usable /dev/kvm on this host")


class VmmProcess(WatchedProcess):
    """A pyvmm process; its stdout lines are timestamped on arrival (bench.lab.WatchedProcess)."""

    def __init__(self, args: list[str], env: dict | None = None, stdin=subprocess.DEVNULL,
                 ns: str | None = None, pyvmm: list[str] | None = None, cwd=ROOT):
        """pyvmm: the command to run instead of this tree's (another release's, say)."""
        self.args = args
        cmd = (pyvmm or pyvmm_cmd()) + list(args)
        if ns:   # `ip netns exec` execs the command: the PID stays pyvmm's
            cmd = ["ip", "netns", "exec", ns, *cmd]
        super().__init__(cmd, env=env, cwd=cwd, stdin=stdin)

    def wait_for(self, pattern: str, timeout: float = 30.0, start: int = 0) -> re.Match:
        """Wait until a stdout line (at index >= start) matches; return the match."""
        m = self.search(pattern, timeout, start)
        if m:
            return m
        if self.proc.poll() is None:   # still running: ask it for its threads' stacks
            os.kill(self.proc.pid, signal.SIGUSR2)
            time.sleep(0.5)
            self.stop()
            time.sleep(0.2)
        raise AssertionError(f"no line matching {pattern!r} within {timeout}s; output:\n"
                             f"{self.text()[-3000:]}\nstderr:\n{self.stderr[-3000:]}")

    def wait(self, timeout: float = 30.0) -> int:
        rc = self.proc.wait(timeout)
        time.sleep(0.05)
        return rc


@pytest.fixture
def vmm_procs():
    """Start pyvmm processes with `start(args)`; all are stopped at teardown."""
    procs: list[VmmProcess] = []

    def start(args, **kw) -> VmmProcess:
        p = VmmProcess(list(args), **kw)
        procs.append(p)
        return p
    yield start
    for p in procs:
        p.stop()


FUZZ_EXAMPLES = int(os.environ.get("PYVMM_FUZZ_EXAMPLES", "300"))


def fuzz(test):
    """Hypothesis settings for the suite's fuzzers: a few hundred examples each (more with
    PYVMM_FUZZ_EXAMPLES=100000), no deadline (the machine is shared), no example database."""
    from hypothesis import HealthCheck, settings
    return settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))(test)


def run_pyvmm(*args: str, timeout: float = 60.0, env: dict | None = None):
    """Run pyvmm to completion; returns CompletedProcess with text output."""
    return subprocess.run(pyvmm_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=dict(os.environ, **(env or {})),
                          stdin=subprocess.DEVNULL)
