"""Past "go" the new VMM owns the guest, whatever happens to either process.

`go` is cpr-transfer's point of no return: the new VMM's claim of the commit
word both VMMs map (vmm/cpr/commit.py), made only once it has restored
everything; the old VMM never resumes the guest after it (both would run on the
same RAM).  These tests kill -9 or SIGSTOP one side at the
step that matters: the fault `target-slow-running` holds the new VMM for a
second between resuming the guest and saying "running", so a test that sees
the guest tick in the new VMM knows "go" was sent and "running" was not.
Before "go", a stalled new VMM must not keep the guest stopped for long: the
old one rolls back once the pause overruns `downtime-limit`.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from conftest import ROOT, need_kvm
from test_cpr import (assert_keeps_running, assert_ticks_continuous, assert_ticks_go_on, close,
                      qmp, qmp_connect, start_incoming, start_ticker, QmpFailed)

pytestmark = pytest.mark.usefixtures("kvm")


@pytest.fixture(scope="module")
def kvm():
    need_kvm()


def start_migrate(q, sock, faults=(), **params):
    qmp(q, "migrate-set-parameters", mode="cpr-transfer", **{"x-fault": list(faults)}, **params)
    addr = {"transport": "socket", "type": "unix", "path": str(sock)}
    qmp(q, "migrate", channels=[{"channel-type": "main", "addr": addr},
                                {"channel-type": "cpr", "addr": addr}])


def wait_status(q, statuses, timeout=10.0):
    """Poll query-migrate until its status is one of `statuses`; the info."""
    deadline = time.monotonic() + timeout
    info = None
    while time.monotonic() < deadline:
        info = qmp(q, "query-migrate")
        if info.get("status") in statuses:
            return info
        time.sleep(0.01)
    raise AssertionError(f"query-migrate never said {statuses} within {timeout}s: {info}")


def resumed_in_new(new):
    """Block until the guest ticks in the new VMM: "go" has been sent."""
    new.wait_for(r"tick \d+ ", timeout=20)


def stderr_lines(p):
    return [line for line in p.stderr.splitlines() if line.strip()]


def stderr_when_stopped(p):
    """Stop a pyvmm that should still be running (SIGTERM) and return its stderr
    (the harness reads stderr to its end only)."""
    p.proc.terminate()
    assert p.wait(15) == 128 + signal.SIGTERM or p.proc.returncode == -signal.SIGTERM
    deadline = time.monotonic() + 5
    while not p.stderr and time.monotonic() < deadline:
        time.sleep(0.05)
    return p.stderr


def test_old_killed_after_go_new_keeps_the_guest(guests, vmm_procs, tmp_path):
    """kill -9 of the old VMM after "go": the new one's "running" hits EPIPE; it says so
    in one line and goes on serving the guest."""
    old, old_qmp = start_ticker(vmm_procs, tmp_path)
    new, sock, new_qmp = start_incoming(vmm_procs, tmp_path)
    old.wait_for(r"tick 3 ")
    q = qmp_connect(old_qmp)
    try:
        start_migrate(q, sock, ["target-slow-running"])
        resumed_in_new(new)
        os.kill(old.pid, signal.SIGKILL)
    finally:
        close(q)
    assert old.wait(15) == -signal.SIGKILL
    time.sleep(1.5)                          # past the delay: "running" was sent, and failed
    assert new.proc.poll() is None, new.stderr
    assert_ticks_go_on(new, 5)
    assert_ticks_continuous(old.text() + new.text())
    q = qmp_connect(new_qmp)
    try:
        assert qmp(q, "query-status")["status"] == "running"
        assert qmp(q, "query-migrate")["status"] == "completed"
    finally:
        close(q)
    lines = [line for line in stderr_when_stopped(new).splitlines() if line.strip()]
    assert len(lines) == 1 and "went away after \"go\"" in lines[0], lines


def test_new_killed_after_go_old_reports_failure(guests, vmm_procs, tmp_path):
    """kill -9 of the new VMM after "go": the guest is gone with it (past the point of no
    return); the old VMM must say so, not exit 0 as if the update had worked, and must
    not resume the guest on its own copy of the state."""
    old, old_qmp = start_ticker(vmm_procs, tmp_path)
    new, sock, _ = start_incoming(vmm_procs, tmp_path)
    old.wait_for(r"tick 3 ")
    q = qmp_connect(old_qmp)
    try:
        start_migrate(q, sock, ["target-slow-running"])
        resumed_in_new(new)
        os.kill(new.pid, signal.SIGKILL)
        info = wait_status(q, ("completed", "failed", "cancelled"))
        assert info["status"] == "failed", info
        assert "after \"go\"" in info["error-desc"], info
        assert info["x-after-go"] is True
        assert qmp(q, "query-status")["status"] == "postmigrate"
        with pytest.raises(QmpFailed, match="postmigrate"):
            qmp(q, "cont")
        n = len(old.text())
        time.sleep(0.3)
        assert "tick" not in old.text()[n:], "the old VMM ran the guest after \"go\""
        qmp(q, "quit")
    finally:
        close(q)
    assert old.wait(15) != 0
    assert any(line.startswith("pyvmm: error: live update failed after \"go\"")
               for line in stderr_lines(old)), old.stderr


def test_new_stopped_after_go_past_the_timeout(guests, vmm_procs, tmp_path):
    """The new VMM frozen (SIGSTOP) after "go" for longer than the old one waits for
    "running": the old reports a failure it cannot rule out (it does not claim success,
    and never resumes the guest); the thawed new VMM carries on with the guest."""
    old_qmp = tmp_path / "old.qmp"
    old = vmm_procs(["run", "--kernel", str(ROOT / "guest/build/ticker.elf"),
                     "--cmdline", "period_us=20000", "--qmp", str(old_qmp)],
                    env={"PYVMM_CPR_RUNNING_TIMEOUT": "1"})
    new, sock, new_qmp = start_incoming(vmm_procs, tmp_path)
    old.wait_for(r"tick 3 ")
    q = qmp_connect(old_qmp)
    try:
        start_migrate(q, sock, ["target-slow-running"])
        resumed_in_new(new)
        os.kill(new.pid, signal.SIGSTOP)
        try:
            info = wait_status(q, ("completed", "failed", "cancelled"))
            assert info["status"] == "failed", info
            assert "did not report" in info["error-desc"], info
            assert qmp(q, "query-status")["status"] == "postmigrate"
            qmp(q, "quit")
        finally:
            os.kill(new.pid, signal.SIGCONT)
    finally:
        close(q)
    assert old.wait(15) != 0
    assert "pyvmm: error: live update failed after \"go\"" in old.stderr
    time.sleep(1.5)                          # the delay ends: "running" finds nobody
    assert new.proc.poll() is None, new.stderr
    assert_ticks_go_on(new, 5)
    q = qmp_connect(new_qmp)
    try:
        assert qmp(q, "query-status")["status"] == "running"
    finally:
        close(q)
    assert "went away after \"go\"" in stderr_when_stopped(new)


@pytest.mark.parametrize("limit_ms", [None, 300])
def test_stall_before_go_rolls_back_at_downtime_limit(guests, vmm_procs, tmp_path, limit_ms):
    """A new VMM frozen after it got the state, before "restored": the old one rolls back
    because the pause overran downtime-limit (default or set), while the new one is still
    frozen (not at the channel's 30 s timeout, nor because the new one moved)."""
    old, old_qmp = start_ticker(vmm_procs, tmp_path)
    new, sock, _ = start_incoming(vmm_procs, tmp_path)
    old.wait_for(r"tick 3 ")
    q = qmp_connect(old_qmp)
    try:
        if limit_ms is not None:
            for bad in (-1, 2_000_001):
                with pytest.raises(QmpFailed, match="range of 0 to 2000 seconds"):
                    qmp(q, "migrate-set-parameters", **{"downtime-limit": bad})
            qmp(q, "migrate-set-parameters", **{"downtime-limit": limit_ms})
        limit = qmp(q, "query-migrate-parameters")["downtime-limit"]
        start_migrate(q, sock, ["target-slow-restore"])
        wait_status(q, ("device", "failed", "completed"))   # the state and fds were sent
        os.kill(new.pid, signal.SIGSTOP)
        try:
            info = wait_status(q, ("completed", "failed", "cancelled"))
        finally:
            os.kill(new.pid, signal.SIGCONT)
    finally:
        close(q)
    assert info["status"] == "failed", info
    assert f"downtime-limit ({limit} ms)" in info["error-desc"], info
    assert "x-after-go" not in info
    assert_keeps_running(old, old_qmp)
    assert new.wait(15) != 0
    assert "tick" not in new.text()
    # (thawed, it finds the commit word already the old VMM's: it never runs the guest)
    assert "pyvmm: error: the old pyvmm took the guest back" in new.stderr, new.stderr


def test_pyvmm_cpr_says_the_guest_left_when_the_new_vmm_dies_after_go(guests, vmm_procs,
                                                                     tmp_path):
    """`pyvmm cpr` (what a user or a script runs) fails, and does not claim the guest goes
    on in the old pyvmm, when the new one is killed past "go"."""
    import subprocess
    import sys
    old, old_qmp = start_ticker(vmm_procs, tmp_path)
    new, sock, new_qmp = start_incoming(vmm_procs, tmp_path)
    old.wait_for(r"tick 3 ")
    tool = subprocess.Popen([sys.executable, "-m", "vmm", "cpr", "--mode", "transfer",
                             "--socket", str(old_qmp), "--uri", str(sock), "--new-qmp",
                             str(new_qmp), "--fault", "target-slow-running"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    resumed_in_new(new)
    os.kill(new.pid, signal.SIGKILL)
    out, err = tool.communicate(timeout=30)
    assert tool.returncode == 1, (out, err)
    assert "the guest is no longer in the old pyvmm" in err and "goes on" not in err, err
    assert old.wait(15) == 1                 # its last client gone, it exits: a failure



@pytest.mark.parametrize("take_back", ["downtime-limit", "migrate_cancel"])
def test_after_the_claim_the_old_vmm_cannot_take_the_guest_back(guests, vmm_procs, tmp_path,
                                                                take_back):
    """The new VMM claims the guest, then stays silent (target-slow-running: a second
    between running the guest and saying "running") while the old one tries to take
    it back: its downtime-limit (300 ms) passes, or a migrate_cancel arrives.  The old
    VMM's claim must fail, not roll back: the update completes, the guest runs only
    in the new VMM, and the old one exits 0.  (With protocol 1's "restored"/"go" there
    was no such window; with the commit page a late rollback would run the guest
    twice on one RAM.)"""
    old, old_qmp = start_ticker(vmm_procs, tmp_path)
    new, sock, new_qmp = start_incoming(vmm_procs, tmp_path)
    old.wait_for(r"tick 3 ")
    q = qmp_connect(old_qmp)
    try:
        if take_back == "downtime-limit":
            qmp(q, "migrate-set-parameters", **{"downtime-limit": 300})
        start_migrate(q, sock, ["target-slow-running"])
        resumed_in_new(new)
        n = len(old.text())
        if take_back == "migrate_cancel":
            qmp(q, "migrate_cancel")
        info = wait_status(q, ("completed", "failed", "cancelled"))
    finally:
        close(q)
    assert info["status"] == "completed", info
    assert old.wait(15) == 0, old.stderr
    assert "tick" not in old.text()[n:], "the old VMM ran the guest after the new one's claim"
    assert_ticks_go_on(new, 5)
    assert_ticks_continuous(old.text() + new.text())
