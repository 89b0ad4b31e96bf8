"""A KVM vCPU: KVM_RUN on the mmap'd kvm_run, CPUID, and every piece of its state.

Every getter has a setter and `get_state()`/`set_state()` carry all of it as the
exact bytes of the kernel's structs.  KVM applies each set ioctl to the vCPU as
it is at that moment, so set_state() writes them in an order that is part of
the format (RESTORE_ORDER), each step for a reason:

1. regs: KVM_SET_REGS drops a pending exception, so it goes before the events
   that may carry one (and before sregs, which KVM checks against RIP: a vCPU
   at the reset vector is made runnable).
2. xsave (fpu without XSAVE), then xcrs: the XSAVE area is checked against what
   CPUID allows (set before set_state), XCR0 after it, as QEMU does.
3. sregs: they carry the APIC base (enabled, x2APIC), which KVM_SET_LAPIC reads
   to interpret the LAPIC registers, and a pending interrupt the events refine.
4. mp_state: after sregs (which can reset it), before the LAPIC, as QEMU does.
5. lapic: before the MSRs, because KVM takes a write to MSR_IA32_TSC_DEADLINE
   only while the LAPIC timer is in TSC-deadline mode and drops it otherwise:
   MSRs first would lose an armed deadline (Firecracker's restore_state says the
   same; QEMU writes that one MSR again after the LAPIC).
   tests/test_vcpu_state.py fails if this order breaks.
6. msrs: in KVM's own index order, which lists MSR_IA32_TSC (moved on by the
   pause, machine.restore_state) before the emulated MSRs such as the
   deadline, so the deadline is armed against the restored TSC.  The KVM clock
   is VM state, set before any vCPU (machine.restore_state).
7. events: last but the debug registers, so nothing after them clears the
   exception, interrupt or NMI they inject.
8. debugregs: independent of the rest.

get_state() and set_state() make all of a vCPU's ioctls in one C call
(csrc/kvm_state.c) on one struct pyvmm_vcpu_state, which Python fills from the
saved bytes and slices into them: one ioctl at a time from Python added a cffi
struct, a copy and a call to each (~25 us of a vCPU's ~95 us save and restore
here, inside a live update's downtime).  The order stays here: C sets the
pieces in the order set_state() gives it, RESTORE_ORDER's.
"""

from __future__ import annotations

import errno
import os

from ..errors import KvmError
from .ffi import SharedMapping, ffi, ioctl, lib, put_bytes
from .system import MAX_CPUID_ENTRIES

# Timing leaf (as QEMU and VMware expose it): EAX = TSC kHz, EBX = APIC bus kHz.
CPUID_TIMING_LEAF = 0x4000_0010
MSR_IA32_TSC = 0x10

# name -> (struct, get ioctl, set ioctl, capability or None)
_SIMPLE_STATE = {
    "regs": ("struct kvm_regs", "KVM_GET_REGS", "KVM_SET_REGS", None),
    "xsave": ("struct kvm_xsave", "KVM_GET_XSAVE", "KVM_SET_XSAVE", "KVM_CAP_XSAVE"),
    "fpu": ("struct kvm_fpu", "KVM_GET_FPU", "KVM_SET_FPU", None),
    "xcrs": ("struct kvm_xcrs", "KVM_GET_XCRS", "KVM_SET_XCRS", "KVM_CAP_XCRS"),
    "sregs": ("struct kvm_sregs", "KVM_GET_SREGS", "KVM_SET_SREGS", None),
    "mp_state": ("struct kvm_mp_state", "KVM_GET_MP_STATE", "KVM_SET_MP_STATE",
                 "KVM_CAP_MP_STATE"),
    "lapic": ("struct kvm_lapic_state", "KVM_GET_LAPIC", "KVM_SET_LAPIC", "KVM_CAP_IRQCHIP"),
    "events": ("struct kvm_vcpu_events", "KVM_GET_VCPU_EVENTS", "KVM_SET_VCPU_EVENTS",
               "KVM_CAP_VCPU_EVENTS"),
    "debugregs": ("struct kvm_debugregs", "KVM_GET_DEBUGREGS", "KVM_SET_DEBUGREGS",
                  "KVM_CAP_DEBUGREGS"),
}
# Restore order, each step for a reason: see the module docstring.
RESTORE_ORDER = ["regs", "xsave", "fpu", "xcrs", "sregs", "mp_state", "lapic", "msrs",
                 "events", "debugregs"]
