"""Live update across versions: a guest started under the previous release moves to
this working tree, in both modes, and what cannot work is refused before the stop.

The previous release (RELEASES.md) is checked out and built once by
bench/release_tree.py in ~/.cache/pyvmm/releases/COMMIT/ (its own .venv and guests;
~1-2 min the first time, reused afterwards).  Its pyvmm runs the guest; this tree's
takes it over (docs/CPR.md, "Upgrades and compatibility").
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, need_kvm
from test_cpr import (assert_keeps_running, assert_pages_intact, close, cpr_transfer, new_info,
                      qmp, qmp_connect, start_incoming, start_ticker, wait_migration)
from bench import release_tree
from bench.lab import GUEST_IP, in_ns, netns_with_tap, wait_until_no_child
from bench.vmms import UPGRADE_EXEC_COMMAND
from vmm import __version__

#: The cpr-exec-command that makes an older pyvmm exec this installation.
NEW_EXEC_COMMAND = UPGRADE_EXEC_COMMAND


@pytest.fixture(scope="module")
def old():
    """(version, tree, the command that runs its pyvmm) of the previous release, built."""
    need_kvm()
    version, _ = release_tree.previous_release()
    try:
        tree = release_tree.release_tree(version)
    except release_tree.MissingCommit as e:
        pytest.skip(str(e))
    return version, tree, release_tree.pyvmm_command(tree)


def start_old(vmm_procs, old, tmp_path, guest, *args, ns=None, name="old"):
    """The previous release's pyvmm running its own build of `guest`."""
    _, tree, cmd = old
    qmp_path = tmp_path / f"{name}.qmp"
    p = vmm_procs(["run", "--kernel", str(tree / "guest/build" / f"{guest}.elf"), *args,
                   "--qmp", str(qmp_path)], ns=ns, pyvmm=cmd, cwd=tree)
    return p, qmp_path


def exec_to(qmp_path, command):
    """cpr-exec with this cpr-exec-command; None when the old image exec'd (went away)."""
    q = qmp_connect(qmp_path)
    try:
        qmp(q, "migrate-set-parameters", mode="cpr-exec", **{"cpr-exec-command": command})
        qmp(q, "migrate", uri="exec:")
        return wait_migration(q)
    finally:
        close(q)


def package(qmp_path) -> str:
    q = qmp_connect(qmp_path)
    try:
        return qmp(q, "query-version")["package"]
    finally:
        close(q)


def update(mode, old_qmp, old_p, vmm_procs, tmp_path, ns=None):
    """Update the old release's guest to this tree; (the new process, its QMP path)."""
    if mode == "exec":
        assert exec_to(old_qmp, NEW_EXEC_COMMAND) is None
        assert new_info(old_qmp)["status"] == "completed"
        # the old image's holder (its VM and address space) was let go by the new one
        assert not wait_until_no_child(old_p.pid, lambda comm, state: comm == "pyvmm-holder"
                                       or state == "Z")
        return old_p, old_qmp
    new, sock, new_qmp = start_incoming(vmm_procs, tmp_path, ns=ns)
    info = cpr_transfer(old_qmp, sock)
    assert info is None or info["status"] == "completed", info
    assert old_p.wait(15) == 0, old_p.stderr
    assert new_info(new_qmp)["status"] == "completed"
    return new, new_qmp


# -- upgrades ----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["exec", "transfer"])
def test_upgrade_loses_no_datagram(guests, vmm_procs, tmp_path, old, mode):
    """netecho under the previous release, a numbered UDP stream across the update to this
    tree: every datagram comes back once and in order, and the new VMM is this version."""
    count, interval = 1200, 0.002
    with netns_with_tap() as (ns, tap):
        old_p, old_qmp = start_old(vmm_procs, old, tmp_path, "netecho", "--net",
                                   f"tap,ifname={tap}", "--cmdline", f"ip={GUEST_IP} stats=0",
                                   ns=ns)
        old_p.wait_for(r"netecho: up")
        assert package(old_qmp) == f"pyvmm {old[0]}"
        stream = subprocess.Popen(in_ns(ns, sys.executable, "-m", "bench.traffic", GUEST_IP,
                                        str(count), str(interval)),
                                  stdout=subprocess.PIPE, text=True)
        time.sleep(0.8)
        cur, cur_qmp = update(mode, old_qmp, old_p, vmm_procs, tmp_path, ns=ns)
        out, _ = stream.communicate(timeout=30)
        assert package(cur_qmp) == f"pyvmm {__version__}"
    got = json.loads(out)["got"]
    assert len(got) == len(set(got)), "duplicate datagrams"
    assert got == list(range(count)), f"lost {sorted(set(range(count)) - set(got))[:20]}"


