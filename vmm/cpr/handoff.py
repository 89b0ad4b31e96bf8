"""cpr-transfer's early start: the new VMM runs the guest before its device restore.

Without it, a cpr-transfer's downtime holds everything the new VMM does after the
state arrives: wake up, decode the blob, write the VM's and each vCPU's kernel
state, restore the devices, claim the guest (~1.3 ms here).  With it (`x-early-start`,
`pyvmm cpr --early-start`), before "prepared" the new VMM makes a small memfd, the
*handoff page*, and a C thread (csrc/handoff.c) sleeps on its first word.  The old
VMM, its guest stopped and its kernel state read, writes the VM and vCPU state
there (the cpr-exec early start's block, csrc/cpr_exec.h, without CPUIDs: the new
VM has them since "prepared") and wakes that thread *before* it reads its devices'
state, encodes the blob and sends it.  The thread checks the block, writes it, claims
the guest (EARLY in the commit page, vmm/cpr/commit.py) and runs it (Waiter).  The
new VMM's Python restores only the devices meanwhile, makes its claim final and
takes the vCPUs over (Machine.take_over_early); if it fails instead, it stops the
early vCPUs and hands the guest back with their state as it is then (capture), for
the old VMM to resume from (vmm/cpr/source.py).

What that moves: the point of no return, from the end of the new VMM's restore to
the thread's claim.  A crash of the new VMM after it loses the guest; hence opt-in.
When the block is refused or missing (fault point early-state, another build's
struct sizes) nothing runs early and the new VMM writes the state from the blob.
Without the early start no handoff is offered: alone, writing the state on a
thread beside the old VMM's encoding saved nothing on this host (docs/BENCHMARKS.md).

The new VMM seals the memfd's size before it sends it, so the old one, which
writes into it, cannot be made to fault on a page a peer truncated.
"""

from __future__ import annotations

import fcntl
import os
import stat

from ..errors import VmmError
from ..kvm.ffi import SharedMapping, ffi, lib

WAIT_MS = 5000   # for a posted block to be written (it takes ~0.2 ms; a busy host: more)
RUNNING = lib.PYVMM_HANDOFF_RUNNING
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def size_for(nvcpus: int) -> int:
    return lib.pyvmm_handoff_size(nvcpus)


class _Mapped:
    """A handoff memfd and our mapping of it (either side)."""

    fd = -1
    _map = None

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Waiter(_Mapped):
    """The new VMM's side: the memfd to send with "prepared", and the thread.

    With `commit` (the old VMM's commit word, early start asked for), the thread runs
    the guest as soon as it wrote the state (the early start, see below)."""

    def __init__(self, machine, commit=None):
        n = len(machine.vcpus)
        size = size_for(n)
        self.fd = os.memfd_create("pyvmm-cpr-handoff", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, _SEALS)
            self._map = SharedMapping(self.fd, size)
            w = self.waiter = ffi.new("struct pyvmm_handoff_waiter *")
            w.page, w.size, w.vm_fd, w.nvcpus = self._map.ptr, size, machine.vm.fd, n
            for i, vcpu in enumerate(machine.vcpus):
                w.vcpu_fds[i] = vcpu.fd
            order = machine.vcpus[0].restore_order
            w.order[0:len(order)] = list(order)
            w.norder = len(order)
            w.kvm_fd = machine.kvm.fd
            if commit is not None:
                w.early, w.commit = 1, commit.word
                fd = getattr(machine.ctx.console, "fd", None)
                w.uart.out_fd, w.uart.enabled = (fd if fd is not None else -1), 0
                if fd is not None and machine.uart_ring is not None:
                    w.uart.ring = machine.uart_ring   # (THR writes coalesced early too)
            self.vcpu_fds = [vcpu.fd for vcpu in machine.vcpus]
            r = lib.pyvmm_handoff_start(w)
            if r < 0:
                raise OSError(-r, f"cannot start the handoff thread: {os.strerror(-r)}")
        except BaseException:
            self.close()
            raise

    def finish(self, posted: bool) -> int | None:
        """Once the state message came: if the old VMM says it posted the block, wait
        for the thread to have written it; then stop the thread, unless it runs the
        guest (self.running: stop_early() stops it).  When it wrote the state, or when
        the last early vCPU went into the guest (CLOCK_MONOTONIC ns), or None (nothing
        written: restore from the blob)."""
        w = self.waiter
        if posted:
            lib.pyvmm_handoff_wait(w, WAIT_MS)
        if w.result != RUNNING:
            lib.pyvmm_handoff_stop(w)
        return w.t_done_ns if w.result in (1, RUNNING) else None

    def posted(self) -> bool:
        """The old VMM wrote the block and woke the thread (it may run the guest)."""
        page = ffi.cast("struct pyvmm_handoff_page *", self._map.ptr)
        return page.posted == lib.PYVMM_HANDOFF_POSTED

    @property
    def running(self) -> bool:
        """The early start: the thread wrote the state and runs the guest (until
        stop_early()); the commit word says EARLY."""
        return self.waiter is not None and self.waiter.result == RUNNING and \
            self.waiter.started == 1 and self._early_stopped is None

    _early_stopped = None

    def stop_early(self) -> tuple[list[int], int]:
        """Stop and join the early vCPU threads (Machine.take_over_early calls this, as
        for the cpr-exec prebuilder's): the exit each left in kvm_run for Python (0:
        none), and when the last of them went into the guest."""
        if self._early_stopped is None:
            n = len(self.vcpu_fds)
            pending, entered = ffi.new("int32_t[]", n), ffi.new("int64_t[]", n)
            lib.pyvmm_early_stop(pending, entered, n)
            self._early_stopped = (list(pending), max(entered))
        return self._early_stopped

    def capture(self, machine, state: dict | None) -> dict:
        """The early vCPUs stopped: the guest's vCPU and VM state as it is now, for the
        old VMM to take the guest back (the hand-back; the guest ran here, so the state
        the old VMM saved would turn it back in time).  `state`: the old VMM's, when it
        came (its MSR list is the one to read).  An exit an early thread left for a
        Python device is not completed, as in the cpr-exec fallback
        (prebuild.Prebuilt.capture_early): the old VMM's vCPU runs a port I/O or MMIO
        read again, and replays an MMIO write KVM already retired ("mmio_writes")."""
        import time
        pending, _ = self.stop_early()
        lib.pyvmm_early_reap()
        from .prebuild import read_stopped
        vcpus, writes = read_stopped(machine.vcpus, pending,
                                     state["vcpus"] if state is not None else None)
        return {"vcpus": vcpus, "vm": machine.vm.get_state(),
                "time": {"host_ns": time.clock_gettime_ns(time.CLOCK_MONOTONIC),
                         "tsc_khz": machine.vcpus[0].tsc_khz()},
                "mmio_writes": writes}

    @property
    def problem(self) -> str:
        """Why the thread wrote nothing (after finish)."""
        w = self.waiter
        if w.result >= 0:
            return ""
        return f"{ffi.string(w.step).decode(errors='replace')}: {os.strerror(-w.result)}"

    def close(self) -> None:
        if getattr(self, "waiter", None) is not None:
            lib.pyvmm_handoff_stop(self.waiter)   # (joined before the unmap)
            self.waiter = None
        super().close()


