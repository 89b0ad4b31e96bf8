"""The bus, the 16550A UART and the debug-exit port, driven the way a guest drives them."""

import threading

import pytest

from vmm.devices.bus import Bus
from vmm.devices.debug_exit import DebugExit
from vmm.devices.serial import (BACKLOG_SIZE, FIFO_SIZE, Serial16550)
from vmm.state import StateError, dumps, loads

# register offsets
RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR, MCR, LSR, MSR, SCR = 3, 4, 5, 6, 7


class Recorder:
    """A device that remembers what reached it."""

    def __init__(self, fill=0xAB):
        self.fill, self.log = fill, []

    def read(self, offset, size):
        self.log.append(("r", offset, size))
        return bytes([self.fill]) * size

    def write(self, offset, data):
        self.log.append(("w", offset, bytes(data)))


# -- bus -----------------------------------------------------------------------------------------
def test_bus_dispatches_with_relative_offsets():
    bus = Bus()
    a, b = Recorder(0x11), Recorder(0x22)
    bus.insert(0x3F8, 8, a)
    bus.insert(0xF4, 4, b)
    assert bus.read(0x3FA, 1) == b"\x11"
    assert bus.write(0xF4, b"\x01\x02") is True
    assert bus.read(0xF7, 1) == b"\x22"
    assert a.log == [("r", 2, 1)]
    assert b.log == [("w", 0, b"\x01\x02"), ("r", 3, 1)]
    assert [(base, n) for base, n, _ in bus] == [(0xF4, 4), (0x3F8, 8)]


def test_bus_unmapped_and_straddling_accesses_reach_nobody():
    bus = Bus()
    dev = Recorder()
    bus.insert(0x1000, 0x10, dev)
    assert bus.read(0xFFF, 1) is None
    assert bus.read(0x1010, 1) is None
    assert bus.read(0x100E, 4) is None       # runs past the end of the range
    assert bus.write(0x0, b"\x00") is False
    assert bus.write(0x100F, b"\x00\x00") is False
    assert dev.log == []
    assert bus.read(0x100C, 4) == b"\xab" * 4  # the last four bytes are fine


def test_bus_rejects_overlaps_but_allows_touching_ranges():
    bus = Bus()
    bus.insert(0x100, 0x10, Recorder())
    for base, length in [(0x100, 1), (0xF8, 0x9), (0x10F, 4), (0x104, 2), (0x0, 0x1000)]:
        with pytest.raises(ValueError, match="overlaps"):
            bus.insert(base, length, Recorder())
    bus.insert(0xF0, 0x10, Recorder())
    bus.insert(0x110, 0x10, Recorder())
    with pytest.raises(ValueError):
        bus.insert(0x200, 0, Recorder())
    assert len(bus) == 3


def test_bus_last_hit_cache_follows_the_address():
    bus = Bus()
    devs = [Recorder(i) for i in range(50)]
    for i, d in enumerate(devs):
        bus.insert(0x1000 * (i + 1), 0x100, d)
    for _ in range(3):
        for i in (0, 49, 7, 7, 8, 0):
            assert bus.read(0x1000 * (i + 1) + 0x80, 1) == bytes([i])
        assert bus.read(0x1000 + 0x100, 1) is None   # just past a range the cache holds


def test_bus_remove():
    bus = Bus()
    dev = Recorder()
    bus.insert(0x10, 4, dev)
    assert bus.read(0x10, 1) is not None            # warm the cache
    assert bus.remove(0x10) is dev
    assert bus.read(0x10, 1) is None
    with pytest.raises(KeyError):
        bus.remove(0x10)


# -- serial ---------------------------------------------------------------------------------------
class Uart:
    """A Serial16550 on a port bus at 0x3f8, with its output and irq line recorded."""

    BASE = 0x3F8

    def __init__(self):
        self.out = bytearray()
        self.lines = []
        self.dev = Serial16550(self.out.extend, self.lines.append)
        self.bus = Bus()
        self.bus.insert(self.BASE, 8, self.dev)

    def inb(self, reg):
        return self.bus.read(self.BASE + reg, 1)[0]

    def outb(self, reg, value):
        assert self.bus.write(self.BASE + reg, bytes([value]))

    @property
    def level(self):
        return self.lines[-1] if self.lines else False


