"""The order set_state() writes a vCPU's state in (vmm/kvm/vcpu.py), on real KVM.

A step in that order is kept only for a dependency KVM really has.  The one
checked here: a guest whose LAPIC timer is in TSC-deadline mode with
MSR_IA32_TSC_DEADLINE armed (what Linux uses when CPUID offers it) must find
its deadline armed after a save and restore.  KVM drops a deadline written
while the LAPIC is not in that mode, so the LAPIC must be set before the MSRs.
"""

from __future__ import annotations

import struct

import pytest

from conftest import need_kvm
from vmm.kvm import vcpu as vcpu_module
from vmm.kvm.vcpu import MSR_IA32_TSC, msr_offset, set_msr
from vmm.machine import Machine, MachineConfig, create_kvm_parts
from vmm.memory import MiB, GuestMemory

MSR_IA32_TSC_DEADLINE = 0x6E0
APIC_LVTT = 0x320                    # offset of the LVT timer register
LVTT_TSC_DEADLINE = 2 << 17          # timer mode bits 18:17 = 10b
TIMER_VECTOR = 0xEC


@pytest.fixture(scope="module", autouse=True)
def kvm():
    need_kvm()


def read_msr(vcpu, index: int) -> int:
    return vcpu._read_msrs([index]).entries[0].data


def arm_tsc_deadline(vcpu) -> int:
    """Put vCPU's LAPIC timer in TSC-deadline mode and arm it far ahead; the deadline."""
    from vmm.kvm.ffi import ffi
    lapic = vcpu.get("lapic")
    regs = bytearray(ffi.buffer(lapic))
    struct.pack_into("<I", regs, APIC_LVTT, LVTT_TSC_DEADLINE | TIMER_VECTOR)
    ffi.buffer(lapic)[:] = bytes(regs)
    vcpu.set("lapic", lapic)
    deadline = read_msr(vcpu, MSR_IA32_TSC) + 10**13   # an hour or more away
    vcpu.set_state({"msrs": struct.pack("<IIQ", MSR_IA32_TSC_DEADLINE, 0, deadline)})
    assert read_msr(vcpu, MSR_IA32_TSC_DEADLINE) == deadline
    return deadline


def saved_and_restored(order=None):
    """A machine with an armed TSC deadline, saved and restored into a second one
    (as a live update does), optionally with another restore order; the deadline
    it saved and the one the second machine has."""
    config = MachineConfig(memory=16 * MiB)
    old = Machine(config)
    new = Machine(config)
    try:
        old.create()
        if MSR_IA32_TSC_DEADLINE not in old.vcpus[0].msr_indices():
            pytest.skip("this KVM does not save MSR_IA32_TSC_DEADLINE")
        deadline = arm_tsc_deadline(old.vcpus[0])
        state = old.save_state()
        new.create(memory=GuestMemory(config.memory), cpuids=state["machine"]["cpuid"],
                   restoring=True)
        if order is not None:
            saved_order = vcpu_module.RESTORE_ORDER[:]
            vcpu_module.RESTORE_ORDER[:] = order
        try:
            new.restore_state(state)
        finally:
            if order is not None:
                vcpu_module.RESTORE_ORDER[:] = saved_order
        return deadline, read_msr(new.vcpus[0], MSR_IA32_TSC_DEADLINE)
    finally:
        old.close()
        new.close()


def test_an_armed_tsc_deadline_survives_save_and_restore():
    saved, restored = saved_and_restored()
    assert restored == saved


def test_the_deadline_needs_the_lapic_first():
    """What the order protects, shown on this KVM: with the MSRs written before the
    LAPIC (the order pyvmm had, QEMU's minus its separate deadline write) the
    restored vCPU's deadline is gone, and its guest would wait for a timer
    interrupt that never comes."""
    order = vcpu_module.RESTORE_ORDER[:]
    order.remove("msrs")
    order.insert(order.index("sregs") + 1, "msrs")
    assert order.index("msrs") < order.index("lapic")
    saved, restored = saved_and_restored(order)
    assert saved != 0 and restored == 0


