"""cpr-exec's early start, end to end: the new image's prebuilder (csrc/cpr_exec.c)
restores the saved vCPU, VM and irqchip state in C and runs the vCPUs before Python
has started; Python restores the devices, then takes the vCPUs over.

The fault `target-slow-restore` holds the new image's Python for a second before the
take-over, so what the guest does in the early window is plain to see: the ticker
prints through the UART fast path meanwhile; a guest that touches a Python device
(the scratch register) waits at that access, which Python then completes, once.
"""

from __future__ import annotations

import os
import re
import sys

import pytest

from conftest import ROOT, need_kvm
from test_cpr import (EARLY_RUNNING, assert_ticks_continuous, assert_ticks_go_on, cpr_exec,
                      new_info, start_ticker, thread_nices, ticks)

pytestmark = pytest.mark.usefixtures("kvm")

TAKE_OVER = re.compile(r"new image: early vCPU threads stopped \((\d+) exits for Python")
SCRATCH = 0xD100_0000


@pytest.fixture(scope="module")
def kvm():
    need_kvm()


def start_scratch_ticker(vmm_procs, tmp_path, period=5000):
    qmp_path = tmp_path / "old.qmp"
    p = vmm_procs(["run", "--kernel", str(ROOT / "guest/build/ticker.elf"),
                   "--device", "scratch", "--cmdline", f"period_us={period} scratch={SCRATCH:#x}",
                   "--qmp", str(qmp_path)])
    return p, qmp_path


def scratch_values(text):
    return [int(v) for v in re.findall(r"scratch=(\d+)(?=\s)", text)]   # (whole numbers only)


def take_over(info) -> tuple[int, int]:
    """(when the early vCPU threads were stopped, how many exits they left for Python)."""
    for step, t in info["x-steps"]:
        m = TAKE_OVER.match(step)
        if m:
            return t, int(m.group(1))
    raise AssertionError(f"no take-over step in {info['x-steps']}")


def early_update(p, qmp_path) -> dict:
    """One cpr-exec whose guest ran again from the prebuilder and ticks on; its
    query-migrate."""
    assert cpr_exec(qmp_path) is None
    info = new_info(qmp_path)
    assert info["status"] == "completed"
    assert dict(info["x-steps"])[EARLY_RUNNING] == dict(info["x-timeline"])["resume"]
    assert_ticks_go_on(p, 3)
    return info


def test_guest_runs_while_python_restores(guests, vmm_procs, tmp_path):
    """With Python held a second before it takes over, the guest's ticks go on: no gap
    between two ticks near the second that Python took, and the early start is where
    the downtime ends."""
    p, qmp_path = start_ticker(vmm_procs, tmp_path, period=20000)
    p.wait_for(r"tick 5 ")
    before = len(ticks(p.text()))
    assert cpr_exec(qmp_path, faults=["target-slow-restore"]) is None
    info = new_info(qmp_path)
    assert info["status"] == "completed"
    steps = dict(info["x-steps"])
    t = dict(info["x-timeline"])
    t_stop, handed = take_over(info)
    assert handed == 0                          # the ticker needs nothing of Python's
    assert t["resume"] == steps[EARLY_RUNNING]
    assert t_stop - t["resume"] > 0.9e9          # Python held back a second meanwhile ...
    assert info["x-downtime-us"] < 500_000       # ... which is not downtime
    assert_ticks_go_on(p, 5)
    seen = ticks(p.text())[before - 1:]
    gaps = [b - a for (_, a), (_, b) in zip(seen, seen[1:])]
    assert sum(gaps) > 1_000_000                  # these ticks span the held second
    assert max(gaps) < 500_000, f"the guest stopped for {max(gaps)} us"  # ... and went on
    # Meanwhile its lines left through the prebuilder's coalesced ring (KVM queues THR
    # writes there, no exit per byte), whose registration the machine took over.
    through = [re.search(r"(\d+) console bytes through their coalesced ring", step)
               for step, _ in info["x-steps"]]
    assert any(m and int(m[1]) > 1000 for m in through), info["x-steps"]


def test_exit_for_a_python_device_in_the_early_window_completes_once(guests, vmm_procs,
                                                                     tmp_path):
    """The scratch ticker reads then writes a Python device every tick: in the held
    second its vCPU waits at the first access, which Python completes after the
    take-over: the value the guest reads goes on by one, never repeats or skips."""
    p, qmp_path = start_scratch_ticker(vmm_procs, tmp_path)
    p.wait_for(r"tick 5 ")
    assert cpr_exec(qmp_path, faults=["target-slow-restore"]) is None
    info = new_info(qmp_path)
    assert info["status"] == "completed"
    assert EARLY_RUNNING in dict(info["x-steps"])
    assert take_over(info)[1] == 1               # one vCPU, waiting at the register
    last = ticks(p.text())[-1][0]
    p.wait_for(rf"tick {last + 10} ")
    values = scratch_values(p.text())
    assert values == list(range(values[0], values[0] + len(values))), values
    assert_ticks_continuous(p.text())