def linux_autoconfig(u: Uart) -> str:
    """The checks of Linux's serial8250 autoconfig()/autoconfig_16550a(), in order."""
    # IER must keep exactly its low four bits
    scratch = u.inb(IER)
    u.outb(IER, 0)
    scratch2 = u.inb(IER) & 0x0F
    u.outb(IER, 0x0F)
    scratch3 = u.inb(IER) & 0x0F
    u.outb(IER, scratch)
    if scratch2 != 0 or scratch3 != 0x0F:
        return "no uart (IER test)"
    save_mcr, save_lcr = u.inb(MCR), u.inb(LCR)
    # loopback: RTS and OUT2 come back as CTS and DCD
    u.outb(MCR, 0x10 | 0x0A)
    status1 = u.inb(MSR) & 0xF0
    u.outb(MCR, save_mcr)
    if status1 != 0x90:
        return "no uart (loopback test)"
    u.outb(LCR, 0xBF)        # EFR access on 16650s
    u.outb(2, 0)             # EFR = 0 (FCR on a 16550)
    u.outb(LCR, 0)
    u.outb(FCR, 0x01)        # enable FIFO
    kind = u.inb(IIR) >> 6
    if kind != 3:
        return {0: "8250/16450", 1: "unknown", 2: "16550 (buggy FIFO)"}[kind]
    # autoconfig_16550a: EFR with DLAB set (ST16C650V1) must read non-zero
    u.outb(LCR, 0x80)
    if u.inb(2) == 0:
        return "16650V1"
    u.outb(LCR, 0xBF)
    if u.inb(2) == 0:
        return "16650V2"
    # NatSemi bank switch: EXCR1 (offset 2 with LCR 0xE0) must not mirror MCR loop
    u.outb(LCR, 0)
    status1 = u.inb(MCR)
    u.outb(LCR, 0xE0)
    status2 = u.inb(2)
    if not ((status2 ^ status1) & 0x10):
        u.outb(LCR, 0)
        u.outb(MCR, status1 ^ 0x10)
        u.outb(LCR, 0xE0)
        status2 = u.inb(2)
        u.outb(LCR, 0)
        u.outb(MCR, status1)
        if (status2 ^ status1) & 0x10:
            return "NS16550A"
    # TI16750: 64-byte FIFO bit 5 of IIR
    u.outb(LCR, 0)
    u.outb(FCR, 0x01 | 0x20)
    status1 = u.inb(IIR) >> 5
    u.outb(FCR, 0x01)
    u.outb(LCR, 0x80)
    u.outb(FCR, 0x01 | 0x20)
    status2 = u.inb(IIR) >> 5
    u.outb(FCR, 0x01)
    u.outb(LCR, 0)
    if status1 == 6 and status2 == 7:
        return "16750"
    # XScale UUE bit (IER bit 6) must not stick
    iersave = u.inb(IER)
    u.outb(IER, iersave & ~0x40)
    if not u.inb(IER) & 0x40:
        u.outb(IER, iersave | 0x40)
        if u.inb(IER) & 0x40:
            return "XScale"
    u.outb(IER, iersave)
    # reset, as autoconfig() ends
    u.outb(LCR, save_lcr)
    u.outb(MCR, save_mcr)
    u.outb(FCR, 0x01)
    u.outb(FCR, 0x01 | 0x02 | 0x04)
    u.outb(FCR, 0)
    u.inb(RBR)
    u.outb(IER, 0)
    return "16550A"


def test_linux_autoconfig_finds_a_16550a():
    u = Uart()
    assert linux_autoconfig(u) == "16550A"
    assert u.out == b""          # nothing was transmitted during the probe
    assert u.level is False