@pytest.mark.parametrize("mode", ["exec", "transfer"])
def test_upgrade_keeps_every_page(guests, vmm_procs, tmp_path, old, mode):
    """The pattern guest under the previous release: after the update to this tree every
    page it wrote holds what it wrote, and it goes on writing."""
    old_p, old_qmp = start_old(vmm_procs, old, tmp_path, "pattern", "--memory", "128M",
                               "--cmdline", "pattern_mb=48")
    progress = int(old_p.wait_for(r"pattern: progress=(0x[0-9a-f]+)").group(1), 16)
    old_p.wait_for(r"pass 2$")
    cur, cur_qmp = update(mode, old_qmp, old_p, vmm_procs, tmp_path)
    assert package(cur_qmp) == f"pyvmm {__version__}"
    assert_pages_intact(cur, cur_qmp, progress)


# -- what is refused before the stop -------------------------------------------------------------
def test_downgrade_is_refused_before_the_stop(guests, vmm_procs, tmp_path, old):
    """This tree's guest cannot go to the previous release (it cannot read this state): in
    both modes the old VMM refuses before the stop, naming both versions, and runs on."""
    version, tree, cmd = old
    p, qmp_path = start_ticker(vmm_procs, tmp_path)
    sock = tmp_path / "older.cpr"
    older = vmm_procs(["run", "--incoming", f"cpr-transfer:{sock}"], pyvmm=cmd, cwd=tree)
    p.wait_for(r"tick 3 ")
    deadline = time.monotonic() + 15
    while not sock.exists():
        assert time.monotonic() < deadline, older.stderr
        time.sleep(0.01)
    time.sleep(0.2)                # (0.1.0 binds its socket before it listens)
    info = cpr_transfer(qmp_path, sock)
    assert info["status"] == "failed", info
    assert f"pyvmm {version}" in info["error-desc"] and f"pyvmm {__version__}" in \
        info["error-desc"] and "downgrade" in info["error-desc"], info
    assert [m for m, _ in info["x-timeline"]] == ["setup"]      # never stopped
    assert "tick" not in older.text()
    assert_keeps_running(p, qmp_path)

    info = exec_to(qmp_path, [str(tree / ".venv/bin/python"), "-I", "-m", "vmm"])
    assert info["status"] == "failed", info
    assert "the guest was not stopped" in info["error-desc"], info
    assert "downgrade" in info["error-desc"] and __version__ in info["error-desc"], info
    assert_keeps_running(p, qmp_path)


#: This tree's pyvmm made to say it is a future release, 0.3.0 speaking protocol 3.
FUTURE = [sys.executable, "-c",
          "import sys, vmm, vmm.compat as c; vmm.__version__ = c.__version__ = '0.3.0'; "
          "c.PROTOCOLS['0.3.0'] = c.PROTOCOL = 3; from vmm.cli import main; "
          "sys.exit(main(sys.argv[1:]))"]


