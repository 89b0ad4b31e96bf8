"""A 16550A UART on eight consecutive ports: the guest's console.

Linux's 8250 driver probes the chip before using it (autoconfig): it checks
that IER keeps exactly its low four bits, that loopback mode reflects MCR in
MSR, that enabling the FIFOs makes IIR read 0xC0 in its top bits (a 16550A),
and that enabling the THR-empty interrupt raises it at once.  This model does
just enough of the datasheet to pass those checks and to run a console with
interrupts.  There is no baud-rate timing: a byte written to THR goes to
`out` at once and the transmitter is immediately empty again.

The guest sees a 16-byte receive FIFO (1 byte with FIFOs off).  Host input
that does not fit waits in a larger backlog and moves into the FIFO as the
guest reads, so pasting a long line loses nothing.  There is no character
timeout: "data available" is raised as soon as the FIFO holds one byte,
whatever the FCR trigger level.

With an fd console the vCPU loop's C fast path handles LSR reads and THR writes
itself while they have no other effect (attach_fast_path), so a console byte
costs no Python; the model republishes what the fast path may do on every change.
Where KVM offers coalesced PIO, THR writes in those same states do not even exit:
KVM queues them in a ring the vCPU loop writes out (coalesce(); csrc/vcpu_run.h,
`struct pyvmm_uart_ring`), and every access that reaches this model first writes
out what is queued, so the console sees the bytes in the order the guest wrote them.

The interrupt line is level-triggered: `irq(True)` / `irq(False)` is called
whenever "some enabled interrupt is pending" changes.  (OUT2 does not gate the
line, as in QEMU and Firecracker.)  Accesses come from vCPU threads and from
the host input thread, so every register access holds one lock; callbacks run
under it too, which keeps output bytes and line changes in order.
"""

from __future__ import annotations

import os

from .. import sync
from ..schema import U8, Bytes, Int
from ..state import StateError
from . import Device, State

# Register offsets (DLAB = LCR bit 7 selects the divisor latch at 0 and 1).
RBR_THR_DLL, IER_DLM, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)

IER_RDI, IER_THRI, IER_RLSI, IER_MSI = 0x01, 0x02, 0x04, 0x08

IIR_NO_INT, IIR_MSI, IIR_THRI, IIR_RDI, IIR_RLSI = 0x01, 0x00, 0x02, 0x04, 0x06
IIR_FIFO_ENABLED = 0xC0

FCR_ENABLE, FCR_CLEAR_RX, FCR_CLEAR_TX, FCR_DMA, FCR_TRIGGER = 0x01, 0x02, 0x04, 0x08, 0xC0

LCR_DLAB = 0x80

MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x04, 0x08, 0x10

LSR_DR, LSR_OE, LSR_PE, LSR_FE, LSR_BI, LSR_THRE, LSR_TEMT = 1, 2, 4, 8, 0x10, 0x20, 0x40
LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI

MSR_DCTS, MSR_DDSR, MSR_TERI, MSR_DDCD = 0x01, 0x02, 0x04, 0x08
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80
MSR_DELTAS = 0x0F
# With loopback off the "cable" says: carrier, peer ready, clear to send.
MSR_DEFAULT = MSR_DCD | MSR_DSR | MSR_CTS

FIFO_SIZE = 16
BACKLOG_SIZE = 64 * 1024
DEFAULT_DIVISOR = 12   # 9600 baud from the 1.8432 MHz clock

_STATE_INTS = ("ier", "lcr", "mcr", "lsr", "msr", "scr", "dll", "dlm", "fcr",
               "thr_ipending", "irq_level")