# Pieces whose KVM_SET_* is idempotent: it only stores its argument (XCR0; DR0-3, DR6,
# DR7) and derives flags from it, no other step of RESTORE_ORDER writes that state, and
# only the guest itself changes it.  set_state() skips one when the value is the one it
# last wrote and the vCPU has not run since (see there).
IDEMPOTENT = ("xcrs", "debugregs")
# Each piece's number in csrc/kvm_state.h (PYVMM_VCPU_REGS ...).
_PIECE = {name: getattr(lib, "PYVMM_VCPU_" + name.upper()) for name in RESTORE_ORDER}
MAX_MSRS = lib.PYVMM_VCPU_MAX_MSRS   # KVM's own limit per GET_MSRS/SET_MSRS
_STATE = "struct pyvmm_vcpu_state"
_layout: dict | None = None


def _spans() -> dict:
    """Where each piece lies in struct pyvmm_vcpu_state, as (start, end); "msrs" and
    "order" are where those arrays start.  Asked of cffi on first use, not at import
    (building the struct's type, and every kernel struct's in it, takes ~0.25 ms)."""
    global _layout
    if _layout is None:
        _layout = {name: (ffi.offsetof(_STATE, name),
                          ffi.offsetof(_STATE, name) + ffi.sizeof(ctype))
                   for name, (ctype, *_) in _SIMPLE_STATE.items()}
        _layout["msrs"] = ffi.offsetof(_STATE, "msrs", "entries")
        _layout["order"] = ffi.offsetof(_STATE, "order")
    return _layout


MSR_ENTRY_SIZE = ffi.sizeof("struct kvm_msr_entry")


def msr_offset(raw: bytes, index: int) -> int | None:
    """Where MSR `index`'s entry starts in saved MSRs (None if they do not hold it)."""
    for off in range(0, len(raw) - MSR_ENTRY_SIZE + 1, MSR_ENTRY_SIZE):
        if int.from_bytes(raw[off:off + 4], "little") == index:
            return off
    return None


def set_msr(raw: bytes, index: int, value: int, at: int | None = None) -> bytes:
    """Saved MSRs with MSR `index` set to `value` (mod 2**64).  `at`: where the entry
    probably is (every vCPU saves the same MSR list): checked, then used without a
    search (the search costs ~20 us a vCPU inside a live update's downtime)."""
    if at is None or at + MSR_ENTRY_SIZE > len(raw) or \
            int.from_bytes(raw[at:at + 4], "little") != index:
        at = msr_offset(raw, index)
        if at is None:
            return raw
    return raw[:at + 8] + (value % (1 << 64)).to_bytes(8, "little") + raw[at + 16:]


def msr_count(raw) -> int:
    """How many struct kvm_msr_entry `raw`, saved MSRs, holds; KvmError if it is not
    such an array or holds more than KVM takes at once."""
    if not isinstance(raw, bytes) or len(raw) % MSR_ENTRY_SIZE:
        raise KvmError("saved MSRs are not an array of struct kvm_msr_entry "
                       "(a state from another pyvmm version?)")
    n = len(raw) // MSR_ENTRY_SIZE
    if n > MAX_MSRS:
        raise KvmError(f"saved MSRs: {n} entries, KVM takes at most {MAX_MSRS}")
    return n


CPUID_HEADER_SIZE = ffi.sizeof("struct kvm_cpuid2")
CPUID_ENTRY_SIZE = ffi.sizeof("struct kvm_cpuid_entry2")


def cpuid_bytes_problem(data) -> str | None:
    """Why `data` is not a struct kvm_cpuid2 with its entries, exactly (None if it is).
    It sizes a C allocation: its length must be the one its `nent` implies."""
    if not isinstance(data, bytes) or len(data) < CPUID_HEADER_SIZE:
        return "not a struct kvm_cpuid2"
    nent = int.from_bytes(data[:4], "little")
    if nent > MAX_CPUID_ENTRIES:
        return f"{nent} entries, at most {MAX_CPUID_ENTRIES}"
    if len(data) != CPUID_HEADER_SIZE + nent * CPUID_ENTRY_SIZE:
        return (f"{len(data)} bytes for {nent} entries (expected "
                f"{CPUID_HEADER_SIZE + nent * CPUID_ENTRY_SIZE})")
    return None


