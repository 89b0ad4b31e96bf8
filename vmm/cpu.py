"""vCPU threads: the KVM_RUN loop, exit dispatch, and pause/resume from another thread.

Each vCPU runs KVM_RUN on its own thread (cffi drops the GIL for the ioctl).
Port IO and MMIO exits go to the machine's buses; anything pyvmm cannot handle
stops the VM with a register dump.

Pausing is the first step of a live update, so it must be exact: the pausing
thread asks the vCPU's gate (csrc/vcpu_run.h) for a pause, sets
`immediate_exit` and sends SIGUSR1 (an empty C handler, so KVM_RUN returns
EINTR).  A vCPU thread kicked out of KVM_RUN parks at the gate right there, in
C: KVM completes a pending IO instruction before it looks at signals, so
nothing is half done.  One that was in Python handling an exit when the pause
came runs KVM_RUN once more with immediate_exit set, which completes a half-done
IO instruction without entering the guest (KVM documents that vCPU state is
consistent only after that), and only then parks.  Parked threads wait in C
without the GIL; released, they go back into the guest from C, all at once.
"""

from __future__ import annotations

import time

from . import sync
from .errors import GuestError
from .kvm.ffi import ffi, lib, to_dict

KICK_SIGNAL = lib.SIGUSR1
_kick_installed = False


def install_kick_handler() -> None:
    global _kick_installed
    if not _kick_installed:
        if lib.pyvmm_install_kick_handler(KICK_SIGNAL) < 0:
            raise OSError("cannot install the vCPU kick signal handler")
        _kick_installed = True


