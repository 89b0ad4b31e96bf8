"""A readable view of a machine's state: what QMP x-query-state returns (and
`pyvmm state`, vmm/client/view.py, prints).

Reading vCPU registers needs the vCPU out of KVM_RUN, so a running machine is
paused while they are read and resumed at once: a short pause (around a
millisecond or more here), which the guest can see.
"""

from __future__ import annotations

from .kvm.ffi import to_dict

# struct kvm_mp_state's values (KVM_MP_STATE_*), by name
MP_STATES = {0: "runnable", 1: "uninitialized", 2: "init_received", 3: "halted",
             4: "sipi_received", 5: "stopped", 6: "check_stop", 7: "operating", 8: "load"}
REG_NAMES = ["rip", "rsp", "rflags", "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"]


def machine_summary(machine) -> dict:
    was_running = machine.running
    if was_running:
        machine.pause()
    try:
        vcpus = []
        for v in machine.vcpus:
            r = to_dict(v.get_regs())
            s = v.get_sregs()
            mp = v.get("mp_state").mp_state
            vcpus.append({
                "index": v.index,
                "mp_state": MP_STATES.get(mp, str(mp)),
                "regs": {n: f"{r[n]:#x}" for n in REG_NAMES},
                "cr0": f"{s.cr0:#x}", "cr3": f"{s.cr3:#x}", "cr4": f"{s.cr4:#x}",
                "efer": f"{s.efer:#x}", "cpl": int(s.cs.dpl),
                "mode": "64-bit" if s.cs.l else "32-bit" if s.cs.db else "16-bit",
            })
    finally:
        if was_running:
            machine.resume()
    mem = machine.memory
    return {
        "running": was_running,
        "vcpus": vcpus,
        "memory": {"size": mem.size, "memfd": mem.fd, "name": mem.name,
                   "regions": [{"gpa": f"{r.gpa:#x}", "size": r.size, "offset": r.offset}
                               for r in mem.regions]},
        "devices": device_summary(machine),
    }


def device_summary(machine) -> list[dict]:
    return [d.summary() for d in machine.devices]