def test_every_restored_vcpu_gets_one_tsc_offset():
    """Four vCPUs saved one after the other (their TSCs read microseconds apart) and
    restored: KVM gives every one the same TSC offset, so an SMP guest's clock stays
    one clock (guest/smp.c checks it from inside).  The check is sharp where KVM
    honours TSC writes: one vCPU written 10 s ahead gets an offset of its own.  This
    host's PVM does not (the guest reads the host's TSC, every offset stays 0): there
    the sharpness check skips, saying so."""
    config = MachineConfig(memory=16 * MiB, vcpus=4)
    old, new = Machine(config), Machine(config)
    try:
        old.create()
        if old.vcpus[0].tsc_offset() is None:
            pytest.skip("this KVM does not report vCPU TSC offsets (KVM_VCPU_TSC_OFFSET)")
        state = old.save_state()
        new.create(memory=GuestMemory(config.memory), cpuids=state["machine"]["cpuid"],
                   restoring=True)
        new.restore_state(state)
        offsets = [v.tsc_offset() for v in new.vcpus]
        assert len(set(offsets)) == 1, offsets
        vcpu = new.vcpus[3]
        raw = vcpu.get_state()["msrs"]
        at = msr_offset(raw, MSR_IA32_TSC)
        tsc = read_msr(vcpu, MSR_IA32_TSC)
        vcpu.set_state({"msrs": set_msr(raw, MSR_IA32_TSC, tsc + 10 * 1000 * vcpu.tsc_khz(),
                                        at)})
        if read_msr(vcpu, MSR_IA32_TSC) - tsc < 5 * 1000 * vcpu.tsc_khz():
            pytest.skip("this host's KVM ignores writes to a vCPU's TSC (PVM: the guest "
                        "reads the host's TSC), so no restore can put vCPUs apart")
        assert vcpu.tsc_offset() != offsets[0]
    finally:
        old.close()
        new.close()


def test_restore_order_names_every_piece_once():
    """Every piece get_state() can return has its place in the order, once."""
    mem = GuestMemory(16 * MiB)
    kvm, vm, vcpus = create_kvm_parts(mem, 1)
    try:
        pieces = set(vcpus[0].get_state())
        order = vcpu_module.RESTORE_ORDER
        assert len(order) == len(set(order)) and pieces <= set(order)
    finally:
        for v in vcpus:
            v.close()
        vm.close()
        kvm.close()
        mem.close()


def test_a_restore_skips_only_what_it_wrote_itself_since_the_vcpu_last_ran():
    """set_state() skips XCR0 and the debug registers when it wrote the same bytes last
    and the vCPU has not run since (a cpr-transfer's new VMM writes its own VM's state
    before the stop, the saved one after it): never a value it did not write, and
    nothing once the vCPU has run."""
    machine = Machine(MachineConfig(memory=16 * MiB))
    try:
        machine.create()
        vcpu = machine.vcpus[0]
        state = vcpu.get_state()
        idempotent = tuple(n for n in vcpu_module.IDEMPOTENT if n in state)
        assert "debugregs" in idempotent
        vcpu.set_state(state)
        assert vcpu.skipped == ()
        vcpu.set_state(state)
        assert vcpu.skipped == idempotent

        def dr0(value):
            raw = bytearray(state["debugregs"])
            struct.pack_into("<Q", raw, 0, value)
            return dict(state, debugregs=bytes(raw))

        def read_dr0():
            return struct.unpack_from("<Q", vcpu.get_state()["debugregs"])[0]

        vcpu.set_state(dr0(0x1000))            # another value: written
        assert "debugregs" not in vcpu.skipped and read_dr0() == 0x1000
        regs = vcpu.get("debugregs")
        regs.db[0] = 0x2000
        vcpu.set("debugregs", regs)            # written another way: forgotten
        vcpu.set_state(dr0(0x1000))
        assert "debugregs" not in vcpu.skipped and read_dr0() == 0x1000
        vcpu.set_state(dr0(0x1000))
        assert "debugregs" in vcpu.skipped and read_dr0() == 0x1000
        vcpu.run.immediate_exit = 1            # KVM_RUN, returning at once: it "ran"
        vcpu.run_once()
        vcpu.set_state(dr0(0x1000))
        assert vcpu.skipped == ()
    finally:
        machine.close()