def test_linux_startup_thre_test():
    """serial8250_do_startup: THRE must be re-asserted each time IER.THRI is set."""
    u = Uart()
    u.outb(LCR, 0x03)
    u.outb(IER, 0x02)
    assert u.level
    assert u.inb(IIR) & 0x0F == 0x02   # THRE pending at once
    u.outb(IER, 0)
    assert not u.level
    u.outb(IER, 0x02)
    iir = u.inb(IIR)
    u.outb(IER, 0)
    assert not iir & 0x01, "a UART_BUG_THRE uart would be detected"
    assert u.inb(LSR) & 0x60 == 0x60


def test_scratch_and_divisor_latch():
    u = Uart()
    u.outb(SCR, 0x5A)
    assert u.inb(SCR) == 0x5A
    u.outb(IER, 0x05)
    u.outb(LCR, 0x83)                 # DLAB + 8N1
    u.outb(DLL, 0x01)
    u.outb(DLM, 0x02)
    assert (u.inb(DLL), u.inb(DLM)) == (0x01, 0x02)
    u.outb(LCR, 0x03)
    assert u.inb(IER) == 0x05         # IER was not touched by the DLM write
    assert u.inb(LCR) == 0x03
    u.outb(THR, ord("x"))
    assert u.out == b"x"              # and DLL writes were not transmitted


def test_fifo_enable_shows_in_iir_top_bits():
    u = Uart()
    assert u.inb(IIR) == 0x01
    u.outb(FCR, 0x01)
    assert u.inb(IIR) == 0xC1
    u.outb(FCR, 0x00)
    assert u.inb(IIR) == 0x01


def test_transmit_goes_out_at_once_and_keeps_lsr_empty():
    u = Uart()
    for c in b"hello\n":
        assert u.inb(LSR) & 0x20
        u.outb(THR, c)
    assert u.out == b"hello\n"
    assert u.inb(LSR) & 0x61 == 0x60   # THRE + TEMT, no data
    assert u.lines == []               # no interrupts enabled, no line changes


def test_thre_interrupt_transitions():
    u = Uart()
    u.outb(IER, 0x02)
    assert u.lines == [True]
    assert u.inb(IIR) == 0x02
    assert u.lines == [True, False]    # reading IIR acknowledged THRE
    assert u.inb(IIR) == 0x01
    u.outb(THR, ord("a"))              # the byte left: THR empty again
    assert u.lines == [True, False, True]
    u.outb(IER, 0)
    assert u.lines == [True, False, True, False]


def test_receive_interrupt_has_priority_over_thre():
    u = Uart()
    u.outb(FCR, 0x07)
    u.outb(IER, 0x03)
    assert u.lines == [True]
    u.dev.enqueue_input(b"ab")
    assert u.inb(IIR) == 0xC4          # data available beats THR empty
    assert u.inb(LSR) & 0x01
    assert u.inb(RBR) == ord("a")
    assert u.inb(RBR) == ord("b")
    assert not u.inb(LSR) & 0x01
    assert u.inb(IIR) == 0xC2          # now THRE, acknowledged by this read
    assert u.inb(IIR) == 0xC1
    assert u.lines == [True, False]


def test_receive_line_level_follows_the_fifo():
    u = Uart()
    u.outb(IER, 0x01)
    assert u.lines == []
    u.dev.enqueue_input(b"z")
    assert u.lines == [True]
    assert u.inb(RBR) == ord("z")
    assert u.lines == [True, False]
    assert u.inb(RBR) == 0             # empty FIFO reads 0, no line change
    assert u.lines == [True, False]


def test_pasted_input_waits_in_the_backlog():
    u = Uart()
    u.outb(FCR, 0x01)
    text = bytes(range(32, 127)) * 40   # 3800 bytes: far more than the FIFO
    assert u.dev.enqueue_input(text) == len(text)
    assert len(u.dev.rx) == FIFO_SIZE
    got = bytearray()
    while u.inb(LSR) & 0x01:
        got.append(u.inb(RBR))
    assert bytes(got) == text
    assert u.dev.pending_input() == 0


