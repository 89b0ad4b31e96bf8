"""The receiving side of a live update, driven as a QEMU 10 user drives it.

QEMU's own recipes through qemu.qmp, unchanged: the new VMM started with the
two JSON `-incoming` channels, `-incoming defer` + `migrate-incoming`; what a
VMM waiting for its guest answers; and that waiting never clobbers another
process's socket or a file, nor leaves sockets behind when stopped.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest

from conftest import run_pyvmm
from test_cpr import (QmpFailed, assert_ticks_continuous, close, kvm, new_info,  # noqa: F401
                      qmp, qmp_connect, start_ticker, ticks, wait_migration)

pytestmark = pytest.mark.usefixtures("kvm")


def unix(path) -> dict:
    return {"transport": "socket", "type": "unix", "path": str(path)}


def channel(kind, path) -> str:
    return json.dumps({"channel-type": kind, "addr": unix(path)})


def wait_path(p, path, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert p.proc.poll() is None, p.stderr
        assert time.monotonic() < deadline, p.stderr
        time.sleep(0.01)


def start_new(vmm_procs, tmp_path, *incoming, wait_for=None):
    """A new VMM with the given --incoming values; waits for its QMP (and wait_for)."""
    new_qmp = tmp_path / "new.qmp"
    args = ["run", "--qmp", str(new_qmp)]
    for value in incoming:
        args += ["--incoming", value]
    p = vmm_procs(args)
    wait_path(p, new_qmp)
    if wait_for is not None:
        wait_path(p, wait_for)
    return p, new_qmp


def migrate_old(old_qmp, **migrate_args):
    """The old VMM's half of QEMU's cpr-transfer recipe; returns when it settled."""
    q = qmp_connect(old_qmp)
    try:
        qmp(q, "migrate-set-parameters", mode="cpr-transfer")
        qmp(q, "migrate", **migrate_args)
        return wait_migration(q)
    finally:
        close(q)


def assert_guest_moved(old, new, new_qmp):
    assert old.wait(15) == 0
    info = new_info(new_qmp)
    assert info["status"] == "completed" and info["mode"] == "cpr-transfer"
    last_old = ticks(old.text())[-1][0]
    new.wait_for(rf"tick {last_old + 5} ")
    assert_ticks_continuous(old.text() + new.text())
    q = qmp_connect(new_qmp)
    try:
        assert qmp(q, "query-status") == {"status": "running", "running": True}
    finally:
        close(q)


def one_line_error(stderr):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyvmm: error:"), stderr
    return lines[0]


# -- QEMU's recipes ---------------------------------------------------------------------------
def test_qemu10_cpr_transfer_recipe(guests, vmm_procs, tmp_path):
    """New VMM: QEMU 10's two JSON -incoming lines; old VMM: migrate with both channels."""
    old, old_qmp = start_ticker(vmm_procs, tmp_path)
    main_sock, cpr_sock = tmp_path / "main.sock", tmp_path / "cpr.sock"
    new, new_qmp = start_new(vmm_procs, tmp_path, channel("cpr", cpr_sock),
                             channel("main", main_sock), wait_for=cpr_sock)
    q = qmp_connect(new_qmp)
    try:
        assert qmp(q, "query-status") == {"status": "inmigrate", "running": False}
        assert qmp(q, "query-migrate") == {"status": "setup"}
    finally:
        close(q)
    old.wait_for(r"tick 5 ")
    migrate_old(old_qmp, channels=[{"channel-type": "main", "addr": unix(main_sock)},
                                   {"channel-type": "cpr", "addr": unix(cpr_sock)}])
    assert_guest_moved(old, new, new_qmp)
    assert not cpr_sock.exists() and not main_sock.exists()   # main: not used, never made


