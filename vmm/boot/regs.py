"""The boot vCPU's registers at a PVH entry point.

The PVH boot protocol (xen/include/public/arch-x86/hvm/start_info.h) enters the
kernel in 32-bit protected mode with paging off, flat 4 GiB code and data
segments, and %ebx pointing at struct hvm_start_info.
"""

from __future__ import annotations

from ..kvm.ffi import ffi

CR0_PE, CR0_ET = 1 << 0, 1 << 4


def _flat(seg, selector: int, type_: int) -> None:
    seg.base, seg.limit, seg.selector, seg.type = 0, 0xFFFFFFFF, selector, type_
    seg.present, seg.dpl, seg.db, seg.s, seg.l, seg.g, seg.avl = 1, 0, 1, 1, 0, 1, 0
    seg.unusable = 0


def setup_pvh_boot(vcpu, entry: int, start_info: int) -> None:
    sregs = vcpu.get_sregs()
    _flat(sregs.cs, 0x08, 0xB)            # execute/read, accessed
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        _flat(seg, 0x10, 0x3)             # read/write, accessed
    tr = sregs.tr
    tr.base, tr.limit, tr.selector, tr.type = 0, 0x67, 0x18, 0xB   # busy 32-bit TSS
    tr.present, tr.s, tr.dpl, tr.db, tr.l, tr.g, tr.unusable = 1, 0, 0, 0, 0, 0, 0
    sregs.cr0 = CR0_PE | CR0_ET
    sregs.cr3 = 0
    sregs.cr4 = 0
    sregs.efer = 0
    vcpu.set_sregs(sregs)

    regs = ffi.new("struct kvm_regs *")
    regs.rip = entry
    regs.rbx = start_info
    regs.rflags = 0x2
    vcpu.set_regs(regs)