def test_backlog_is_bounded():
    u = Uart()
    assert u.dev.enqueue_input(bytes(BACKLOG_SIZE + 100)) == BACKLOG_SIZE
    assert u.dev.pending_input() == BACKLOG_SIZE
    assert u.dev.enqueue_input(b"more") == 0


def test_fifo_off_holds_one_byte():
    u = Uart()
    u.dev.enqueue_input(b"xyz")
    assert len(u.dev.rx) == 1
    assert bytes(u.inb(RBR) for _ in range(3)) == b"xyz"


def test_loopback_reflects_mcr_in_msr_and_loops_data():
    u = Uart()
    assert u.inb(MSR) & 0xF0 == 0xB0   # DCD, DSR, CTS: a connected line
    u.outb(MCR, 0x10)
    assert u.inb(MSR) & 0xF0 == 0x00
    for bit, msr in [(0x01, 0x20), (0x02, 0x10), (0x04, 0x40), (0x08, 0x80)]:
        u.outb(MCR, 0x10 | bit)
        assert u.inb(MSR) & 0xF0 == msr
    u.outb(MCR, 0x10 | 0x04)
    assert u.inb(MSR) == 0x40 | 0x08   # RI on; DCD changed
    assert u.inb(MSR) == 0x40          # delta bits clear on read
    u.outb(MCR, 0x10)
    assert u.inb(MSR) == 0x04          # trailing edge of RI
    u.outb(FCR, 0x01)
    u.dev.enqueue_input(b"host")       # the wire is disconnected in loopback
    for c in b"loop":
        u.outb(THR, c)
    assert u.out == b""
    assert bytes(u.inb(RBR) for _ in range(4)) == b"loop"
    assert not u.inb(LSR) & 0x01
    u.outb(MCR, 0x0B)                  # loopback off: the host input arrives
    assert bytes(u.inb(RBR) for _ in range(4)) == b"host"


def test_loopback_overrun_sets_oe_and_line_status_interrupt():
    u = Uart()
    u.outb(MCR, 0x10)
    u.outb(IER, 0x04)
    u.outb(THR, 1)
    assert u.lines == []
    u.outb(THR, 2)                     # FIFOs off: second byte overruns
    assert u.lines == [True]
    assert u.inb(IIR) == 0x06
    assert u.inb(LSR) & 0x03 == 0x03
    assert u.lines == [True, False]    # reading LSR cleared OE
    assert u.inb(LSR) & 0x02 == 0
    assert u.inb(RBR) == 1


def test_modem_status_interrupt():
    u = Uart()
    u.outb(IER, 0x08)
    u.outb(MCR, 0x10 | 0x02)           # loopback with RTS: CTS stays, DSR and DCD drop
    assert u.lines == [True]
    assert u.inb(IIR) == 0x00
    assert u.inb(MSR) == 0x10 | 0x0A
    assert u.lines == [True, False]


def test_wide_access_reads_consecutive_registers():
    u = Uart()
    u.outb(LCR, 0x03)
    u.outb(MCR, 0x0B)
    assert u.bus.read(Uart.BASE + LCR, 2) == b"\x03\x0b"
    u.bus.write(Uart.BASE + SCR - 1, b"\x00\x42")   # MSR is read-only, SCR takes 0x42
    assert u.inb(SCR) == 0x42