@pytest.mark.parametrize("order", ["incoming-first", "qemu-order"])
def test_deferred_recipe(guests, vmm_procs, tmp_path, order):
    """`--incoming defer`, then migrate-incoming: alone (its address is where pyvmm
    listens), or beside a cpr channel with migrate on the old VMM first, as
    QEMU's own cpr-transfer test with a deferred target does."""
    old, old_qmp = start_ticker(vmm_procs, tmp_path)
    main_sock, cpr_sock = tmp_path / "main.sock", tmp_path / "cpr.sock"
    if order == "incoming-first":
        new, new_qmp = start_new(vmm_procs, tmp_path, "defer")
    else:
        new, new_qmp = start_new(vmm_procs, tmp_path, "defer", channel("cpr", cpr_sock),
                                 wait_for=cpr_sock)
    q = qmp_connect(new_qmp)
    try:
        assert qmp(q, "query-status")["status"] == "inmigrate"
        assert qmp(q, "query-migrate") == {}          # deferred: nothing started (QEMU: none)
        old.wait_for(r"tick 5 ")
        if order == "incoming-first":
            assert not main_sock.exists()
            qmp(q, "migrate-incoming", uri=f"unix:{main_sock}")
            assert qmp(q, "query-migrate") == {"status": "setup"}
            with pytest.raises(QmpFailed, match="already been started"):
                qmp(q, "migrate-incoming", uri=f"unix:{main_sock}")
            migrate_old(old_qmp, uri=f"unix:{main_sock}")
        else:
            import threading
            result = []
            t = threading.Thread(target=lambda: result.append(migrate_old(
                old_qmp, channels=[{"channel-type": "main", "addr": unix(main_sock)},
                                   {"channel-type": "cpr", "addr": unix(cpr_sock)}])))
            t.start()
            time.sleep(1.0)       # the old VMM waits in setup; the guest runs there
            assert old.proc.poll() is None and new.proc.poll() is None
            qmp(q, "migrate-incoming",
                channels=[{"channel-type": "main", "addr": unix(main_sock)}])
            t.join(30)
    finally:
        close(q)
    assert_guest_moved(old, new, new_qmp)


def test_migrate_incoming_checks_like_qemu(guests, vmm_procs, tmp_path):
    new, new_qmp = start_new(vmm_procs, tmp_path, "defer")
    q = qmp_connect(new_qmp)
    try:
        with pytest.raises(QmpFailed, match="need either 'uri' or 'channels'"):
            qmp(q, "migrate-incoming")
        with pytest.raises(QmpFailed, match="only one entry"):
            qmp(q, "migrate-incoming", channels=[
                {"channel-type": "main", "addr": unix(tmp_path / "m")},
                {"channel-type": "cpr", "addr": unix(tmp_path / "c")}])
        with pytest.raises(QmpFailed, match="unix socket"):
            qmp(q, "migrate-incoming", uri="tcp:127.0.0.1:4444")
        # a refused one leaves the VMM waiting, deferred still
        assert qmp(q, "query-migrate") == {}
        qmp(q, "migrate-incoming", uri=f"unix:{tmp_path / 'm.sock'}")
        assert (tmp_path / "m.sock").exists()
    finally:
        close(q)


# -- a waiting VMM over QMP ----------------------------------------------------------------------
def test_waiting_vmm_answers_as_qemu(guests, vmm_procs, tmp_path):
    cpr_sock = tmp_path / "cpr.sock"
    new, new_qmp = start_new(vmm_procs, tmp_path, f"cpr-transfer:{cpr_sock}", wait_for=cpr_sock)
    q = qmp_connect(new_qmp)
    try:
        for name, args in [("migrate", {"uri": "unix:/tmp/nowhere"}), ("stop", {}),
                           ("x-query-state", {})]:
            if name == "migrate":
                qmp(q, "migrate-set-parameters", mode="cpr-transfer")
            r = q.cmd_raw(name, args or None)
            assert r["error"]["class"] == "GenericError", (name, r)
            assert r["error"]["desc"] == "Guest is waiting for an incoming migration", (name, r)
        with pytest.raises(QmpFailed, match="inmigrate"):
            qmp(q, "cont")
        with pytest.raises(QmpFailed, match="For use with '-incoming defer'"):
            qmp(q, "migrate-incoming", uri=f"unix:{cpr_sock}")
        assert qmp(q, "query-migrate") == {"status": "setup"}
        assert qmp(q, "query-status")["status"] == "inmigrate"
    finally:
        close(q)
    assert new.proc.poll() is None and cpr_sock.exists()


def test_quit_on_waiting_vmm(guests, vmm_procs, tmp_path):
    cpr_sock = tmp_path / "cpr.sock"
    new, new_qmp = start_new(vmm_procs, tmp_path, channel("cpr", cpr_sock), wait_for=cpr_sock)
    q = qmp_connect(new_qmp)
    try:
        assert qmp(q, "quit") == {}
    finally:
        close(q)
    assert new.wait(10) == 0, new.stderr
    assert new.stderr.strip() == ""
    assert not cpr_sock.exists() and not new_qmp.exists()


