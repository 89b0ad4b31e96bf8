"""cpr-transfer's handoff (vmm/cpr/handoff.py, csrc/handoff.c): the new VMM's thread
writes the VM and vCPU state the old VMM hands over while the old one still sends the
blob; refused or missing, the blob's state is written as before.

In one process first (two machines, the waiter and the page on one memfd), then
through real updates between two pyvmm processes."""

from __future__ import annotations

import errno
import fcntl
import os
import time

import pytest

from conftest import ROOT, need_kvm
from test_cpr import (assert_keeps_running, assert_ticks_go_on, cpr_transfer, new_info,
                      start_incoming, start_ticker, ticks)

pytestmark = pytest.mark.usefixtures("kvm")

HANDOFF_STEP = "handoff: VM and vCPU state written (a thread of the new pyvmm, in C)"


@pytest.fixture(scope="module")
def kvm():
    need_kvm()


@pytest.fixture
def pair():
    """A ticker machine running, and an empty one of the same shape, paused, as a
    cpr-transfer's new VMM has it at "prepared"."""
    from vmm.machine import FdConsole, Machine, MachineConfig
    from vmm.memory import MiB
    console = FdConsole(os.open(os.devnull, os.O_WRONLY))
    config = MachineConfig(kernel=str(ROOT / "guest/build/ticker.elf"), memory=64 * MiB,
                           vcpus=2, cmdline="period_us=1000", console=console)
    old, new = Machine(config), Machine(config)
    try:
        old.create()
        old.boot()
        old.start()
        new.create(cpuids=[v.cpuid_bytes for v in old.vcpus], restoring=True)
        new.start(paused=True)
        time.sleep(0.2)
        yield old, new
    finally:
        old.close()
        new.close()


def handoff(old, new):
    from vmm.cpr.handoff import Page, Waiter
    waiter = Waiter(new)
    page = Page(os.dup(waiter.fd), len(old.vcpus))
    page.warm_up(old)
    return waiter, page


def test_handed_over_state_is_the_saved_state(guests, pair):
    """What the thread writes is what the old machine saved: read back from the new
    VM, every vCPU's registers and LAPIC and the irqchips equal the saved ones, and
    the TSC moved on by about the time in between."""
    from vmm.kvm.vcpu import MSR_IA32_TSC, msr_offset
    old, new = pair
    waiter, page = handoff(old, new)
    try:
        old.pause()
        state = old.save_state()
        assert page.post(old, state) > 0
        written = waiter.finish(posted=True)
        assert written is not None, waiter.problem
        assert written >= state["time"]["host_ns"]
        back = new.save_state()
        for saved, now in zip(state["vcpus"], back["vcpus"]):
            for piece in ("regs", "sregs", "xcrs", "debugregs", "mp_state", "events"):
                assert saved[piece] == now[piece], piece   # (the LAPIC's timer count moves)
            at = msr_offset(saved["msrs"], MSR_IA32_TSC)
            tsc = [int.from_bytes(x["msrs"][at + 8:at + 16], "little") for x in (saved, now)]
            elapsed_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC) - state["time"]["host_ns"]
            ahead = (tsc[1] - tsc[0]) * 1_000_000 // state["time"]["tsc_khz"]
            assert 0 < ahead <= elapsed_ns + 1_000_000, (ahead, elapsed_ns)
        assert back["vm"]["irqchip"] == state["vm"]["irqchip"]
        # the new machine runs the guest from there
        new.adopt_state(state)
        new.resume()
        new.wait_entered()
    finally:
        page.close()
        waiter.close()


def test_corrupt_block_is_refused_before_any_write(guests, pair):
    old, new = pair
    waiter, page = handoff(old, new)
    try:
        before = new.save_state()["vcpus"][0]["regs"]
        old.pause()
        state = old.save_state()
        page.post(old, state, corrupt=True)
        assert waiter.finish(posted=True) is None
        assert waiter.problem == "check the handed-over state: Invalid argument"
        assert new.save_state()["vcpus"][0]["regs"] == before   # nothing written
    finally:
        page.close()
        waiter.close()


def test_waiter_stops_when_nothing_comes(guests, pair):
    """Stopped without a post (the old VMM rolled back, or is an older pyvmm), or with
    a peer writing garbage into the page's word: the thread ends and is joined."""
    from vmm.kvm.ffi import ffi
    _, new = pair
    from vmm.cpr.handoff import Waiter
    waiter = Waiter(new)
    t = time.monotonic()
    assert waiter.finish(posted=False) is None
    assert waiter.problem == "wait for the handed-over state: " + os.strerror(errno.ECANCELED)
    assert time.monotonic() - t < 0.5
    waiter.close()
    waiter = Waiter(new)
    try:
        ffi.cast("unsigned int *", waiter._map.ptr)[0] = 7   # (no wake-up with it)
        assert waiter.finish(posted=True) is None   # woken by its recheck, or the stop
    finally:
        waiter.close()


def test_page_must_be_a_sealed_memfd_of_the_right_size(guests, pair):
    from vmm.cpr.handoff import Page, size_for
    from vmm.errors import VmmError
    fd = os.memfd_create("not-sealed", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size_for(2))
    with pytest.raises(VmmError, match="not sealed"):
        Page(fd, 2)                                      # (closes fd)
    fd = os.memfd_create("wrong-size", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size_for(1))
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    with pytest.raises(VmmError, match="expected size"):
        Page(fd, 2)


# -- through real updates -------------------------------------------------------------
def test_transfer_without_early_start_offers_no_handoff(guests, vmm_procs, tmp_path):
    """The handoff alone saves nothing on this host (docs/BENCHMARKS.md): only an early
    start asks for it, and a plain cpr-transfer writes the state from the blob."""
    old, old_qmp = start_ticker(vmm_procs, tmp_path, period=1000)
    new, sock, new_qmp = start_incoming(vmm_procs, tmp_path)
    old.wait_for(r"tick 20 ")
    assert cpr_transfer(old_qmp, sock)["status"] == "completed"
    steps = dict(new_info(new_qmp)["x-steps"])
    assert "old: VM and vCPU state handed over" not in steps
    assert "new: vCPU, VM and device state written" in steps
    last_old = ticks(old.text())[-1][0]
    new.wait_for(rf"tick {last_old + 20} ")


def test_refused_handoff_writes_the_blob_state(guests, vmm_procs, tmp_path):
    """Fault point early-state in cpr-transfer with the early start: the handed-over
    block is corrupt, the thread refuses it (nothing runs early), the new VMM writes
    the state from the blob and the update completes; the guest runs on there."""
    from test_cpr_transfer_early import EARLY_STEP, early_transfer
    old, old_qmp = start_ticker(vmm_procs, tmp_path)
    new, sock, new_qmp = start_incoming(vmm_procs, tmp_path)
    old.wait_for(r"tick 3 ")
    assert early_transfer(old_qmp, sock, faults=["early-state"])["status"] == "completed"
    info = new_info(new_qmp)
    steps = dict(info["x-steps"])
    assert HANDOFF_STEP not in steps and EARLY_STEP not in steps
    assert ("new: handoff refused (check the handed-over state: Invalid argument); "
            "the state is written from the blob") in steps
    assert "new: vCPU, VM and device state written" in steps
    last_old = ticks(old.text())[-1][0]
    new.wait_for(rf"tick {last_old + 3} ")
