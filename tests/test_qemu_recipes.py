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
@pytest.mark.parametrize("entry", ["console-script", "python-m-vmm"])
def test_qemu_cpr_exec_recipe_moves_console_and_qmp(guests, vmm_procs, tmp_path, entry):
    p, old_console, old_qmp = start_on_console(vmm_procs, tmp_path)
    new_console, new_qmp = tmp_path / "new.log", tmp_path / "new.qmp"
    state = tmp_path / "vm.state"
    head = [PYVMM_SCRIPT] if entry == "console-script" else [sys.executable, "-m", "vmm"]
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
    assert not old_qmp.exists()                        # the QMP socket moved
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
    tool = subprocess.Popen(pyvmm_cmd("cpr", "--mode", "transfer", "--socket", str(old_qmp),
                                      "--uri", str(sock), "--fault", "target-slow-prepare"),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    tool.send_signal(signal.SIGINT)
    out, err = tool.communicate(timeout=30)
    assert tool.returncode == 130
    assert "Traceback" not in err
    assert "goes on" in err and "query-migrate" in err, err
    assert old.wait(30) == 0                 # it did go on
    assert new_info(new_qmp)["status"] == "completed"
