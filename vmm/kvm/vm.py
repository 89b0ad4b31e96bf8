"""A KVM VM: memory slots, the in-kernel irqchip and PIT, eventfds, clock, dirty log.

A VM fd belongs to the process that created it (KVM binds it to that mm), so a
live update always creates a new Vm on the same RAM memfd and writes the saved
state into it; every getter here has its setter for that reason.
"""

from __future__ import annotations

import os

from ..errors import KvmError
from .ffi import ffi, ioctl, lib, put_bytes

IRQCHIPS = {"pic_master": 0, "pic_slave": 1, "ioapic": 2}   # name: chip id (and index)
assert len(IRQCHIPS) == lib.PYVMM_VM_NIRQCHIPS
MAX_VCPUS = lib.PYVMM_VM_MAX_VCPUS   # csrc/build_vm.h: the most vCPUs build() takes
_STATE = "struct pyvmm_vm_state"
_layout: dict | None = None


def _spans() -> dict:
    """Where each irqchip (by name) and the PIT lie in struct pyvmm_vm_state, as
    (start, end); asked of cffi on first use, not at import."""
    global _layout
    if _layout is None:
        chips, size = ffi.offsetof(_STATE, "irqchip"), ffi.sizeof("struct kvm_irqchip")
        _layout = {name: (chips + i * size, chips + (i + 1) * size)
                   for name, i in IRQCHIPS.items()}
        pit = ffi.offsetof(_STATE, "pit")
        _layout["pit"] = (pit, pit + ffi.sizeof("struct kvm_pit_state2"))
    return _layout


def layout(memory, nvcpus: int):
    """A `struct pyvmm_vm_layout` for a VM on `memory` with `nvcpus` vCPUs: one slot
    per RAM region, the PIT.  What build() and the cpr-exec prebuilder build."""
    if len(memory.regions) > lib.PYVMM_VM_MAX_REGIONS:
        raise KvmError(f"{len(memory.regions)} RAM regions, pyvmm builds at most "
                       f"{lib.PYVMM_VM_MAX_REGIONS}")
    lay = ffi.new("struct pyvmm_vm_layout *")
    lay.nregions = len(memory.regions)
    lay.nvcpus = nvcpus
    lay.flags = lib.PYVMM_VM_PIT
    for i, r in enumerate(memory.regions):
        lay.regions[i].gpa, lay.regions[i].size, lay.regions[i].offset = \
            r.gpa, r.size, r.offset
    return lay


def build(kvm, memory, nvcpus: int) -> tuple[int, list[int]]:
    """Create a VM on `memory` and its vCPUs: (VM fd, vCPU fds), to wrap with
    Vm(kvm, fd).adopt(memory) and Vcpu(vm, i, fd).

    The steps (memory slots, TSS and identity map, irqchip, PIT, vCPUs) are
    csrc/build_vm.c's pyvmm_build_vm, which the cpr-exec prebuilder runs too:
    the one way pyvmm builds a VM."""
    out = ffi.new("struct pyvmm_vm_fds *")
    r = lib.pyvmm_build_vm(kvm.fd, memory.host_base, memory.size, layout(memory, nvcpus), out)
    if r < 0:
        raise KvmError(f"{ffi.string(out.step).decode()} failed: {os.strerror(-r)}")
    return out.vm_fd, [out.vcpu_fds[i] for i in range(out.nvcpus)]