# -- no clobbering, no leftovers ------------------------------------------------------------------
def test_incoming_never_takes_a_live_socket_or_a_file(guests, vmm_procs, tmp_path):
    old, old_qmp = start_ticker(vmm_procs, tmp_path)
    old.wait_for(r"tick 1 ")
    r = run_pyvmm("run", "--incoming", f"cpr-transfer:{old_qmp}", timeout=30)
    assert r.returncode == 1
    assert "in use by a running process" in one_line_error(r.stderr)
    q = qmp_connect(old_qmp, timeout=2)       # the old VMM keeps its monitor
    try:
        assert qmp(q, "query-status")["status"] == "running"
    finally:
        close(q)
    precious = tmp_path / "precious"
    precious.write_text("keep me\n")
    r = run_pyvmm("run", "--incoming", f"unix:{precious}", timeout=30)
    assert r.returncode == 1
    assert "exists and is not a socket" in one_line_error(r.stderr)
    assert precious.read_text() == "keep me\n"
    # nor a waiting pyvmm's cpr socket (SEQPACKET: a stream probe gets EPROTOTYPE)
    cpr_sock = tmp_path / "cpr.sock"
    new, _ = start_new(vmm_procs, tmp_path, f"cpr-transfer:{cpr_sock}", wait_for=cpr_sock)
    for flag in ("--incoming", "--qmp"):
        args = ["run", flag, str(cpr_sock)] if flag == "--qmp" else \
            ["run", flag, f"cpr-transfer:{cpr_sock}"]
        if flag == "--qmp":
            args += ["--kernel", "guest/build/ticker.elf"]
        r = run_pyvmm(*args, timeout=30)
        assert r.returncode == 1 and "in use" in one_line_error(r.stderr), r.stderr
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(str(cpr_sock))                   # still the waiting VMM's
    s.close()


@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("form", ["cpr-transfer", "defer"])
def test_signal_leaves_nothing_behind(guests, vmm_procs, tmp_path, signo, form):
    cpr_sock = tmp_path / "cpr.sock"
    value = f"cpr-transfer:{cpr_sock}" if form == "cpr-transfer" else "defer"
    new, new_qmp = start_new(vmm_procs, tmp_path, value,
                             wait_for=cpr_sock if form == "cpr-transfer" else None)
    os.kill(new.pid, signo)
    assert new.wait(10) == 128 + signo
    assert len(new.stderr.strip().splitlines()) <= 1, new.stderr
    assert "Traceback" not in new.stderr
    assert not cpr_sock.exists() and not new_qmp.exists()


# -- the command line ------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, what", [(["--kernel", "guest/build/ticker.elf"], "--kernel"),
                                         (["--net", "tap,ifname=nosuch0"], "--net")])
def test_kernel_and_net_with_incoming_are_refused(guests, tmp_path, extra, what):
    cpr_sock = tmp_path / "cpr.sock"
    r = run_pyvmm("run", "--incoming", f"cpr-transfer:{cpr_sock}", *extra, timeout=30)
    assert r.returncode == 1
    line = one_line_error(r.stderr)
    assert what in line and "old VMM" in line
    assert not cpr_sock.exists()


@pytest.mark.parametrize("value, says", [
    ("file:/tmp/pyvmm-no-such.state", "PYVMM_CPR_EXEC_STATE"),
    ("rdma:127.0.0.1:4444", "unix socket"),   # (tcp: a migration, tests/test_migration.py)
    ('{"channel-type":"cpr","addr":{"transport":"socket","type":"unix"}}',
     "'incoming[0].addr.path' is missing"),
    ('{"channel-type":"cpr"', "not a JSON channel"),
    ("nonsense", "unknown migration protocol"),
])
def test_bad_incoming_is_one_line(guests, value, says):
    r = run_pyvmm("run", "--incoming", value, timeout=30)
    assert r.returncode == 1
    assert says in one_line_error(r.stderr)


def test_two_main_channels_refused(guests, tmp_path):
    r = run_pyvmm("run", "--incoming", "defer", "--incoming", f"unix:{tmp_path}/m", timeout=30)
    assert r.returncode == 1
    assert "more than one main" in one_line_error(r.stderr)