class Page(_Mapped):
    """The old VMM's side: the new VMM's memfd, checked and mapped."""

    def __init__(self, fd: int, nvcpus: int):
        """Take `fd` (closed here on failure): a sealed memfd of the size for nvcpus."""
        self.fd = fd
        try:
            st = os.fstat(fd)
            size = size_for(nvcpus)
            if not stat.S_ISREG(st.st_mode) or st.st_size != size:
                raise VmmError("the new pyvmm's handoff page is not a memfd of the expected size")
            if fcntl.fcntl(fd, fcntl.F_GET_SEALS) & _SEALS != _SEALS:
                raise VmmError("the new pyvmm's handoff page is not sealed")
            self._map = SharedMapping(fd, size)
        except BaseException:
            self.close()
            raise

    def warm_up(self, machine) -> None:
        """Fault the page in and write the header's fixed part before the stop:
        post() runs inside the downtime."""
        self._map.populate(0, self._map.size)
        h = self._header()
        h.magic, h.version = lib.PYVMM_EARLY_MAGIC, lib.PYVMM_EARLY_VERSION
        h.nvcpus = len(machine.vcpus)
        h.header_size = ffi.sizeof("struct pyvmm_early_header")
        h.vm_size = ffi.sizeof("struct pyvmm_vm_state")
        h.vcpu_size = ffi.sizeof("struct pyvmm_vcpu_state")
        h.cpuid_size = ffi.sizeof("struct pyvmm_early_cpuid")

    def _header(self):
        return ffi.cast("struct pyvmm_early_header *",
                        ffi.cast("char *", self._map.ptr) + lib.PYVMM_HANDOFF_BLOCK)

    def post(self, machine, state: dict, corrupt: bool = False) -> int:
        """Copy the VM and vCPU state machine.save_state() just read (`state`; its
        kernel structs as they came from C, vm.saved_raw and each vcpu.saved_raw) into
        the page and wake the new VMM's thread; when (CLOCK_MONOTONIC ns).  ~10 us: no
        Python per piece.  `corrupt` (fault point early-state) makes the block one C
        refuses."""
        h = self._header()   # (warm_up wrote its fixed part)
        h.save_ns, h.tsc_khz = state["time"]["host_ns"], state["time"]["tsc_khz"]
        fast = machine.uart_fast   # (an early start serves the UART as our fast path did;
        if fast.enabled:           # the console is the new VMM's own: uart_fd is a placeholder)
            h.flags = lib.PYVMM_EARLY_UART
            h.uart_fd, h.uart_base, h.uart_lsr = 1, fast.base, fast.lsr
        else:
            h.flags = 0
        at = lib.PYVMM_HANDOFF_BLOCK + ffi.sizeof("struct pyvmm_early_header")
        base = ffi.cast("char *", self._map.ptr)
        raw = machine.vm.saved_raw
        ffi.memmove(base + at, raw, len(raw))
        at += len(raw)
        first = at
        slot = ffi.sizeof("struct pyvmm_vcpu_state") + ffi.sizeof("struct pyvmm_early_cpuid")
        for vcpu in machine.vcpus:
            ffi.memmove(base + at, vcpu.saved_raw, len(vcpu.saved_raw))
            at += slot
        if corrupt:
            ffi.cast("struct pyvmm_vcpu_state *", base + first).npieces = \
                lib.PYVMM_VCPU_NPIECES + 1
        return lib.pyvmm_handoff_post(self._map.ptr, at - lib.PYVMM_HANDOFF_BLOCK)