class VcpuThread:
    """Runs one vCPU until the machine stops; can be paused and resumed."""

    def __init__(self, vcpu, pio_bus, mmio_bus, on_error, uart=ffi.NULL):
        self.vcpu = vcpu
        self.uart = uart   # a UART fast path (Serial16550.attach_fast_path) or NULL
        self.pio_bus = pio_bus
        self.mmio_bus = mmio_bus
        self.on_error = on_error
        self.exits = 0
        # An exit another thread left in kvm_run for this one to complete first (the
        # cpr-exec prebuilder's vCPU threads: Machine.take_over_early); 0 for none.
        self.pending_exit = 0
        self.gate = vcpu.gate   # want (pause, stop), parked, entered: csrc/vcpu_run.h
        self._cond = sync.Condition()   # guards the kick against the thread's end
        self._exited = False   # set (under _cond) as the thread ends: no kick after it
        self._thread: sync.Thread | None = None
        self._tid = 0
        self._since: int | None = None   # gate.entered at the last resume of a paused vCPU

    # -- control (other threads) -------------------------------------------------------
    def start(self, paused: bool = False) -> None:
        install_kick_handler()
        g = self.gate
        g.want, g.parked = (lib.PYVMM_GATE_PAUSE if paused else 0), lib.PYVMM_GATE_RUNNING
        self._since = g.entered if paused else None
        self._tid, self._exited = 0, False
        self._thread = sync.Thread(self._main, name=f"vcpu{self.vcpu.index}")
        self._thread.start()

    def _kick(self) -> None:
        """Out of KVM_RUN (the caller holds _cond).  Never once the thread has ended:
        pthread_kill on a thread that is gone reads its freed descriptor (glibc unmaps
        the stacks it does not cache: a segfault seen with 8 vCPUs)."""
        if self._tid and not self._exited:
            lib.pyvmm_gate_kick(self.vcpu.run, self._tid, KICK_SIGNAL)
        else:
            self.vcpu.run.immediate_exit = 1

    def pause(self) -> None:
        """Return once the vCPU is out of the guest with its state consistent."""
        self.request_pause()
        self.wait_paused()

    def request_pause(self) -> None:
        """Ask the vCPU to leave the guest (kick it), without waiting: a machine asks
        all its vCPUs first, then waits for each (wait_paused), so N vCPUs stop in
        about the time of one."""
        with self._cond:
            lib.pyvmm_gate_set(self.gate, lib.PYVMM_GATE_PAUSE)
            if self.gate.parked != lib.PYVMM_GATE_RUNNING or not self.alive:
                return
            self._kick()

    def wait_paused(self) -> None:
        """After request_pause(): until the vCPU is parked with its exit completed (or its
        thread has ended).  Waits in C, GIL released; kicks again every 50 ms."""
        while self.gate.parked == lib.PYVMM_GATE_RUNNING and self.alive:
            if lib.pyvmm_gate_wait_parked(self.gate, 50) < 0:
                with self._cond:
                    if self.gate.parked == lib.PYVMM_GATE_RUNNING:
                        self._kick()

    def resume(self) -> None:
        g = self.gate
        if g.want & lib.PYVMM_GATE_PAUSE:
            self._since = g.entered
        lib.pyvmm_gate_clear(g, lib.PYVMM_GATE_PAUSE)

    @property
    def entered_ns(self) -> int:
        """When the thread last went (back) into the guest (CLOCK_MONOTONIC ns)."""
        return self.gate.entered_ns

    def wait_entered(self, timeout: float) -> int:
        """After resume(): block in C (GIL released) until the thread has left the gate
        for the guest; returns when it went in."""
        if self._since is not None and self.alive:
            lib.pyvmm_gate_wait_entered(self.gate, self._since, int(timeout * 1000))
        return self.gate.entered_ns

    def stop(self) -> None:
        with self._cond:
            lib.pyvmm_gate_set(self.gate, lib.PYVMM_GATE_STOP)
            self._kick()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None and self._thread.ident != sync.get_ident():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def paused(self) -> bool:
        return self.gate.parked == lib.PYVMM_GATE_PARKED

    # -- the vCPU thread ---------------------------------------------------------------
    def _main(self) -> None:
        self._tid = sync.get_ident()
        set_os_thread_name(f"vcpu{self.vcpu.index}")
        lib.pyvmm_vcpu_thread_nice()   # (ahead of the VMM's own threads, where allowed)
        try:
            self._loop()
        except GuestError as e:
            self.on_error(e)
        except Exception as e:  # a bug in a device model must not hang the VM silently
            self.on_error(GuestError(f"vCPU {self.vcpu.index}: {type(e).__name__}: {e}"))
        finally:
            with self._cond:
                self._exited = True
                lib.pyvmm_gate_gone(self.gate)

    def _park(self, pending: bool = True) -> bool:
        """Complete any half-done exit, then wait at the gate while paused (in C, GIL
        released). False = stop.

        `pending`: the last KVM_RUN returned an exit whose emulation KVM finishes
        only on the next KVM_RUN (IO, MMIO).  After an EINTR exit there is none:
        KVM completes pending operations before it looks at signals or
        immediate_exit, so the extra KVM_RUN (~50 us here) is skipped."""
        run = self.vcpu.run
        if self.gate.want & lib.PYVMM_GATE_STOP:
            return False
        if pending:   # (the kick set immediate_exit; a thread parked from its start must not:
            # the cpr-exec prebuilder's vCPU thread may still run this vCPU)
            run.immediate_exit = 1
            self.vcpu.run_once()  # finishes pending IO/MMIO without entering the guest
        return lib.pyvmm_gate_park(self.gate, run) == 0

    def _loop(self) -> None:
        vcpu = self.vcpu
        run = vcpu.run
        pio, mmio = self.pio_bus, self.mmio_bus
        EXIT_IO, EXIT_MMIO, EXIT_INTR = lib.KVM_EXIT_IO, lib.KVM_EXIT_MMIO, lib.KVM_EXIT_INTR
        IO_OUT = lib.KVM_EXIT_IO_OUT
        uart, gate = self.uart, self.gate
        if not gate.want:
            gate.entered_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        reason = EXIT_INTR
        while True:
            if gate.want and not self._park(pending=reason != EXIT_INTR):
                return
            if self.pending_exit:
                reason, self.pending_exit = self.pending_exit, 0
            else:
                reason = vcpu.run_once(uart, gate)
            self.exits += 1
            if reason == EXIT_IO:
                io = run.io
                size, count, port = io.size, io.count, io.port
                buf = vcpu.io_data()
                if io.direction == IO_OUT:
                    for i in range(count):
                        pio.write(port, buf[i * size:(i + 1) * size])
                else:
                    for i in range(count):
                        data = pio.read(port, size)
                        buf[i * size:(i + 1) * size] = data if data is not None else b"\xff" * size
            elif reason == EXIT_MMIO:
                m = run.mmio
                n = m.len
                if m.is_write:
                    mmio.write(m.phys_addr, bytes(ffi.buffer(m.data, n)))
                else:
                    data = mmio.read(m.phys_addr, n)
                    ffi.buffer(m.data, n)[:] = data if data is not None else b"\xff" * n
            elif reason == EXIT_INTR:
                continue
            else:
                self._unhandled(reason)
                return

    def _unhandled(self, reason: int) -> None:
        run = self.vcpu.run
        where = f"vCPU {self.vcpu.index}"
        if reason == lib.KVM_EXIT_SHUTDOWN:
            msg = f"the guest triple-faulted (KVM_EXIT_SHUTDOWN) on {where}"
        elif reason == lib.KVM_EXIT_SYSTEM_EVENT:
            msg = f"the guest asked for system event {run.system_event.type} on {where}"
        elif reason == lib.KVM_EXIT_INTERNAL_ERROR:
            data = [hex(run.internal.data[i]) for i in range(min(run.internal.ndata, 16))]
            msg = (f"KVM internal error {run.internal.suberror} on {where} (1 = an instruction "
                   f"KVM cannot emulate), data {data}")
        elif reason == lib.KVM_EXIT_FAIL_ENTRY:
            msg = (f"KVM could not enter the guest on {where}: hardware reason "
                   f"{run.fail_entry.hardware_entry_failure_reason:#x}")
        elif reason == lib.KVM_EXIT_HLT:
            msg = f"the guest halted with no interrupt controller on {where}"
        else:
            msg = f"unhandled KVM exit {reason} on {where}"
        raise GuestError(msg + "\n" + register_dump(self.vcpu))


def set_os_thread_name(name: str) -> None:
    """Name the OS thread (Python's names are invisible to ps, top and /proc)."""
    lib.pyvmm_set_thread_name(name.encode()[:15])


def register_dump(vcpu) -> str:
    """A few lines a student can read: general registers, control registers, segments."""
    try:
        r = to_dict(vcpu.get_regs())
        s = vcpu.get_sregs()
    except Exception as e:  # the dump must never hide the original error
        return f"  (registers unavailable: {e})"
    names = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"]
    lines = [f"  rip={r['rip']:#018x} rflags={r['rflags']:#010x}"]
    for i in range(0, 16, 4):
        lines.append("  " + " ".join(f"{n}={r[n]:#018x}" for n in names[i:i + 4]))
    lines.append(f"  cr0={s.cr0:#x} cr2={s.cr2:#x} cr3={s.cr3:#x} cr4={s.cr4:#x} efer={s.efer:#x}")
    lines.append(f"  cs={s.cs.selector:#06x} (dpl {s.cs.dpl}, {'64' if s.cs.l else '32' if s.cs.db else '16'}-bit)"
                 f" ss={s.ss.selector:#06x} tr={s.tr.selector:#06x}"
                 f" gdt={s.gdt.base:#x}/{s.gdt.limit:#x} idt={s.idt.base:#x}/{s.idt.limit:#x}")
    return "\n".join(lines)
