"""A vCPU's and the VM's state in one C call each (csrc/kvm_state.c), on real KVM.

The state blob stores the kernel's structs as their exact bytes, so the C path
must read what one ioctl per piece from Python read (a state saved by an older
pyvmm restores here and the other way round), write every piece back, and
refuse a buffer or a saved piece of the wrong size before its first ioctl.
"""

from __future__ import annotations

import struct
import time

import pytest

from conftest import need_kvm
from vmm.errors import KvmError
from vmm.kvm.ffi import ffi, ioctl, lib
from vmm.kvm.vcpu import MAX_MSRS, MSR_ENTRY_SIZE, MSR_IA32_TSC, msr_offset, set_msr
from vmm.kvm.vm import IRQCHIPS
from vmm.machine import Machine, MachineConfig
from vmm.memory import GuestMemory, MiB

MEMORY = 64 * MiB


@pytest.fixture(scope="module", autouse=True)
def kvm():
    need_kvm()


@pytest.fixture
def paused(guests):
    """A ticker guest that ran for a while, paused."""
    m = Machine(MachineConfig(kernel=str(guests / "ticker.elf"), memory=MEMORY,
                              cmdline="period_us=20000", console=lambda b: None))
    try:
        m.create()
        m.boot()
        m.start()
        time.sleep(0.2)
        m.pause()
        yield m
    finally:
        m.close()


@pytest.fixture
def empty():
    """A created, never started machine, as a live update's new VMM has it."""
    m = Machine(MachineConfig(memory=MEMORY))
    try:
        m.create(memory=GuestMemory(MEMORY), restoring=True)
        yield m
    finally:
        m.close()


def without_tsc(msrs: bytes) -> bytes:
    """The MSR entries with MSR_IA32_TSC's value blanked (it moves on while paused)."""
    out = bytearray(msrs)
    for off in range(0, len(out), MSR_ENTRY_SIZE):
        if struct.unpack_from("<I", out, off)[0] == MSR_IA32_TSC:
            out[off + 8:off + 16] = bytes(8)
    return bytes(out)


def without_pit_load_times(pit: bytes) -> bytes:
    """struct kvm_pit_state2 without each channel's count_load_time (KVM_SET_PIT2
    reloads the counters: the kernel's time of that, not the saved one)."""
    out = bytearray(pit)
    channel = 24   # struct kvm_pit_channel_state: count_load_time is its last 8 bytes
    for i in range(3):
        out[i * channel + 16:(i + 1) * channel] = bytes(8)
    return bytes(out)


def test_one_call_reads_what_one_ioctl_per_piece_read(paused):
    v = paused.vcpus[0]
    state = v.get_state()
    assert set(state) == set(v._pieces) | {"msrs"}
    for name in v._pieces:   # the per-piece path the state blob was defined by
        assert state[name] == bytes(ffi.buffer(v.get(name))), name
    msrs = v._read_msrs(v.msr_indices())
    assert without_tsc(state["msrs"]) == \
        without_tsc(bytes(ffi.buffer(msrs.entries, msrs.nmsrs * MSR_ENTRY_SIZE)))

    vm = paused.vm.get_state()
    for name, chip_id in IRQCHIPS.items():
        chip = ffi.new("struct kvm_irqchip *", {"chip_id": chip_id})
        ioctl(paused.vm.fd, lib.KVM_GET_IRQCHIP, chip)
        assert vm["irqchip"][name] == bytes(ffi.buffer(chip)), name
    pit = ffi.new("struct kvm_pit_state2 *")
    ioctl(paused.vm.fd, lib.KVM_GET_PIT2, pit)
    assert vm["pit"] == bytes(ffi.buffer(pit))
    clock = ffi.new("struct kvm_clock_data *")
    ioctl(paused.vm.fd, lib.KVM_GET_CLOCK, clock)
    assert vm["clock_ns"] <= clock.clock < vm["clock_ns"] + 10**9


def test_a_round_trip_writes_every_piece_back(paused, empty):
    """A paused guest's state restored into an empty machine reads back the same."""
    old = paused.vcpus[0]
    debugregs = old.get("debugregs")
    debugregs.db[0] = 0x1234_5000    # a value a fresh vCPU does not have
    old.set("debugregs", debugregs)
    saved = paused.save_state()
    fresh = empty.vcpus[0].get_state()
    assert fresh["regs"] != saved["vcpus"][0]["regs"]
    assert fresh["debugregs"] != saved["vcpus"][0]["debugregs"]

    empty.restore_state(saved, advance_time=False)
    again = empty.save_state()
    for name, value in saved["vcpus"][0].items():
        if name == "msrs":
            assert without_tsc(again["vcpus"][0][name]) == without_tsc(value)
        else:
            assert again["vcpus"][0][name] == value, name
    assert again["vm"]["irqchip"] == saved["vm"]["irqchip"]
    assert without_pit_load_times(again["vm"]["pit"]) == without_pit_load_times(saved["vm"]["pit"])
    assert again["vm"]["clock_ns"] >= saved["vm"]["clock_ns"]


def regs_of(vcpu) -> bytes:
    return bytes(ffi.buffer(vcpu.get("regs")))


