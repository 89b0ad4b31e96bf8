"""`pyvmm cpr --trace` in causal order and `--trace-plot`, as a student runs them.

The ordering test runs under CPU load it makes itself (one busy loop per core):
that is when a sending thread, descheduled right after sendmsg, used to stamp its
send after the receiver had already stamped the receipt.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys

import pytest

from conftest import need_kvm, run_pyvmm
from test_cpr import start_incoming, start_ticker

pytestmark = pytest.mark.usefixtures("kvm")


@pytest.fixture(scope="module")
def kvm():
    need_kvm()


@contextlib.contextmanager
def cpu_load():
    """A busy loop on every core, bounded (they exit by themselves after 60 s)."""
    loops = [subprocess.Popen([sys.executable, "-c",
                               "import time\nend = time.monotonic() + 60\n"
                               "while time.monotonic() < end: pass"])
             for _ in range(os.cpu_count() or 2)]
    try:
        yield
    finally:
        for p in loops:
            p.kill()
            p.wait()


def trace_lines(out: str) -> list[tuple[float, str]]:
    """(ms, text) of each timeline line of `--trace` output, in printed order."""
    lines = []
    for line in out.splitlines():
        m = re.match(r"^(\w*)\s+(\d+\.\d+) ms\s+(?:[\d.]+ ms|-)?\s*(.*)$", line)
        if m:
            lines.append((float(m.group(2)), m.group(1) or m.group(3)))
    return lines


def index(lines, text) -> int:
    for i, (_, what) in enumerate(lines):
        if what == text if " " not in text else text in what:   # a phase, or a step
            return i
    raise AssertionError(f"{text!r} not in the trace: {[w for _, w in lines]}")


def assert_before(lines, *texts):
    at = [index(lines, t) for t in texts]
    assert at == sorted(at), f"not in causal order {texts}: {[w for _, w in lines]}"


def run_transfer(vmm_procs, tmp_path, *extra):
    old, old_qmp = start_ticker(vmm_procs, tmp_path)
    new, sock, new_qmp = start_incoming(vmm_procs, tmp_path)
    old.wait_for(r"tick 3 ")
    r = run_pyvmm("cpr", "--mode", "transfer", "--socket", str(old_qmp), "--uri", str(sock),
                  "--new-qmp", str(new_qmp), *extra)
    assert r.returncode == 0, r.stderr
    return r


def run_exec(vmm_procs, tmp_path, *extra):
    old, qmp_path = start_ticker(vmm_procs, tmp_path)
    old.wait_for(r"tick 3 ")
    r = run_pyvmm("cpr", "--mode", "exec", "--socket", str(qmp_path), *extra)
    assert r.returncode == 0, r.stderr
    return r


def check_transfer_order(out):
    lines = trace_lines(out)
    assert [t for t, _ in lines] == sorted(t for t, _ in lines), out
    assert_before(lines, "setup", "stop", "quiesce", "notify", "save", "transfer",
                  "old: state memfd and device fds sent", "restore", "new: state blob loaded",
                  "new: vCPU, VM and device state written", 'old: "restored" received',
                  'new: "go" received', "resume")


def check_exec_order(out):
    lines = trace_lines(out)
    assert [t for t, _ in lines] == sorted(t for t, _ in lines), out
    assert_before(lines, "stop", "save", "transfer", "new image: Python runs its first line",
                  "restore", "new image: state blob loaded",
                  "new image: waited for the prebuilder", "new image: machine built", "resume")
    assert_before(lines, "transfer", "prebuilder (C, before Python's main): started",
                  "prebuilder: VM, memory slots", "new image: waited for the prebuilder")
    # the prebuilder's steps are shown as concurrent, and the output says what that means
    assert re.search(r"‖ prebuilder: VM, memory slots", out), out
    assert "by the clock, not by cause" in out


@pytest.mark.parametrize("mode", ["transfer", "exec"])
def test_trace_in_causal_order_under_load(guests, vmm_procs, tmp_path, mode):
    for rep in range(3):
        d = tmp_path / str(rep)
        d.mkdir()
        with cpu_load():
            if mode == "transfer":
                check_transfer_order(run_transfer(vmm_procs, d, "--trace").stdout)
            else:
                check_exec_order(run_exec(vmm_procs, d, "--trace").stdout)