def test_future_version_is_refused_before_the_stop(guests, vmm_procs, tmp_path):
    """A guest under a newer pyvmm (0.3.0, protocol 3) cannot come to this one: refused at
    `hello` (cpr-transfer) and in the dry run (cpr-exec), naming both versions, before the
    stop; the guest runs on and the waiting VMM goes on waiting."""
    need_kvm()
    qmp_path = tmp_path / "future.qmp"
    p = vmm_procs(["run", "--kernel", str(ROOT / "guest/build/ticker.elf"), "--cmdline",
                   "period_us=20000", "--qmp", str(qmp_path)], pyvmm=FUTURE)
    new, sock, _ = start_incoming(vmm_procs, tmp_path)
    p.wait_for(r"tick 3 ")
    assert package(qmp_path) == "pyvmm 0.3.0"
    info = cpr_transfer(qmp_path, sock)
    assert info["status"] == "failed", info
    for words in ("pyvmm 0.3.0", "protocol 3", f"pyvmm {__version__}", "before the stop"):
        assert words in info["error-desc"], info
    assert [m for m, _ in info["x-timeline"]] == ["setup"]
    assert_keeps_running(p, qmp_path)
    assert new.proc.poll() is None                     # the waiting VMM waits on
    new.stop()                                          # (its stderr is read at its exit)
    deadline = time.monotonic() + 10
    while "still waiting" not in new.stderr and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "pyvmm 0.3.0" in new.stderr and "still waiting" in new.stderr, new.stderr

    info = exec_to(qmp_path, NEW_EXEC_COMMAND)
    assert info["status"] == "failed", info
    assert "pyvmm 0.3.0" in info["error-desc"] and f"pyvmm {__version__}" in \
        info["error-desc"] and "the guest was not stopped" in info["error-desc"], info
    assert_keeps_running(p, qmp_path)


def test_new_vmm_that_says_no_version_is_refused(guests, vmm_procs, tmp_path):
    """A new VMM that answers `prepared` without a version is older than 0.2.0: the old
    VMM refuses it before the stop and tells it why."""
    need_kvm()
    p, qmp_path = start_ticker(vmm_procs, tmp_path)
    p.wait_for(r"tick 3 ")
    path = str(tmp_path / "fake.cpr")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(1)
    told = []

    def fake_new_vmm():
        conn, _ = listener.accept()
        with conn:
            _, fds, _, _ = socket.recv_fds(conn, 65536, 8)
            conn.send(json.dumps({"msg": "prepared"}).encode())
            told.append(json.loads(conn.recv(65536) or b"null"))
            for fd in fds:
                socket.close(fd)
    t = threading.Thread(target=fake_new_vmm)
    t.start()
    try:
        info = cpr_transfer(qmp_path, path)
    finally:
        t.join(15)
        listener.close()
    assert info["status"] == "failed", info
    assert "says no version" in info["error-desc"] and "downgrade" in info["error-desc"], info
    assert told and told[0]["msg"] == "error" and "says no version" in told[0]["desc"], told
    assert [m for m, _ in info["x-timeline"]] == ["setup"]
    assert_keeps_running(p, qmp_path)


def test_state_of_an_unknown_version_is_refused_naming_both():
    """The last line of defence (the checks before the stop come first): a state blob
    saved by a version this one does not read is refused at load, naming both."""
    from vmm import compat, state
    blob = state.dumps({"cpr": {"pyvmm": "0.3.0"}})
    with pytest.raises(state.StateError, match=rf"saved by pyvmm 0\.3\.0; this pyvmm "
                       rf"{__version__} reads the state of pyvmm 0\.1\.0 or {__version__}$"):
        state.loads(blob, "state")
    assert compat.writer({"cpr": {}}) == "0.1.0"      # 0.1.0 wrote no version


def test_an_older_state_is_converted_before_the_schema_check(monkeypatch):
    """state.loads hands a tree that says no version (0.1.0's) to its conversion in
    vmm/compat.py before the schema sees it; a tree of this version skips it."""
    from vmm import compat, state
    seen = []

    def convert(tree):
        seen.append(tree["cpr"].get("pyvmm"))
        return dict(tree, converted=True)
    monkeypatch.setitem(compat.CONVERSIONS, "0.1.0", convert)
    with pytest.raises(state.StateError, match=r"^state: machine: missing$"):
        state.loads(state.dumps({"cpr": {}}), "state")
    assert seen == [None]
    with pytest.raises(state.StateError, match=r"^state: machine: missing$"):
        state.loads(state.dumps({"cpr": {"pyvmm": __version__}}), "state")
    assert seen == [None]