def test_state_round_trips_exactly():
    u = Uart()
    u.outb(LCR, 0x83)
    u.outb(DLL, 3)
    u.outb(LCR, 0x1B)
    u.outb(FCR, 0x81)
    u.outb(SCR, 0x77)
    u.outb(IER, 0x0F)
    u.outb(MCR, 0x0B)
    u.dev.enqueue_input(bytes(range(40)))
    assert u.inb(RBR) == 0
    state = u.dev.state()
    assert all(type(v) in (int, bytes) for v in state.values())
    again = loads(dumps({"serial": state}))["serial"]
    v = Uart()
    v.dev.set_state(again)
    assert v.dev.state() == state
    assert v.lines == []               # the line level is the irqchip's business
    # and the copy behaves like the original from here on
    for uart in (u, v):
        uart.trace = [uart.inb(IIR), uart.inb(LSR), uart.inb(MSR)]
        uart.trace += [uart.inb(RBR) for _ in range(39)]
        uart.outb(THR, ord("!"))
    assert u.trace == v.trace
    assert u.trace[3:] == list(range(1, 40))
    assert v.out == b"!"
    assert u.dev.state() == v.dev.state()


def test_set_state_refuses_garbage():
    u = Uart()
    good = u.dev.state()
    for bad in [None, {}, dict(good, lcr=256), dict(good, ier="1"), dict(good, rx="abc"),
                dict(good, rx=bytes(FIFO_SIZE + 1)), dict(good, ier=True)]:
        with pytest.raises(StateError):
            u.dev.set_state(bad)


def test_concurrent_input_and_guest_reads():
    u = Uart()
    u.outb(FCR, 0x01)
    u.outb(IER, 0x01)
    data = bytes(i % 251 for i in range(20000))

    def feed():
        for i in range(0, len(data), 97):
            while u.dev.pending_input() > 4096:
                pass
            u.dev.enqueue_input(data[i:i + 97])

    t = threading.Thread(target=feed)
    t.start()
    got = bytearray()
    while len(got) < len(data):
        if u.inb(LSR) & 0x01:
            got.append(u.inb(RBR))
    t.join()
    assert bytes(got) == data
    assert u.level is False


# -- debug exit ------------------------------------------------------------------------------------
def test_debug_exit_reports_the_value_written():
    codes = []
    bus = Bus()
    dev = DebugExit(codes.append)
    bus.insert(0xF4, 4, dev)
    bus.write(0xF4, b"\x00")
    bus.write(0xF4, b"\x2a")
    bus.write(0xF4, (0x1234).to_bytes(2, "little"))
    bus.write(0xF4, (0xDEADBEEF).to_bytes(4, "little"))
    bus.write(0xF5, b"\x07")
    assert codes == [0, 42, 0x1234, 0xDEADBEEF, 7]
    assert bus.read(0xF4, 4) == bytes(4)


def test_uart_fast_path_is_published_only_while_side_effect_free():
    """The C fast path (LSR reads, THR writes) is on only while those two accesses
    change nothing but the output; the model republishes on every change."""
    from vmm.kvm.ffi import ffi
    out = []
    s = Serial16550(out.append, lambda level: None)
    fast = ffi.new("struct pyvmm_uart_fast *", {"base": 0x3F8, "out_fd": 1})
    s.attach_fast_path(fast)
    assert fast.enabled == 1 and fast.lsr == 0x60            # THRE | TEMT
    s.write(LCR, b"\x80")                                     # DLAB: THR is DLL now
    assert fast.enabled == 0
    s.write(LCR, b"\x03")
    assert fast.enabled == 1
    s.write(IER, b"\x02")                                     # THR-empty interrupt wanted
    assert fast.enabled == 0
    s.write(IER, b"\x00")
    s.write(MCR, b"\x10")                                     # loopback: THR feeds RBR
    assert fast.enabled == 0
    for _ in range(3):
        s.write(THR, b"x")                                    # FIFO off: 1 byte, then overrun
    s.write(MCR, b"\x00")
    assert fast.enabled == 0 and fast.lsr & 0x02              # OE pending: Python reads LSR
    s.read(LSR, 1)
    assert fast.enabled == 1
    s.read(RBR, 1)
    s.enqueue_input(b"y")                                     # host input: DR is published
    assert fast.enabled == 1 and fast.lsr & 0x01
    assert s.read(RBR, 1) == b"y" and not fast.lsr & 0x01
