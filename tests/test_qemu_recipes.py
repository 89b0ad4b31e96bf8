"""QEMU 10's own QMP recipes, driven through qemu.qmp, against real guests.

A QEMU user does a cpr-exec with `migrate-set-parameters mode=cpr-exec
cpr-exec-command=[<the VMM's own command line>, -incoming file:...]` and then
`migrate uri=file:...`; the new image takes the guest over with the console and
QMP socket its command line names.  Commands that could not take the guest over
are refused before the stop.  And the QEMU commands and behaviours a tool
expects around an update: capabilities, postmigrate, paused stays paused, the
machine queries, reset and powerdown.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, need_kvm, pyvmm_cmd
from test_cpr import (QmpFailed, close, new_info, qmp, qmp_connect, start_incoming,
                      start_ticker, ticks, wait_migration)

pytestmark = pytest.mark.usefixtures("kvm")

TICKER = str(ROOT / "guest/build/ticker.elf")
PYVMM_SCRIPT = str(Path(sys.executable).parent / "pyvmm")   # the venv's console script


@pytest.fixture(scope="module")
def kvm():
    need_kvm()


def wait_file(path, pattern, timeout=30.0, start=0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = Path(path).read_text() if Path(path).exists() else ""
        m = re.search(pattern, text[start:])
        if m:
            return m
        time.sleep(0.02)
    raise AssertionError(f"no {pattern!r} in {path} within {timeout}s:\n{text[-2000:]}")


def start_on_console(vmm_procs, tmp_path, name="old"):
    console, qmp_path = tmp_path / f"{name}.log", tmp_path / f"{name}.qmp"
    p = vmm_procs(["run", "--kernel", TICKER, "--cmdline", "period_us=20000",
                   "--console", str(console), "--qmp", str(qmp_path)])
    wait_file(console, r"tick 3 ")
    return p, console, qmp_path


def last_tick(path):
    return ticks(Path(path).read_text())[-1][0]


# -- 1. QEMU 10's cpr-exec recipe -----------------------------------------------------------
@pytest.mark.parametrize("entry", ["console-script", "python-m-vmm", "same-qmp-path",
                                   "sh-wrapper"])
def test_qemu_cpr_exec_recipe_moves_console_and_qmp(guests, vmm_procs, tmp_path, entry):
    p, old_console, old_qmp = start_on_console(vmm_procs, tmp_path)
    new_console, new_qmp = tmp_path / "new.log", tmp_path / "new.qmp"
    if entry == "same-qmp-path":                       # (the old VMM listens there itself)
        new_qmp = old_qmp
    state = tmp_path / "vm.state"
    head = {"python-m-vmm": [sys.executable, "-m", "vmm"],
            "sh-wrapper": ["/bin/sh", "-c", f'exec {PYVMM_SCRIPT} "$@"', "sh"]}.get(
                entry, [PYVMM_SCRIPT])
    command = head + ["run", "--kernel", TICKER, "--cmdline", "period_us=20000",
                      "--console", str(new_console), "--qmp", str(new_qmp),
                      "--incoming", f"file:{state}"]
    q = qmp_connect(old_qmp)
    try:
        qmp(q, "migrate-set-parameters", mode="cpr-exec", **{"cpr-exec-command": command})
        qmp(q, "migrate", uri=f"file:{state}")
        wait_migration(q)
    finally:
        close(q)
    info = new_info(new_qmp)
    assert info["status"] == "completed" and info["mode"] == "cpr-exec"
    assert p.proc.poll() is None                       # same process, still running
    n = last_tick(old_console)
    wait_file(new_console, rf"tick {n + 3} ")          # the serial output moved
    text = old_console.read_text() + new_console.read_text()
    seen = [k for k, _ in ticks(text)]
    assert seen == list(range(seen[0], seen[0] + len(seen))), "ticks lost or repeated"
    if new_qmp != old_qmp:     # the QMP socket moved: the old path goes once the new one serves
        deadline = time.monotonic() + 10
        while old_qmp.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not old_qmp.exists()
    # This installation's own pyvmm: exec'd on the lean path, the VM prebuilt
    steps = dict(info["x-steps"])
    assert "prebuilder: VM, memory slots, irqchip and vCPUs ready" in steps, steps
    # uri=file: holds the state the update carried (pyvmm's blob, not QEMU's stream)
    deadline = time.monotonic() + 10
    while not (state.exists() and state.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.02)
    r = subprocess.run([sys.executable, "-m", "vmm.state", str(state)], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0 and '"vcpus"' in r.stdout, r.stderr


def write_script(path, body):
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


BAD_COMMANDS = {
    "missing-binary": lambda d: ([str(d / "no-such-pyvmm"), "run"], "not found"),
    "not-in-path": lambda d: (["no-such-pyvmm-anywhere", "run"], "not found in PATH"),
    "not-executable": lambda d: ([str(d / "plain.txt")], "not an executable"),
    "bin-false": lambda d: (["/bin/false"], "not a pyvmm"),
    "not-pyvmm": lambda d: (["/bin/echo", "hello"], "not a pyvmm"),
    "script-that-exits": lambda d: ([write_script(d / "w.sh", "echo starting; exit 3\n")],
                                    "not a pyvmm"),
    "qmp-in-use": lambda d: ([PYVMM_SCRIPT, "run", "--qmp", str(d / "busy.qmp")], "in use"),
}


@pytest.mark.parametrize("case", sorted(BAD_COMMANDS))
def test_bad_cpr_exec_command_is_refused_before_the_stop(guests, vmm_procs, tmp_path, case):
    p, qmp_path = start_ticker(vmm_procs, tmp_path)
    p.wait_for(r"tick 3 ")
    (tmp_path / "plain.txt").write_text("not a program\n")
    busy = None
    if case == "qmp-in-use":
        busy, _ = start_ticker(vmm_procs, tmp_path, name="busy")
        busy.wait_for(r"tick 1 ")
    command, why = BAD_COMMANDS[case](tmp_path)
    q = qmp_connect(qmp_path)
    try:
        qmp(q, "migrate-set-parameters", mode="cpr-exec", **{"cpr-exec-command": command})
        qmp(q, "migrate", uri="exec:")
        info = wait_migration(q)
        assert info is not None and info["status"] == "failed", info
        assert why in info["error-desc"], info["error-desc"]
        assert "the guest was not stopped" in info["error-desc"] or why == "not found" or \
            why.startswith("not")
        events = [e["event"] for e in q.get_events()]
        assert "STOP" not in events, events               # never stopped at all
        assert qmp(q, "query-status")["status"] == "running"
    finally:
        close(q)
    assert p.proc.poll() is None
    n = ticks(p.text())[-1][0]
    p.wait_for(rf"tick {n + 3} ")
    if busy is not None:
        assert busy.proc.poll() is None


# -- 4. Ctrl-C on `pyvmm cpr` ---------------------------------------------------------------
def test_ctrl_c_on_pyvmm_cpr_says_the_update_goes_on(guests, vmm_procs, tmp_path):
    old, old_qmp = start_ticker(vmm_procs, tmp_path)
    new, sock, new_qmp = start_incoming(vmm_procs, tmp_path)
    old.wait_for(r"tick 3 ")
    # (Ctrl-C at a terminal: SIGINT at its default, as a shell gives a foreground job,
    # even when this suite runs as a background job of a non-interactive shell, which
    # starts it with SIGINT ignored, and Python then installs no KeyboardInterrupt)
    tool = subprocess.Popen(pyvmm_cmd("cpr", "--mode", "transfer", "--socket", str(old_qmp),
                                      "--uri", str(sock), "--fault", "target-slow-prepare"),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(0.5)
    tool.send_signal(signal.SIGINT)
    out, err = tool.communicate(timeout=30)
    assert tool.returncode == 130
    assert "Traceback" not in err
    assert "goes on" in err and "query-migrate" in err, err
    assert old.wait(30) == 0                 # it did go on
    assert new_info(new_qmp)["status"] == "completed"


# -- 2. capabilities, postmigrate ------------------------------------------------------------
def test_migrate_capabilities_and_events(guests, vmm_procs, tmp_path):
    p, qmp_path = start_ticker(vmm_procs, tmp_path)
    p.wait_for(r"tick 2 ")
    new, sock, new_qmp = start_incoming(vmm_procs, tmp_path)
    q = qmp_connect(qmp_path)
    try:
        caps = qmp(q, "query-migrate-capabilities")
        assert {"capability": "events", "state": False} in caps
        assert all(set(c) == {"capability", "state"} for c in caps) and len(caps) > 10
        with pytest.raises(QmpFailed, match="does not support the migration capability"):
            qmp(q, "migrate-set-capabilities",
                capabilities=[{"capability": "postcopy-ram", "state": True}])
        with pytest.raises(QmpFailed, match="does not accept value"):
            qmp(q, "migrate-set-capabilities",
                capabilities=[{"capability": "no-such-cap", "state": True}])
        qmp(q, "migrate-set-capabilities",
            capabilities=[{"capability": "events", "state": True},
                          {"capability": "xbzrle", "state": False}])
        assert {"capability": "events", "state": True} in qmp(q, "query-migrate-capabilities")
        # QEMU's four modes parse; pyvmm migrates in the two CPR modes that keep the RAM,
        # and in normal mode over TCP only (tests/test_migration.py)
        assert qmp(q, "query-migrate-parameters")["mode"] == "normal"
        addr = {"transport": "socket", "type": "unix", "path": str(sock)}
        with pytest.raises(QmpFailed, match="mode normal migrates over TCP only .* for CPR first set the mode"):
            qmp(q, "migrate", channels=[{"channel-type": "main", "addr": addr}])
        with pytest.raises(QmpFailed, match="'cpr-reboot' is not supported by pyvmm"):
            qmp(q, "migrate-set-parameters", mode="cpr-reboot")
        with pytest.raises(QmpFailed, match="Parameter 'mode' does not accept value 'warp'"):
            qmp(q, "migrate-set-parameters", mode="warp")
        assert qmp(q, "query-migrate-parameters")["mode"] == "normal"
        # A failed update with events on: QEMU's MIGRATION events, in order
        qmp(q, "migrate-set-parameters", mode="cpr-transfer", **{"x-fault": ["after-stop"]})
        qmp(q, "migrate", channels=[{"channel-type": "main", "addr": addr},
                                    {"channel-type": "cpr", "addr": addr}])
        assert wait_migration(q)["status"] == "failed"
        time.sleep(0.2)
        got = [e["data"]["status"] for e in q.get_events() if e["event"] == "MIGRATION"]
        assert got == ["setup", "active", "failed"], got
        # and with events off, none
        qmp(q, "migrate-set-capabilities", capabilities=[{"capability": "events",
                                                          "state": False}])
        qmp(q, "migrate-set-parameters", **{"x-fault": ["save"]})
        qmp(q, "migrate", channels=[{"channel-type": "main", "addr": addr},
                                    {"channel-type": "cpr", "addr": addr}])
        assert wait_migration(q)["status"] == "failed"
        time.sleep(0.2)
        assert not [e for e in q.get_events() if e["event"] == "MIGRATION"]
    finally:
        close(q)


def test_old_vmm_stays_in_postmigrate_until_quit(guests, vmm_procs, tmp_path):
    old, old_qmp = start_ticker(vmm_procs, tmp_path)
    new, sock, new_qmp = start_incoming(vmm_procs, tmp_path)
    old.wait_for(r"tick 3 ")
    q = qmp_connect(old_qmp)
    try:
        qmp(q, "migrate-set-parameters", mode="cpr-transfer")
        qmp(q, "migrate-set-capabilities", capabilities=[{"capability": "events",
                                                          "state": True}])
        addr = {"transport": "socket", "type": "unix", "path": str(sock)}
        qmp(q, "migrate", channels=[{"channel-type": "main", "addr": addr},
                                    {"channel-type": "cpr", "addr": addr}])
        # A client that only listens (no query-migrate polling to wake the monitor)
        # gets every event of the update, in order: those inside the downtime are
        # queued and sent when it ends (qmp/server.py, Monitor.emit).
        got = []
        while ("MIGRATION", "completed") not in got:
            event = q.pull_event(wait=10.0)
            assert event is not None, f"no event for 10 s after {got}"
            got.append((event["event"], event.get("data", {}).get("status")))
        assert got == [("MIGRATION", "setup"), ("MIGRATION", "active"), ("STOP", None),
                       ("MIGRATION", "device"), ("MIGRATION", "completed")], got
        assert wait_migration(q)["status"] == "completed"
        time.sleep(0.5)
        assert old.proc.poll() is None                    # still there, as QEMU's
        assert qmp(q, "query-migrate")["status"] == "completed"
        assert qmp(q, "query-status") == {"status": "postmigrate", "running": False}
        with pytest.raises(QmpFailed, match="postmigrate"):
            qmp(q, "cont")                                # the guest runs elsewhere now
        n = ticks(new.text())[-1][0] if ticks(new.text()) else 0
        new.wait_for(rf"tick {n + 3} ")
        q.cmd_raw("quit")
    finally:
        close(q)
    assert old.wait(15) == 0
    assert new.proc.poll() is None


# -- 3. a paused guest stays paused ---------------------------------------------------------
@pytest.mark.parametrize("mode", ["exec", "transfer"])
def test_paused_guest_stays_paused(guests, vmm_procs, tmp_path, mode):
    old, old_qmp = start_ticker(vmm_procs, tmp_path)
    old.wait_for(r"tick 3 ")
    q = qmp_connect(old_qmp)
    try:
        qmp(q, "stop")
        if mode == "exec":
            qmp(q, "migrate-set-parameters", mode="cpr-exec")
            qmp(q, "migrate", uri="exec:")
            cur, cur_qmp = old, old_qmp
        else:
            new, sock, new_qmp = start_incoming(vmm_procs, tmp_path)
            qmp(q, "migrate-set-parameters", mode="cpr-transfer")
            addr = {"transport": "socket", "type": "unix", "path": str(sock)}
            qmp(q, "migrate", channels=[{"channel-type": "main", "addr": addr},
                                        {"channel-type": "cpr", "addr": addr}])
            cur, cur_qmp = new, new_qmp
        wait_migration(q)
    finally:
        close(q)
    assert new_info(cur_qmp)["status"] == "completed"
    n = ticks(old.text())[-1][0]
    q = qmp_connect(cur_qmp)
    try:
        assert qmp(q, "query-status") == {"status": "paused", "running": False}
        time.sleep(0.5)                                   # 25 periods: no tick may come
        assert ticks(cur.text())[-1][0] == n if cur is old else not ticks(cur.text())
        qmp(q, "cont")
        assert qmp(q, "query-status")["status"] == "running"
    finally:
        close(q)
    cur.wait_for(rf"tick {n + 2} ")


# -- the machine queries and system commands, in QEMU's shapes --------------------------------
def test_machine_queries_and_system_commands(guests, vmm_procs, tmp_path):
    qmp_path = tmp_path / "m.qmp"
    p = vmm_procs(["run", "--kernel", TICKER, "--vcpus", "2", "--memory", "128M",
                   "--qmp", str(qmp_path)])
    p.wait_for(r"tick 2 ")
    q = qmp_connect(qmp_path)
    try:
        cpus = qmp(q, "query-cpus-fast")
        assert [c["cpu-index"] for c in cpus] == [0, 1]
        tids = set(os.listdir(f"/proc/{p.pid}/task"))
        for c in cpus:
            assert {"cpu-index", "qom-path", "thread-id", "props", "target"} <= set(c)
            assert c["target"] == "x86_64" and str(c["thread-id"]) in tids
            with open(f"/proc/{p.pid}/task/{c['thread-id']}/comm") as f:
                assert f.read().strip() == f"vcpu{c['cpu-index']}"
        assert qmp(q, "query-name") == {}
        assert qmp(q, "query-kvm") == {"enabled": True, "present": True}
        assert qmp(q, "query-memory-size-summary") == {"base-memory": 128 << 20,
                                                       "plugged-memory": 0}
        names = {c["name"] for c in qmp(q, "query-commands")}
        assert {"query-cpus-fast", "query-name", "query-kvm", "query-memory-size-summary",
                "system_reset", "system_powerdown", "migrate-set-capabilities",
                "query-migrate-capabilities"} <= names
        with pytest.raises(QmpFailed, match="cannot reset a guest in place"):
            qmp(q, "system_reset")
        qmp(q, "system_powerdown")      # no ACPI: the request is made, the guest ignores it
        time.sleep(0.1)
        assert "POWERDOWN" in [e["event"] for e in q.get_events()]
        assert qmp(q, "query-status")["status"] == "running"
    finally:
        close(q)
    n = ticks(p.text())[-1][0]
    p.wait_for(rf"tick {n + 2} ")