def test_refused_early_state_restores_through_python(guests, vmm_procs, tmp_path):
    """A corrupt early state (fault point early-state) is refused by the prebuilder
    before it touches the VM: Python restores everything, as without the early start."""
    p, qmp_path = start_scratch_ticker(vmm_procs, tmp_path)
    p.wait_for(r"tick 3 ")
    assert cpr_exec(qmp_path, faults=["early-state"]) is None
    info = new_info(qmp_path)
    assert info["status"] == "completed"
    steps = dict(info["x-steps"])
    assert EARLY_RUNNING not in steps
    assert ("prebuilder: early start refused (check the early state: Invalid argument); "
            "Python restores the state") in steps
    assert "new image: vCPU, VM and device state written" in steps
    t = dict(info["x-timeline"])
    assert t["resume"] > steps["new image: vCPU, VM and device state written"]
    assert_ticks_go_on(p, 5)
    values = scratch_values(p.text())
    assert values == list(range(values[0], values[0] + len(values))), values


def test_restore_failure_after_the_early_start_execs_again_with_the_state_now(
        guests, vmm_procs, tmp_path):
    """The guest ran in the new image before its Python failed (target-restore): the
    image exec'd next restores the vCPU state as it was then, not the saved one (the
    guest's clock and its device register go on, neither turns back)."""
    p, qmp_path = start_scratch_ticker(vmm_procs, tmp_path, period=1000)
    p.wait_for(r"tick 3 ")
    assert cpr_exec(qmp_path, faults=["target-restore"]) is None
    assert new_info(qmp_path)["status"] == "completed"
    assert_ticks_go_on(p, 5)
    values = scratch_values(p.text())
    assert values == list(range(values[0], values[0] + len(values))), values


def test_many_updates_in_a_row(guests, vmm_procs, tmp_path):
    """Ten updates, each through the early start, with a Python device in use: ticks
    and the register's value go on by one throughout."""
    p, qmp_path = start_scratch_ticker(vmm_procs, tmp_path, period=2000)
    p.wait_for(r"tick 3 ")
    for _ in range(10):
        early_update(p, qmp_path)
    values = scratch_values(p.text())
    assert values == list(range(values[0], values[0] + len(values))), values
    assert_ticks_continuous(p.text())


def test_the_exec_runs_at_the_vcpus_nice_and_python_gets_its_own_back(guests, vmm_procs,
                                                                      tmp_path):
    """The old image execs at the vCPU threads' nice (-5) so nothing the exec wakes takes
    the CPU from the new image's start and build; once the guest runs, Python's main
    thread has the nice it had before (0 here, 4 after a renice) and the vCPU thread -5,
    and its CPU affinity is what it was."""
    if os.geteuid() != 0:
        pytest.skip("setting a negative nice needs CAP_SYS_NICE")
    p, qmp_path = start_ticker(vmm_procs, tmp_path, period=5000)
    p.wait_for(r"tick 3 ")
    pid = p.proc.pid
    for main_nice in (0, 4):
        os.setpriority(os.PRIO_PROCESS, pid, main_nice)   # (the main thread only)
        early_update(p, qmp_path)
        nices = thread_nices(pid)
        assert nices["main"] == [main_nice] and nices["vcpu0"] == [-5], nices
        # (the constructor moved the main thread off vCPU 0's CPU with a moment's
        # affinity: the mask it had is back)
        assert os.sched_getaffinity(pid) == os.sched_getaffinity(0)


@pytest.mark.parametrize("launcher", ["on", "off"])
def test_the_exec_goes_through_the_launcher_or_ld_preload(guests, vmm_procs, tmp_path,
                                                          launcher):
    """By default a cpr-exec execs pyvmm-cpr-exec, which starts the prebuilder before it
    loads libpython; with PYVMM_CPR_LAUNCHER=off (or a Python without a shared
    libpython) it execs python with libpyvmm_kvm.so in LD_PRELOAD.  Either way the
    guest runs again from the prebuilder, twice in a row, with the same argv."""
    from vmm.cpr import prebuild
    launch = prebuild.launcher()
    if launcher == "on" and launch is None:
        pytest.skip("this Python has no shared libpython: cpr-exec uses LD_PRELOAD here")
    env = {prebuild.LAUNCHER_ENV: "off"} if launcher == "off" else None
    qmp_path = tmp_path / "old.qmp"
    p = vmm_procs(["run", "--kernel", str(ROOT / "guest/build/ticker.elf"),
                   "--cmdline", "period_us=5000", "--qmp", str(qmp_path)], env=env)
    p.wait_for(r"tick 3 ")
    pid = p.proc.pid
    for _ in range(2):
        early_update(p, qmp_path)
        exe = os.readlink(f"/proc/{pid}/exe")
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        assert argv[1:4] == [b"-I", b"-S", b"-c"]
        if launcher == "on":
            assert (exe, comm) == (launch[0], "pyvmm-cpr-exec")
        else:
            assert exe == os.path.realpath(sys.executable) and comm != "pyvmm-cpr-exec"