class Vcpu:
    """One vCPU fd and its shared kvm_run page."""

    def __init__(self, vm, index: int, fd: int):
        """Wrap vCPU `index`'s fd, made by vmm.kvm.vm.build or the cpr-exec prebuilder."""
        self.vm = vm
        self.index = index
        self.fd = fd
        self._map = SharedMapping(self.fd, vm.kvm.vcpu_mmap_size)
        self.run = ffi.cast("struct kvm_run *", self._map.ptr)
        self._pieces = [name for name, (_, _, _, cap) in _SIMPLE_STATE.items()
                        if cap is None or vm.kvm.check_extension(getattr(lib, cap))]
        if "xsave" in self._pieces:
            self._pieces.remove("fpu")  # xsave holds the FPU state and more
        self._msr_indices: list[int] | None = None
        self._msr_entries: bytes | None = None   # what get_state() reads (_msr_template)
        self._save_order = bytes(_PIECE[name] for name in self._pieces + ["msrs"])
        # The same pieces in RESTORE_ORDER (cpr-transfer's handoff thread puts a state
        # saved by get_state() in this order: csrc/handoff.c).
        self.restore_order = bytes(_PIECE[name] for name in RESTORE_ORDER
                                   if name in self._pieces or name == "msrs")
        self.saved_raw = None   # the struct pyvmm_vcpu_state bytes of the last get_state()
        self._tsc_khz: int | None = None
        self._written: dict[str, bytes] = {}   # IDEMPOTENT pieces set_state() wrote
        # Where a paused thread running this vCPU waits (vmm/cpu.py); its `entered`
        # count also tells set_state() whether the guest ran since the last write.
        self.gate = ffi.new("struct pyvmm_vcpu_gate *")
        self._written_at = 0
        self.skipped: tuple[str, ...] = ()     # what the last set_state() skipped

    # -- running -------------------------------------------------------------------
    def run_once(self, uart=ffi.NULL, gate=ffi.NULL) -> int:
        """KVM_RUN (again and again while `uart`, a UART fast path, takes the exits,
        and across pauses at `gate`: vmm/cpu.py); returns the exit reason, or
        KVM_EXIT_INTR when a kick interrupted it."""
        if self._written:
            self._written = {}   # the guest may change anything (see set_state)
        r = lib.pyvmm_vcpu_run(self.fd, self.run, uart, gate)
        if r < 0:
            if r in (-errno.EINTR, -errno.EAGAIN):
                return lib.KVM_EXIT_INTR
            raise KvmError(f"KVM_RUN failed on vCPU {self.index}: {os.strerror(-r)}")
        return r

    def io_data(self):
        """The data buffer of the current port-IO exit."""
        io = self.run.io
        return ffi.buffer(ffi.cast("char *", self.run) + io.data_offset, io.size * io.count)

    # -- CPUID and TSC -------------------------------------------------------------
    def setup_cpuid(self) -> None:
        """KVM's supported CPUID with our APIC id and a timing leaf (TSC kHz)."""
        cpuid = self.vm.kvm.supported_cpuid()
        tsc_khz = self.tsc_khz()
        n = cpuid.nent
        for i in range(n):
            e = cpuid.entries[i]
            if e.function == 1:
                e.ebx = (e.ebx & 0x00FF_FFFF) | (self.index << 24)
            elif e.function == 0x4000_0000:
                e.eax = max(e.eax, CPUID_TIMING_LEAF)
        if tsc_khz and not any(cpuid.entries[i].function == CPUID_TIMING_LEAF for i in range(n)):
            cpuid.entries[n].function = CPUID_TIMING_LEAF
            cpuid.entries[n].eax = tsc_khz
            cpuid.entries[n].ebx = 1_000_000  # KVM's LAPIC timer runs at 1 GHz
            cpuid.nent = n + 1
        ioctl(self.fd, lib.KVM_SET_CPUID2, cpuid, what="SET_CPUID2")
        self.cpuid_bytes = bytes(ffi.buffer(cpuid, ffi.sizeof("struct kvm_cpuid2")
                                            + cpuid.nent * ffi.sizeof("struct kvm_cpuid_entry2")))

    def set_cpuid_bytes(self, data: bytes) -> None:
        """Set CPUID from bytes saved by setup_cpuid (a live update keeps the CPU model)."""
        problem = cpuid_bytes_problem(data)
        if problem:
            raise KvmError(f"saved CPUID of vCPU {self.index}: {problem}")
        nent = int.from_bytes(data[:4], "little")
        cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": nent, "entries": nent})
        ffi.buffer(cpuid, len(data))[:] = data   # exactly the allocation's size (checked)
        ioctl(self.fd, lib.KVM_SET_CPUID2, cpuid, what="SET_CPUID2")
        self.cpuid_bytes = data

    def tsc_khz(self) -> int:
        """The guest TSC frequency (fixed for the vCPU's life: asked once)."""
        if self._tsc_khz is None:
            if not self.vm.kvm.check_extension(lib.KVM_CAP_GET_TSC_KHZ):
                self._tsc_khz = 0
            else:
                self._tsc_khz = max(lib.pyvmm_ioctl_int(self.fd, lib.KVM_GET_TSC_KHZ, 0), 0)
        return self._tsc_khz

    def tsc_offset(self) -> int | None:
        """KVM's offset of this vCPU's TSC from the host's (KVM_VCPU_TSC_OFFSET, Linux
        5.16+), or None where KVM does not say.  Equal offsets on every vCPU are what
        keeps an SMP guest's clock one clock."""
        val = ffi.new("__u64 *")
        attr = ffi.new("struct kvm_device_attr *", {
            "group": lib.KVM_VCPU_TSC_CTRL, "attr": lib.KVM_VCPU_TSC_OFFSET,
            "addr": int(ffi.cast("uintptr_t", val))})
        if lib.pyvmm_ioctl(self.fd, lib.KVM_GET_DEVICE_ATTR, attr) < 0:
            return None
        return int(ffi.cast("int64_t", val[0]))

    # -- the simple pieces ------------------------------------------------------------
    def get(self, name: str):
        ctype, get_req, _, _ = _SIMPLE_STATE[name]
        obj = ffi.new(ctype + " *")
        ioctl(self.fd, getattr(lib, get_req), obj, what=f"{get_req[4:]} (vCPU {self.index})")
        return obj

    def set(self, name: str, obj) -> None:
        _, _, set_req, _ = _SIMPLE_STATE[name]
        self._written.pop(name, None)
        ioctl(self.fd, getattr(lib, set_req), obj, what=f"{set_req[4:]} (vCPU {self.index})")

    def get_regs(self):
        return self.get("regs")

    def set_regs(self, regs) -> None:
        self.set("regs", regs)

    def get_sregs(self):
        return self.get("sregs")

    def set_sregs(self, sregs) -> None:
        self.set("sregs", sregs)

    # -- MSRs ---------------------------------------------------------------------------
    def msr_indices(self) -> list[int]:
        """The MSRs this vCPU can really read back (KVM lists some a CPU may lack)."""
        if self._msr_indices is None:
            if self._msr_entries is not None:   # a restore wrote these: readable here
                raw = self._msr_entries
                self._msr_indices = [int.from_bytes(raw[off:off + 4], "little")
                                     for off in range(0, len(raw), MSR_ENTRY_SIZE)]
            else:
                self._msr_indices = [index for index in self.vm.kvm.msr_index_list()
                                     if self._read_msrs([index], quiet=True) is not None]
        return self._msr_indices

    def _read_msrs(self, indices, quiet=False):
        """KVM_GET_MSRS of `indices` as a `struct kvm_msrs *` (None if quiet and it fails)."""
        n = len(indices)
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": n, "entries": n})
        msrs.nmsrs = n
        for i, index in enumerate(indices):
            msrs.entries[i].index = index
        r = lib.pyvmm_ioctl(self.fd, lib.KVM_GET_MSRS, msrs)
        if r != n:
            if quiet:
                return None
            raise KvmError(f"KVM GET_MSRS read {r} of {n} MSRs on vCPU {self.index}")
        return msrs

    def _msr_template(self) -> bytes:
        """The struct kvm_msr_entry array get_state() asks KVM to fill: the indices of
        msr_indices() (C zeroes the values before the ioctl)."""
        if self._msr_entries is None:
            indices = self.msr_indices()
            if len(indices) > MAX_MSRS:
                raise KvmError(f"vCPU {self.index} has {len(indices)} MSRs to save, "
                               f"KVM reads at most {MAX_MSRS} at once")
            self._msr_entries = b"".join(index.to_bytes(4, "little") + bytes(12)
                                         for index in indices)
        return self._msr_entries

    # -- all of it ----------------------------------------------------------------------
    def get_state(self) -> dict:
        """Every piece of vCPU state as exact struct bytes; "msrs" is the array of
        struct kvm_msr_entry (one bytes value, not 2 x 50 numbers: it is decoded
        inside the downtime)."""
        msrs = self._msr_template()
        s, buf = self._new_state()
        span = _spans()
        start = span["msrs"]
        s.msrs.nmsrs = len(msrs) // MSR_ENTRY_SIZE
        buf[start:start + len(msrs)] = msrs
        self._call(lib.pyvmm_vcpu_save, s, buf, self._save_order)
        self.saved_raw = buf
        state = {}
        for name in self._pieces:
            a, b = span[name]
            state[name] = buf[a:b]
        state["msrs"] = buf[start:start + len(msrs)]
        return state

    def set_state(self, state: dict) -> None:
        """Write a state get_state() saved (here or in another process), the pieces
        it has in RESTORE_ORDER.  Every piece is checked before the first ioctl.

        An IDEMPOTENT piece equal to what the last set_state() wrote is skipped when
        the vCPU has not run since: the kernel holds exactly what that write left,
        and writing it again would change nothing.  Every KVM_RUN goes through
        run_once(), which forgets what was written, as does a piece's own set().
        This is a cpr-transfer's new VMM, which writes its own empty VM's state
        back before the stop (Incoming.prepare) and then the saved one inside the
        downtime: for a guest that never touches XCR0 or the debug registers, two
        of a vCPU's nine set ioctls (~10-16 us each here).  tests/test_vcpu_state.py
        checks it."""
        written, self._written = self._written, {}
        if self.gate.entered != self._written_at:   # it ran since (inside one run_once)
            written = {}
        skip = {name for name, value in written.items() if state.get(name) == value}
        s, buf = self.restore_struct(state, skip)
        self._call(lib.pyvmm_vcpu_restore, s, buf)
        self._written = {name: state[name] for name in IDEMPOTENT if name in state}
        self._written_at = self.gate.entered
        self.skipped = tuple(name for name in RESTORE_ORDER if name in skip)
        self.adopt_state(state)

    def restore_struct(self, state: dict, skip=()):
        """The struct pyvmm_vcpu_state (and its bytes) that restores `state`: its pieces
        (but those in `skip`) and their order, RESTORE_ORDER's.  set_state() hands it
        to C; a cpr-exec's old image writes its bytes for the new image's prebuilder
        (vmm/cpr/prebuild.py), which restores a new VM: nothing skipped."""
        s, buf = self._new_state()
        span = _spans()
        order = []
        for name in RESTORE_ORDER:
            if name not in state or name in skip:
                continue
            if name == "msrs":
                raw = state["msrs"]
                s.msrs.nmsrs = msr_count(raw)
                buf[span["msrs"]:span["msrs"] + len(raw)] = raw
            else:
                put_bytes(buf, span[name], _SIMPLE_STATE[name][0], state[name])
            order.append(_PIECE[name])
        s.npieces = len(order)
        buf[span["order"]:span["order"] + len(order)] = bytes(order)
        return s, buf

    def adopt_state(self, state: dict, written_elsewhere: bool = False) -> None:
        """What set_state() learns from `state` besides writing it (also after C wrote
        it: the cpr-exec prebuilder, cpr-transfer's handoff): the saved MSRs are the
        ones readable here.  `written_elsewhere`: not by set_state(), so what it
        last wrote is no longer what the kernel holds (nothing may be skipped)."""
        if written_elsewhere:
            self._written = {}
        if "msrs" in state and self._msr_indices is None and self._msr_entries is None:
            self._msr_entries = state["msrs"]

    def _new_state(self):
        """A zeroed struct pyvmm_vcpu_state and its bytes (a new one each time: cffi
        lets go of the GIL in the C call, so two threads must not share one)."""
        s = ffi.new(_STATE + " *")
        return s, ffi.buffer(s)

    def _call(self, func, s, buf, order: bytes | None = None) -> None:
        """pyvmm_vcpu_save or _restore of the pieces in `order` (None: those the struct
        names already); a failure raises the same one-line KvmError as the ioctl made
        on its own."""
        if order is not None:
            s.npieces = len(order)
            start = _spans()["order"]
            buf[start:start + len(order)] = order
        r = func(self.fd, s, len(buf))
        if r == 0:
            return
        if s.failed != lib.PYVMM_VCPU_MSRS:
            raise KvmError(f"{ffi.string(s.step).decode()} (vCPU {self.index}) failed: "
                           f"{os.strerror(-r)}")
        n, done = s.msrs.nmsrs, s.result
        if func is lib.pyvmm_vcpu_save:
            raise KvmError(f"KVM GET_MSRS read {done} of {n} MSRs on vCPU {self.index}")
        bad = f" (refused MSR {s.msrs.entries[done].index:#x})" if 0 <= done < n else ""
        raise KvmError(f"KVM SET_MSRS wrote {done} of {n} MSRs on vCPU {self.index}{bad}")

    def warm_up(self) -> None:
        """Build the state struct's cffi type and the MSR list once, without an ioctl
        (so it can run while the vCPU is in KVM_RUN): cffi's first use of the type
        costs ~0.25 ms, which would otherwise land in a live update's save."""
        self._new_state()
        _spans()
        if self._msr_indices is not None:
            self._msr_template()

    def close(self) -> None:
        if self.fd >= 0:
            self.run = None
            self._map.close()
            os.close(self.fd)
            self.fd = -1
