"""A KVM VM: memory slots, the in-kernel irqchip and PIT, eventfds, clock, dirty log.

A VM fd belongs to the process that created it (KVM binds it to that mm), so a
live update always creates a new Vm on the same RAM memfd and writes the saved
state into it; every getter here has its setter for that reason.
"""

from __future__ import annotations

import os

from ..errors import KvmError
from .ffi import ffi, from_bytes, ioctl, ioctl_int, lib, to_bytes

# Two pages KVM needs for real-mode emulation on Intel; inside the MMIO hole.
TSS_ADDR = 0xFFFB_D000
IDENTITY_MAP_ADDR = 0xFFFB_C000

IRQCHIPS = {"pic_master": 0, "pic_slave": 1, "ioapic": 2}


class Vm:
    """An open KVM VM fd."""

    def __init__(self, kvm, *, fd: int | None = None):
        """A new VM, or (fd given) one the cpr-exec prebuilder created, see adopt()."""
        self.kvm = kvm
        if fd is None:
            fd = ioctl_int(kvm.fd, lib.KVM_CREATE_VM, 0, what="CREATE_VM")
        self.fd = fd
        os.set_inheritable(self.fd, False)
        self.slots: dict[int, tuple[int, int, int, int]] = {}
        self.has_irqchip = False
        self.has_pit = False

    def adopt(self, mem, *, irqchip: bool = True, pit: bool = True) -> None:
        """Record what the prebuilder (csrc/cpr_exec.c) already did to this VM:
        one slot per RAM region, as map_memory() makes them, and setup_x86()."""
        for slot, r in enumerate(mem.regions):
            self.slots[slot] = (r.gpa, r.size, mem.host_base + r.offset, 0)
        self.has_irqchip = irqchip
        self.has_pit = pit

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

    def map_memory(self, mem, *, log_dirty: bool = False) -> None:
        """Give KVM every RAM region of a GuestMemory, one slot each."""
        flags = lib.KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0
        for slot, r in enumerate(mem.regions):
            self.set_memory_region(slot, r.gpa, r.size, mem.host_base + r.offset, flags)

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
    def setup_x86(self, *, pit: bool = True) -> None:
        """TSS and identity map pages, the in-kernel irqchip (PIC+IOAPIC+LAPIC) and a PIT."""
        ioctl_int(self.fd, lib.KVM_SET_TSS_ADDR, TSS_ADDR, what="SET_TSS_ADDR")
        ident = ffi.new("__u64 *", IDENTITY_MAP_ADDR)
        ioctl(self.fd, lib.KVM_SET_IDENTITY_MAP_ADDR, ident, what="SET_IDENTITY_MAP_ADDR")
        ioctl_int(self.fd, lib.KVM_CREATE_IRQCHIP, 0, what="CREATE_IRQCHIP")
        self.has_irqchip = True
        if pit:
            cfg = ffi.new("struct kvm_pit_config *", {"flags": lib.KVM_PIT_SPEAKER_DUMMY})
            ioctl(self.fd, lib.KVM_CREATE_PIT2, cfg, what="CREATE_PIT2")
            self.has_pit = True

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
    def get_clock(self):
        clock = ffi.new("struct kvm_clock_data *")
        ioctl(self.fd, lib.KVM_GET_CLOCK, clock, what="GET_CLOCK")
        return clock

    def set_clock(self, clock_ns: int) -> None:
        clock = ffi.new("struct kvm_clock_data *", {"clock": clock_ns})
        ioctl(self.fd, lib.KVM_SET_CLOCK, clock, what="SET_CLOCK")

    def get_irqchip(self, chip_id: int):
        chip = ffi.new("struct kvm_irqchip *", {"chip_id": chip_id})
        ioctl(self.fd, lib.KVM_GET_IRQCHIP, chip, what="GET_IRQCHIP")
        return chip

    def set_irqchip(self, chip) -> None:
        ioctl(self.fd, lib.KVM_SET_IRQCHIP, chip, what="SET_IRQCHIP")

    def get_pit(self):
        pit = ffi.new("struct kvm_pit_state2 *")
        ioctl(self.fd, lib.KVM_GET_PIT2, pit, what="GET_PIT2")
        return pit

    def set_pit(self, pit) -> None:
        ioctl(self.fd, lib.KVM_SET_PIT2, pit, what="SET_PIT2")

    def get_state(self) -> dict:
        """Irqchips (with their pending bits), PIT and KVM clock, as exact struct bytes."""
        state = {}
        if self.has_irqchip:
            state["irqchip"] = {name: to_bytes(self.get_irqchip(i)) for name, i in IRQCHIPS.items()}
        if self.has_pit:
            state["pit"] = to_bytes(self.get_pit())
        state["clock_ns"] = int(self.get_clock().clock)
        return state

    def set_state(self, state: dict) -> None:
        if "irqchip" in state:
            for name in IRQCHIPS:
                self.set_irqchip(from_bytes("struct kvm_irqchip", state["irqchip"][name]))
        if "pit" in state:
            self.set_pit(from_bytes("struct kvm_pit_state2", state["pit"]))
        self.set_clock(state["clock_ns"])

    # -- vCPUs -------------------------------------------------------------------
    def create_vcpu(self, index: int):
        from .vcpu import Vcpu
        return Vcpu(self, index)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


__all__ = ["Vm", "KvmError"]