@pytest.mark.parametrize("piece, data, message", [
    ("lapic", bytes(1025), "saved struct kvm_lapic_state is 1025 bytes, this kernel's is 1024"),
    ("lapic", bytes(1023), "saved struct kvm_lapic_state is 1023 bytes, this kernel's is 1024"),
    ("msrs", bytes(17), "saved MSRs are not an array of struct kvm_msr_entry"),
    ("msrs", bytes((MAX_MSRS + 1) * MSR_ENTRY_SIZE),
     f"saved MSRs: {MAX_MSRS + 1} entries, KVM takes at most {MAX_MSRS}"),
])
def test_a_saved_piece_of_the_wrong_size_is_refused_before_any_ioctl(empty, piece, data, message):
    """Even a piece late in the order: the regs, first in it, stay as they were."""
    v = empty.vcpus[0]
    before = regs_of(v)
    state = v.get_state()
    state["regs"] = bytes(len(state["regs"]))
    state[piece] = data
    with pytest.raises(KvmError, match="^" + message):
        v.set_state(state)
    assert regs_of(v) == before


def test_the_vm_refuses_a_saved_irqchip_of_the_wrong_size(empty):
    state = empty.vm.get_state()
    state["irqchip"]["ioapic"] += b"\0"
    with pytest.raises(KvmError, match="^saved struct kvm_irqchip is 521 bytes"):
        empty.vm.set_state(state)


def test_what_kvm_refuses_is_named_in_one_line(empty):
    v = empty.vcpus[0]
    bad_mp_state = struct.pack("<I", 0xFFFF)
    with pytest.raises(KvmError, match=r"^KVM SET_MP_STATE \(vCPU 0\) failed: Invalid argument$"):
        v.set_state({"mp_state": bad_mp_state})
    no_such_msr = struct.pack("<IIQ", 0xDEAD_BEEF, 0, 1)
    with pytest.raises(KvmError, match=r"^KVM SET_MSRS wrote 0 of 1 MSRs on vCPU 0 "
                                       r"\(refused MSR 0xdeadbeef\)$"):
        v.set_state({"msrs": no_such_msr})


def test_c_refuses_a_wrong_buffer_size_or_count(empty):
    """The C functions check every length they are handed against the struct; a
    refusal does nothing and says which check failed."""
    fd = empty.vcpus[0].fd
    before = regs_of(empty.vcpus[0])
    s = ffi.new("struct pyvmm_vcpu_state *")
    size = ffi.sizeof(s[0])
    s.npieces = 1
    s.order[0] = lib.PYVMM_VCPU_REGS     # all zero regs, if it ever got that far

    def refused(call, n, err):
        s.step = b""
        assert call(fd, s, n) == -err
        return ffi.string(s.step).decode()

    for call in (lib.pyvmm_vcpu_save, lib.pyvmm_vcpu_restore):
        assert refused(call, size - 1, 22) == "check the vCPU state's size"
        assert refused(call, size + 1, 22) == "check the vCPU state's size"
        assert refused(call, 4, 22) == ""   # too small to hold even the step: not written
    s.npieces = lib.PYVMM_VCPU_NPIECES + 1
    assert refused(lib.pyvmm_vcpu_restore, size, 7) == "check the vCPU state's piece count"
    s.npieces = 1
    s.order[0] = lib.PYVMM_VCPU_NPIECES
    assert refused(lib.pyvmm_vcpu_restore, size, 22) == "check the vCPU state's pieces"
    s.order[0] = lib.PYVMM_VCPU_MSRS
    s.msrs.nmsrs = MAX_MSRS + 1
    assert refused(lib.pyvmm_vcpu_restore, size, 7) == "check the vCPU state's MSR count"
    assert regs_of(empty.vcpus[0]) == before

    vm = ffi.new("struct pyvmm_vm_state *")
    vm_size = ffi.sizeof(vm[0])
    assert lib.pyvmm_vm_restore(empty.vm.fd, vm, vm_size - 1) == -22
    assert ffi.string(vm.step) == b"check the VM state's size"
    vm.flags = 4
    assert lib.pyvmm_vm_restore(empty.vm.fd, vm, vm_size) == -22
    assert ffi.string(vm.step) == b"check the VM state's flags"


def test_set_msr_takes_a_right_hint_and_searches_past_a_wrong_one():
    """restore_state writes every vCPU's TSC at the offset found in vCPU 0's MSRs; a
    vCPU whose list differs is searched, never patched at the wrong entry."""
    def entries(*pairs):
        return b"".join(struct.pack("<IIQ", i, 0, v) for i, v in pairs)
    raw = entries((0x3B, 7), (MSR_IA32_TSC, 5))
    at = msr_offset(raw, MSR_IA32_TSC)
    assert at == MSR_ENTRY_SIZE
    assert set_msr(raw, MSR_IA32_TSC, 9, at) == entries((0x3B, 7), (MSR_IA32_TSC, 9))
    other = entries((MSR_IA32_TSC, 5), (0x3B, 7))          # the TSC first: hint is wrong
    assert set_msr(other, MSR_IA32_TSC, 9, at) == entries((MSR_IA32_TSC, 9), (0x3B, 7))
    assert set_msr(other, MSR_IA32_TSC, -1, 10 * MSR_ENTRY_SIZE) == \
        entries((MSR_IA32_TSC, 2 ** 64 - 1), (0x3B, 7))     # past the end: searched; mod 2**64
    assert set_msr(entries((0x3B, 7)), MSR_IA32_TSC, 9, 0) == entries((0x3B, 7))