class Serial16550:
    """A 16550A UART: `out` gets transmitted bytes, `irq(level)` drives its interrupt line."""

    def __init__(self, out, irq):
        self.out = out
        self.irq = irq
        self._lock = sync.RLock()
        self.ier = 0
        self.lcr = 0
        self.mcr = 0
        self.lsr = LSR_THRE | LSR_TEMT
        self.msr = MSR_DEFAULT
        self.scr = 0
        self.dll = DEFAULT_DIVISOR
        self.dlm = 0
        self.fcr = 0
        self.thr_ipending = 0   # THR-empty interrupt armed; cleared by reading IIR
        self.irq_level = 0      # what we last told `irq`
        self.rx = bytearray()   # the guest-visible receive FIFO
        self.backlog = bytearray()   # host input waiting for room in rx
        self.fast = None        # the vCPU loop's C fast path, see attach_fast_path()

    def attach_fast_path(self, fast) -> None:
        """Let C handle LSR reads and THR writes while they have no side effect.

        `fast` is a `struct pyvmm_uart_fast` (csrc/vcpu_run.h) with `base` and
        `out_fd` set; the vCPU loop reads it on each port-IO exit.  Every change of
        the model below republishes what the C side may do (_publish), under the
        lock: enabled only with DLAB clear, no loopback, no THR-empty interrupt and
        no error bits, so that those two accesses change nothing but the output.
        """
        with self._lock:
            self.fast = fast
            self._publish()

    def coalesce(self, ring) -> None:
        """Let KVM queue THR writes in `ring` (a `struct pyvmm_uart_ring`) while the
        fast path is on, instead of exiting for each byte (the vCPU loop registers the
        port with KVM at the next THR write it serves).  Only once the machine's own
        vCPU threads run the guest: they write the ring out each time KVM_RUN returns
        (the cpr-exec prebuilder's early threads use a ring of their own: the machine
        takes over the zone they registered, Machine.take_over_early)."""
        with self._lock:
            if self.fast is not None and not self.fast.ring:
                self.fast.ring = ring

    def uncoalesce(self) -> None:
        """The VM goes away (its vCPUs stopped): what is queued is written, and the vCPU
        loop forgets the ring."""
        with self._lock:
            f = self.fast
            if f is None or not f.ring:
                return
            from ..kvm.ffi import ffi
            try:
                self.drain()
            finally:
                f.ring = ffi.NULL

    def drain(self) -> None:
        """Write out the THR bytes KVM queued (coalesce()), before anything else the
        guest does with the UART takes effect; a console that fails raises here, as
        it would for a byte written through the model."""
        f = self.fast
        if f is not None and f.ring:
            from ..kvm.ffi import lib
            r = lib.pyvmm_uart_drain(f)
            if r < 0:
                raise OSError(-r, f"the console: {os.strerror(-r)}")

    def _publish(self) -> None:
        f = self.fast
        if f is None:
            return
        f.enabled = 0
        f.lsr = self.lsr
        on = int(not self.lcr & LCR_DLAB and not self.mcr & MCR_LOOP
                 and not self.ier & IER_THRI and not self.lsr & LSR_ERRORS)
        if not on and f.ring and f.ring.registered == 1:
            # THR writes must reach the model again (DLL, loopback, THR interrupts): the
            # zone goes (~8 ms of KVM's SRCU grace period; rare: a guest sets its UART
            # up before it prints), then what KVM queued before leaves first.
            from ..kvm.ffi import lib
            r = lib.pyvmm_uart_uncoalesce(f)
            if r < 0:
                raise OSError(-r, f"KVM_UNREGISTER_COALESCED_MMIO: {os.strerror(-r)}")
            self.drain()
        f.enabled = on

    # -- bus protocol ----------------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        """Byte registers; a wider access reads consecutive registers (as QEMU splits it)."""
        with self._lock:
            self.drain()
            data = bytes(self._read(offset + i) if offset + i < 8 else 0xFF
                         for i in range(size))
            self._publish()
            return data

    def write(self, offset: int, data: bytes) -> None:
        with self._lock:
            self.drain()
            for i, value in enumerate(data):
                if offset + i < 8:
                    self._write(offset + i, value)
            self._publish()

    # -- host side -----------------------------------------------------------------------
    def enqueue_input(self, data: bytes) -> int:
        """Queue host input for the guest; returns how many bytes fit (the rest is dropped).

        At most BACKLOG_SIZE unread bytes (FIFO included) are held.
        """
        with self._lock:
            room = BACKLOG_SIZE - len(self.backlog) - len(self.rx)
            taken = bytes(data[:max(room, 0)])
            self.backlog += taken
            self._refill()
            self._update_irq()
            self._publish()
            return len(taken)

    def pending_input(self) -> int:
        """Bytes of host input the guest has not read yet."""
        with self._lock:
            return len(self.rx) + len(self.backlog)

    # -- registers -------------------------------------------------------------------
    def _read(self, reg: int) -> int:
        if reg == RBR_THR_DLL:
            if self.lcr & LCR_DLAB:
                return self.dll
            value = self.rx.pop(0) if self.rx else 0
            self._refill()
            self._update_irq()
            return value
        if reg == IER_DLM:
            return self.dlm if self.lcr & LCR_DLAB else self.ier
        if reg == IIR_FCR:
            iir = self._iir()
            if iir == IIR_THRI:   # reading IIR is how the driver acknowledges THR empty
                self.thr_ipending = 0
                self._update_irq()
            return iir | (IIR_FIFO_ENABLED if self.fcr & FCR_ENABLE else 0)
        if reg == LCR:
            return self.lcr
        if reg == MCR:
            return self.mcr
        if reg == LSR:
            value = self.lsr
            if value & LSR_ERRORS:   # error bits clear on read
                self.lsr &= ~LSR_ERRORS
                self._update_irq()
            return value
        if reg == MSR:
            value = self.msr
            if value & MSR_DELTAS:   # delta bits clear on read
                self.msr &= ~MSR_DELTAS
                self._update_irq()
            return value
        return self.scr

    def _write(self, reg: int, value: int) -> None:
        if reg == RBR_THR_DLL:
            if self.lcr & LCR_DLAB:
                self.dll = value
            else:
                self._transmit(value)
        elif reg == IER_DLM:
            if self.lcr & LCR_DLAB:
                self.dlm = value
            else:
                self._set_ier(value & 0x0F)
        elif reg == IIR_FCR:
            self._set_fcr(value)
        elif reg == LCR:
            self.lcr = value
        elif reg == MCR:
            self._set_mcr(value & 0x1F)
        elif reg == SCR:
            self.scr = value
        # LSR and MSR are read-only (factory test writes are ignored)

    def _transmit(self, value: int) -> None:
        if self.mcr & MCR_LOOP:
            self._receive(value)
        else:
            self.out(bytes((value,)))
        # The byte left at once: THR and the shift register are empty again.
        self.lsr |= LSR_THRE | LSR_TEMT
        self.thr_ipending = 1 if self.ier & IER_THRI else 0
        self._update_irq()

    def _receive(self, value: int) -> None:
        """A byte arrives on the wire (loopback): into the FIFO, or an overrun."""
        if len(self.rx) < self._fifo_size():
            self.rx.append(value)
            self.lsr |= LSR_DR
        else:
            self.lsr |= LSR_OE

    def _set_ier(self, value: int) -> None:
        changed = self.ier ^ value
        self.ier = value
        # Enabling THRI while THR is empty raises the interrupt at once: Linux's
        # startup test (and Windows) relies on it although datasheets are vague.
        if changed & IER_THRI:
            self.thr_ipending = 1 if value & IER_THRI and self.lsr & LSR_THRE else 0
        self._update_irq()

    def _set_fcr(self, value: int) -> None:
        if (value ^ self.fcr) & FCR_ENABLE:   # switching FIFO mode empties both FIFOs
            value |= FCR_CLEAR_RX | FCR_CLEAR_TX
        if value & FCR_CLEAR_RX:
            self.rx.clear()
            self.lsr &= ~LSR_DR
        self.fcr = value & (FCR_ENABLE | FCR_DMA | FCR_TRIGGER) if value & FCR_ENABLE else 0
        self._refill()
        self._update_irq()

    def _set_mcr(self, value: int) -> None:
        self.mcr = value
        if value & MCR_LOOP:
            # Loopback wires the modem outputs back to the inputs.
            lines = ((MSR_CTS if value & MCR_RTS else 0) | (MSR_DSR if value & MCR_DTR else 0)
                     | (MSR_RI if value & MCR_OUT1 else 0) | (MSR_DCD if value & MCR_OUT2 else 0))
        else:
            lines = MSR_DEFAULT
        old = self.msr
        deltas = 0
        if (old ^ lines) & MSR_CTS:
            deltas |= MSR_DCTS
        if (old ^ lines) & MSR_DSR:
            deltas |= MSR_DDSR
        if (old ^ lines) & MSR_DCD:
            deltas |= MSR_DDCD
        if old & MSR_RI and not lines & MSR_RI:   # trailing edge of ring
            deltas |= MSR_TERI
        self.msr = lines | (old & MSR_DELTAS) | deltas
        self._refill()
        self._update_irq()

    # -- helpers -----------------------------------------------------------------------
    def _fifo_size(self) -> int:
        return FIFO_SIZE if self.fcr & FCR_ENABLE else 1

    def _refill(self) -> None:
        """Move host input into the FIFO (not in loopback: the wire is disconnected)."""
        if self.mcr & MCR_LOOP or not self.backlog:
            return
        room = self._fifo_size() - len(self.rx)
        if room > 0:
            self.rx += self.backlog[:room]
            del self.backlog[:room]
        if self.rx:
            self.lsr |= LSR_DR

    def _iir(self) -> int:
        """The highest-priority pending interrupt that IER enables."""
        ier = self.ier
        if ier & IER_RLSI and self.lsr & LSR_ERRORS:
            return IIR_RLSI
        if ier & IER_RDI and self.lsr & LSR_DR:
            return IIR_RDI
        if ier & IER_THRI and self.thr_ipending:
            return IIR_THRI
        if ier & IER_MSI and self.msr & MSR_DELTAS:
            return IIR_MSI
        return IIR_NO_INT

    def _update_irq(self) -> None:
        if not self.rx:
            self.lsr &= ~LSR_DR
        level = 0 if self._iir() == IIR_NO_INT else 1
        if level != self.irq_level:
            self.irq_level = level
            self.irq(bool(level))

    # -- live update ---------------------------------------------------------------------
    def state(self) -> dict:
        """Every register, both receive queues and the line level, as plain ints and bytes."""
        with self._lock:
            d = {name: getattr(self, name) for name in _STATE_INTS}
            d["rx"] = bytes(self.rx)
            d["backlog"] = bytes(self.backlog)
            return d

    def set_state(self, state: dict) -> None:
        """Take back what state() returned.

        The interrupt line is not driven here: its level is part of the
        interrupt controller's state, which is restored with the VM.
        """
        if not isinstance(state, dict):
            raise StateError(f"serial state should be a dict, found {type(state).__name__}")
        for name in _STATE_INTS:
            value = state.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0xFF:
                raise StateError(f"serial state field {name!r} is missing or not a byte: "
                                 f"{value!r}")
        for name in ("rx", "backlog"):
            if not isinstance(state.get(name), (bytes, bytearray)):
                raise StateError(f"serial state field {name!r} is missing or not bytes")
        if len(state["rx"]) > FIFO_SIZE or len(state["backlog"]) > BACKLOG_SIZE:
            raise StateError("serial state has more queued input than the UART holds")
        with self._lock:
            for name in _STATE_INTS:
                setattr(self, name, state[name])
            self.rx = bytearray(state["rx"])
            self.backlog = bytearray(state["backlog"])
            self._publish()