class Vm:
    """An open KVM VM fd."""

    def __init__(self, kvm, fd: int):
        """A VM made by build() or the cpr-exec prebuilder: call adopt() next."""
        self.kvm = kvm
        self.fd = fd
        os.set_inheritable(self.fd, False)
        self.slots: dict[int, tuple[int, int, int, int]] = {}
        self.has_irqchip = False
        self.has_pit = False
        self.saved_raw = None   # the struct pyvmm_vm_state bytes of the last get_state()

    def adopt(self, mem) -> None:
        """Record what pyvmm_build_vm (csrc/build_vm.c) did to this VM, for the
        layout() of `mem`: one slot per RAM region, no flags; irqchip and PIT."""
        for slot, r in enumerate(mem.regions):
            self.slots[slot] = (r.gpa, r.size, mem.host_base + r.offset, 0)
        self.has_irqchip = True
        self.has_pit = True

    # -- memory ------------------------------------------------------------------
    def set_memory_region(self, slot: int, gpa: int, size: int, host_addr: int,
                          flags: int = 0) -> None:
        region = ffi.new("struct kvm_userspace_memory_region *", {
            "slot": slot, "flags": flags, "guest_phys_addr": gpa,
            "memory_size": size, "userspace_addr": host_addr})
        ioctl(self.fd, lib.KVM_SET_USER_MEMORY_REGION, region, what="SET_USER_MEMORY_REGION")
        if size:
            self.slots[slot] = (gpa, size, host_addr, flags)
        else:
            self.slots.pop(slot, None)

    def get_dirty_log(self, slot: int) -> bytes:
        """The dirty-page bitmap of a slot (one bit per 4 KiB page), cleared by the call."""
        gpa, size, _, _ = self.slots[slot]
        npages = size // 4096
        bitmap = ffi.new("char[]", ((npages + 63) // 64) * 8)
        log = ffi.new("struct kvm_dirty_log *")
        log.slot = slot
        log.dirty_bitmap = bitmap
        ioctl(self.fd, lib.KVM_GET_DIRTY_LOG, log, what="GET_DIRTY_LOG")
        return bytes(ffi.buffer(bitmap))

    # -- platform ----------------------------------------------------------------
    def irq_line(self, irq: int, level: bool) -> None:
        ev = ffi.new("struct kvm_irq_level *", {"irq": irq, "level": int(level)})
        ioctl(self.fd, lib.KVM_IRQ_LINE, ev, what="IRQ_LINE")

    # -- eventfds ------------------------------------------------------------------
    def _ioeventfd(self, addr, length, fd, datamatch, pio, deassign):
        flags = 0
        if datamatch is not None:
            flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
        if pio:
            flags |= lib.KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            flags |= lib.KVM_IOEVENTFD_FLAG_DEASSIGN
        arg = ffi.new("struct kvm_ioeventfd *", {
            "datamatch": datamatch or 0, "addr": addr, "len": length, "fd": fd, "flags": flags})
        ioctl(self.fd, lib.KVM_IOEVENTFD, arg, what="IOEVENTFD")

    def add_ioeventfd(self, addr: int, length: int, fd: int, datamatch: int | None = None,
                      pio: bool = False) -> None:
        """Guest writes to addr signal fd inside the kernel: no exit to Python."""
        self._ioeventfd(addr, length, fd, datamatch, pio, False)

    def remove_ioeventfd(self, addr: int, length: int, fd: int, datamatch: int | None = None,
                         pio: bool = False) -> None:
        self._ioeventfd(addr, length, fd, datamatch, pio, True)

    def add_irqfd(self, fd: int, gsi: int) -> None:
        """Writes to fd raise interrupt `gsi` inside the kernel."""
        arg = ffi.new("struct kvm_irqfd *", {"fd": fd, "gsi": gsi})
        ioctl(self.fd, lib.KVM_IRQFD, arg, what="IRQFD")

    def remove_irqfd(self, fd: int, gsi: int) -> None:
        arg = ffi.new("struct kvm_irqfd *", {"fd": fd, "gsi": gsi,
                                             "flags": lib.KVM_IRQFD_FLAG_DEASSIGN})
        ioctl(self.fd, lib.KVM_IRQFD, arg, what="IRQFD deassign")

    # -- state -------------------------------------------------------------------
    def get_state(self) -> dict:
        """Irqchips (with their pending bits), PIT and KVM clock, as exact struct bytes
        (read in one C call, csrc/kvm_state.c)."""
        s, buf = self._new_state("irqchip" if self.has_irqchip else None,
                                 "pit" if self.has_pit else None)
        self._call(lib.pyvmm_vm_save, s, buf)
        self.saved_raw = buf   # (struct pyvmm_vm_state: cpr-transfer's handoff copies it)
        state = {}
        span = _spans()
        if self.has_irqchip:
            state["irqchip"] = {name: buf[slice(*span[name])] for name in IRQCHIPS}
        if self.has_pit:
            state["pit"] = buf[slice(*span["pit"])]
        state["clock_ns"] = s.clock_ns
        return state

    def set_state(self, state: dict) -> None:
        """Write a state get_state() saved: irqchips, PIT, then the clock."""
        s, buf = self.restore_struct(state)
        self._call(lib.pyvmm_vm_restore, s, buf)

    @classmethod
    def restore_struct(cls, state: dict):
        """The struct pyvmm_vm_state (and its bytes) that restores `state` (set_state;
        a cpr-exec's old image writes its bytes for the new image's prebuilder)."""
        s, buf = cls._new_state(*(name for name in ("irqchip", "pit") if name in state))
        if "irqchip" in state:
            for name in IRQCHIPS:
                put_bytes(buf, _spans()[name], "struct kvm_irqchip", state["irqchip"][name])
        if "pit" in state:
            put_bytes(buf, _spans()["pit"], "struct kvm_pit_state2", state["pit"])
        s.clock_ns = state["clock_ns"]
        return s, buf

    @staticmethod
    def _new_state(*pieces):
        """A zeroed struct pyvmm_vm_state for `pieces` ("irqchip", "pit"), and its bytes."""
        s = ffi.new(_STATE + " *")
        s.flags = ((lib.PYVMM_VM_STATE_IRQCHIP if "irqchip" in pieces else 0)
                   | (lib.PYVMM_VM_STATE_PIT if "pit" in pieces else 0))
        return s, ffi.buffer(s)

    def _call(self, func, s, buf) -> None:
        """pyvmm_vm_save or _restore; a failure raises the ioctl's one-line KvmError."""
        r = func(self.fd, s, len(buf))
        if r < 0:
            raise KvmError(f"{ffi.string(s.step).decode()} failed: {os.strerror(-r)}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


__all__ = ["Vm", "KvmError"]