COM1_PORT, COM1_IRQ = 0x3F8, 4


class SerialState(State):
    """Every register, both receive queues and the line level (Serial16550.state())."""
    VERSION = 1
    FIELDS = {name: Int(0, U8) for name in _STATE_INTS} | {
        "rx": Bytes(most=FIFO_SIZE), "backlog": Bytes(most=BACKLOG_SIZE)}


class SerialDevice(Device):
    """COM1: the UART on ports 0x3f8-0x3ff and IRQ 4, writing to the machine's console.

    With a console that is a file descriptor (it has .fd), the vCPU loop's C fast
    path (the machine's `uart_fast`) writes console bytes without Python."""

    KIND = "serial"
    State = SerialState

    def __init__(self, ctx):
        self.id = "serial"
        vm = ctx.vm
        self.uart = Serial16550(ctx.console, lambda level: vm.irq_line(COM1_IRQ, level))
        fd = getattr(ctx.console, "fd", None)
        if fd is not None and ctx.uart_fast:
            ctx.uart_fast.base = COM1_PORT
            ctx.uart_fast.out_fd = fd
            self.uart.attach_fast_path(ctx.uart_fast)

    @classmethod
    def create(cls, ctx, index, spec):
        return cls(ctx)

    @classmethod
    def restore(cls, ctx, state, fds):
        dev = cls(ctx)
        dev.uart.set_state(state.to_tree())
        return dev

    def attach(self, ctx) -> str:
        ctx.pio_bus.insert(COM1_PORT, 8, self.uart)
        return ""

    def save(self) -> SerialState:
        return SerialState(**self.uart.state())

    def close(self) -> None:
        try:
            self.uart.uncoalesce()
        except OSError:
            pass     # (a console that went away: nothing more can be written to it)

    def summary(self) -> dict:
        return {"name": self.id, "type": "16550A", "port": f"{COM1_PORT:#x}", "irq": COM1_IRQ}
