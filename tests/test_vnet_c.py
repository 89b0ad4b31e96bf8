"""The C virtio-net data path (csrc/vnet.c) driven by a minimal Python "driver".

The guest is a real memfd (GuestMemory) with split rings laid out by hand; the
tap is a SOCK_DGRAM socketpair (one datagram = one frame, header included),
plus one test on a real tap in a private network namespace.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

try:
    from vmm.net import _vnet  # noqa: F401
except ImportError:
    subprocess.run([sys.executable, str(ROOT / "vmm/net/_build_vnet.py")], check=True,
                   cwd=ROOT, stdout=subprocess.DEVNULL)

from vmm.errors import DeviceError  # noqa: E402
from vmm.memory import GuestMemory  # noqa: E402
from vmm.net.cpath import CNetBackend, RX, TX  # noqa: E402

F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
MRG_RXBUF, GUEST_TSO4 = 1 << 15, 1 << 7
INDIRECT_DESC, EVENT_IDX, VERSION_1 = 1 << 28, 1 << 29, 1 << 32
HDR = 12
MEM_SIZE = 16 << 20
RING_BASE = {RX: 0x10000, TX: 0x20000}
BUF_BASE = {RX: 0x100000, TX: 0x400000}
TABLE_BASE = 0x30000  # indirect tables


def hdr(num_buffers=0):
    return bytes(10) + struct.pack("<H", num_buffers)


class Queue:
    """The driver's side of one split virtqueue in guest memory."""

    def __init__(self, mem: GuestMemory, q: int, num: int):
        self.mem, self.q, self.num = mem, q, num
        self.desc = RING_BASE[q]
        self.avail = self.desc + 16 * num
        self.used = (self.avail + 6 + 2 * num + 4095) & ~4095
        mem.write(self.desc, bytes(self.used + 6 + 8 * num - self.desc))
        self.avail_idx = 0
        self.used_seen = 0
        self.free = list(range(num))
        self.chains: dict[int, list[int]] = {}
        self.next_buf = BUF_BASE[q]

    # descriptors and buffers
    def put_desc(self, i, addr, length, flags=0, nxt=0, table=None):
        self.mem.write((table if table is not None else self.desc) + 16 * i,
                       struct.pack("<QIHH", addr, length, flags, nxt))

    def buf(self, data_or_len) -> tuple[int, int]:
        """Carve a buffer out of the queue's buffer area (wrapping around)."""
        n = data_or_len if isinstance(data_or_len, int) else len(data_or_len)
        if self.next_buf + n > BUF_BASE[self.q] + 0x200000:
            self.next_buf = BUF_BASE[self.q]
        addr = self.next_buf
        self.next_buf = (addr + n + 63) & ~63
        if not isinstance(data_or_len, int):
            self.mem.write(addr, data_or_len)
        return addr, n

    def add(self, segs, publish=True) -> int:
        """segs: [(addr, len, flags)]; links them with NEXT and makes the chain available."""
        idx = [self.free.pop(0) for _ in segs]
        for k, (addr, length, flags) in enumerate(segs):
            last = k == len(segs) - 1
            self.put_desc(idx[k], addr, length, flags | (0 if last else F_NEXT),
                          0 if last else idx[k + 1])
        self.chains[idx[0]] = idx
        if publish:
            self.publish(idx[0])
        return idx[0]

    def publish(self, head):
        self.mem.write(self.avail + 4 + 2 * (self.avail_idx % self.num), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write(self.avail + 2, struct.pack("<H", self.avail_idx))

    # used ring
    def used_idx(self) -> int:
        return struct.unpack("<H", self.mem.read(self.used + 2, 2))[0]

    def get_used(self) -> list[tuple[int, int]]:
        out = []
        end = self.used_idx()
        while self.used_seen != end:
            e = self.used + 4 + 8 * (self.used_seen % self.num)
            head, length = struct.unpack("<II", self.mem.read(e, 8))
            out.append((head, length))
            self.free.extend(self.chains.pop(head))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out

    def set_used_event(self, v):
        self.mem.write(self.avail + 4 + 2 * self.num, struct.pack("<H", v))

    def avail_event(self) -> int:
        return struct.unpack("<H", self.mem.read(self.used + 4 + 8 * self.num, 2))[0]

    def set_avail_flags(self, v):
        self.mem.write(self.avail, struct.pack("<H", v))


class Rig:
    """Guest memory, two queues, a socketpair tap, eventfds, and a CNetBackend."""

    def __init__(self, features=VERSION_1, num=256, regions=None):
        self.mem = GuestMemory(MEM_SIZE)
        self.features = features
        self.rxq, self.txq = Queue(self.mem, RX, num), Queue(self.mem, TX, num)
        self.dev_sock, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for s in (self.dev_sock, self.peer):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.peer.settimeout(5)
        self.kick = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2)]
        self.call = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2)]
        self.regions = regions or [(r.gpa, r.size, self.mem.host_base + r.offset)
                                   for r in self.mem.regions]
        self.dev = self.new_device()

    def new_device(self, base=None) -> CNetBackend:
        d = CNetBackend()
        d.set_owner()
        d.set_mem_table(self.regions)
        d.set_features(self.features)
        for q, vq in ((RX, self.rxq), (TX, self.txq)):
            d.set_vring_num(q, vq.num)
            d.set_vring_addr(q, vq.desc, vq.avail, vq.used)
            if base is not None:
                d.set_vring_base(q, base[q])
            d.set_vring_kick(q, self.kick[q])
            d.set_vring_call(q, self.call[q])
        d.set_backend(self.dev_sock.fileno(), HDR)
        return d

    def kick_q(self, q):
        os.eventfd_write(self.kick[q], 1)

    def calls(self, q) -> int:
        try:
            return os.eventfd_read(self.call[q])
        except BlockingIOError:
            return 0

    def close(self):
        self.dev.close()
        for fd in self.kick + self.call:
            os.close(fd)
        self.dev_sock.close()
        self.peer.close()
        self.mem.close()


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()


def wait_for(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.001)
    return cond()


def frame(i: int, size: int = 100) -> bytes:
    body = struct.pack("<I", i) + bytes((i + k) & 0xFF for k in range(size - 4))
    return hdr() + body


# -- TX -------------------------------------------------------------------------------
def test_tx_one_packet(rig):
    pkt = frame(1, 200)
    h = rig.txq.add([(*rig.txq.buf(pkt[:HDR]), 0), (*rig.txq.buf(pkt[HDR:]), 0)])
    rig.dev.start()
    rig.kick_q(TX)
    assert rig.peer.recv(70000) == pkt
    assert wait_for(lambda: rig.txq.used_idx() == 1)
    assert rig.txq.get_used() == [(h, 0)]
    assert wait_for(lambda: rig.dev.isr_read() & 1)
    assert rig.calls(TX) >= 1
    rig.dev.stop()
    st = rig.dev.stats()
    # (no claim on "kicks": a started device looks at its rings once anyway, so it may
    # send the frame before it reads the kick)
    assert st["tx_packets"] == 1 and st["tx_bytes"] == 200
    assert rig.dev.error() is None


def test_tx_many_packets_recycled(rig):
    rig.dev.start()
    total, sent, got = 2000, 0, []
    reader = threading.Thread(target=lambda: [got.append(rig.peer.recv(70000))
                                              for _ in range(total)])
    reader.start()
    while sent < total:
        rig.txq.get_used()
        while sent < total and rig.txq.free:
            rig.txq.add([(*rig.txq.buf(frame(sent, 60 + sent % 1400)), 0)])
            sent += 1
        rig.kick_q(TX)
        time.sleep(0.0005)
    reader.join(10)
    assert [struct.unpack("<I", p[HDR:HDR + 4])[0] for p in got] == list(range(total))
    assert all(p == frame(i, 60 + i % 1400) for i, p in enumerate(got))
    assert wait_for(lambda: rig.txq.used_idx() == total & 0xFFFF)
    rig.dev.stop()
    assert rig.dev.get_vring_base(TX) == total
    assert rig.dev.stats()["tx_packets"] == total


# -- RX -------------------------------------------------------------------------------
def post_rx(rig, count, size=2048):
    return [rig.rxq.add([(*rig.rxq.buf(size), F_WRITE)]) for _ in range(count)]


def rx_payload(rig, head, length) -> bytes:
    addr = struct.unpack("<Q", rig.mem.read(rig.rxq.desc + 16 * head, 8))[0]
    return rig.mem.read(addr, length)


def test_rx_into_posted_buffers(rig):
    heads = post_rx(rig, 4)
    rig.dev.start()
    pkts = [frame(i, 100 + 300 * i) for i in range(3)]
    for p in pkts:
        rig.peer.send(p)
    assert wait_for(lambda: rig.rxq.used_idx() == 3)
    used = rig.rxq.get_used()
    assert [h for h, _ in used] == heads[:3]
    for (h, length), p in zip(used, pkts):
        assert length == len(p)
        data = rx_payload(rig, h, length)
        assert data[:10] == p[:10] and data[10:12] == struct.pack("<H", 1)
        assert data[HDR:] == p[HDR:]
    assert wait_for(lambda: rig.calls(RX) >= 1)
    rig.dev.stop()
    assert rig.dev.get_vring_base(RX) == 3
    assert rig.dev.stats()["rx_packets"] == 3


def test_rx_waits_for_buffers_without_loss(rig):
    rig.dev.start()
    pkts = [frame(i, 500) for i in range(40)]
    for p in pkts:
        rig.peer.send(p)
    time.sleep(0.1)
    assert rig.rxq.used_idx() == 0
    got = []
    for _ in range(8):                     # 5 buffers at a time, kick each time
        post_rx(rig, 5)
        rig.kick_q(RX)
        assert wait_for(lambda: (rig.rxq.used_idx() - rig.rxq.used_seen) & 0xFFFF == 5)
        got += [rx_payload(rig, h, n)[HDR:] for h, n in rig.rxq.get_used()]
    assert got == [p[HDR:] for p in pkts]
    rig.dev.stop()
    st = rig.dev.stats()
    assert st["rx_dropped"] == 0 and st["rx_packets"] == 40


def test_rx_frame_too_big_for_buffer_is_dropped_and_buffer_reused(rig):
    post_rx(rig, 1, 512)
    rig.dev.start()
    rig.peer.send(frame(0, 1000))
    rig.peer.send(frame(1, 300))
    assert wait_for(lambda: rig.rxq.used_idx() == 1)
    (h, n), = rig.rxq.get_used()
    assert rx_payload(rig, h, n)[HDR:] == frame(1, 300)[HDR:]
    rig.dev.stop()
    assert rig.dev.stats()["rx_dropped"] == 1


@pytest.mark.parametrize("gso", [False, True])
def test_mrg_rxbuf_spans_chains(gso):
    r = Rig(features=VERSION_1 | MRG_RXBUF | (GUEST_TSO4 if gso else 0))
    try:
        heads = post_rx(r, 100, 1024)           # 100 KiB: room for a 64 KiB GSO frame
        r.dev.start()
        big, small = frame(7, 3000 - HDR), frame(8, 100)
        r.peer.send(big)
        r.peer.send(small)
        assert wait_for(lambda: r.rxq.used_idx() == 4)
        used = r.rxq.get_used()
        assert [h for h, _ in used] == heads[:4]
        assert [n for _, n in used] == [1024, 1024, 952, len(small)]
        first = rx_payload(r, heads[0], 1024)
        assert first[10:12] == struct.pack("<H", 3)
        data = b"".join(rx_payload(r, h, n) for h, n in used[:3])
        assert data[HDR:] == big[HDR:]
        assert rx_payload(r, heads[3], len(small))[10:12] == struct.pack("<H", 1)
        r.dev.stop()
        # the chains gathered but not filled were given back
        assert r.dev.get_vring_base(RX) == 4
    finally:
        r.close()


def test_mrg_rxbuf_waits_for_enough_buffers():
    r = Rig(features=VERSION_1 | MRG_RXBUF)
    try:
        post_rx(r, 1, 1024)                     # less than one MTU frame
        r.dev.start()
        r.peer.send(frame(1, 1400))
        time.sleep(0.05)
        assert r.rxq.used_idx() == 0
        post_rx(r, 1, 1024)
        r.kick_q(RX)
        assert wait_for(lambda: r.rxq.used_idx() == 2)
        assert [n for _, n in r.rxq.get_used()] == [1024, 1412 - 1024]
        r.dev.stop()
        assert r.dev.stats()["rx_dropped"] == 0
    finally:
        r.close()


# -- notifications ----------------------------------------------------------------------
def tx_post(rig, i):
    rig.txq.add([(*rig.txq.buf(frame(i)), 0)])


def test_event_idx_interrupt_suppression():
    r = Rig(features=VERSION_1 | EVENT_IDX)
    try:
        r.txq.set_used_event(0)
        tx_post(r, 0)
        r.dev.poll()                     # used 0 -> 1 crosses used_event 0: interrupt
        assert r.calls(TX) == 1
        assert r.txq.avail_event() == 1  # drained: asks for a kick on the next entry
        r.txq.set_used_event(3)
        for i in (1, 2):                 # used -> 2, 3: no interrupt
            tx_post(r, i)
            r.dev.poll()
            assert r.calls(TX) == 0
        tx_post(r, 3)
        r.dev.poll()                     # used -> 4 crosses used_event 3
        assert r.calls(TX) == 1
        tx_post(r, 4)
        tx_post(r, 5)
        r.txq.set_used_event(4)          # a batch crossing the event: one interrupt
        r.dev.poll()
        assert r.calls(TX) == 1
        assert r.txq.avail_event() == 6
        assert r.dev.stats()["interrupts"] == 3
        assert [r.peer.recv(200) for _ in range(6)] == [frame(i) for i in range(6)]
    finally:
        r.close()


def test_no_interrupt_flag_without_event_idx(rig):
    rig.txq.set_avail_flags(1)            # VRING_AVAIL_F_NO_INTERRUPT
    tx_post(rig, 0)
    rig.dev.poll()
    assert rig.calls(TX) == 0 and rig.txq.used_idx() == 1
    rig.txq.set_avail_flags(0)
    tx_post(rig, 1)
    rig.dev.poll()
    assert rig.calls(TX) == 1


def test_event_idx_kicks_wake_the_thread():
    r = Rig(features=VERSION_1 | EVENT_IDX)
    try:
        r.dev.start()
        for i in range(50):
            tx_post(r, i)
            r.kick_q(TX)
            assert wait_for(lambda: r.txq.used_idx() == i + 1)
            assert wait_for(lambda: r.txq.avail_event() == i + 1)
            r.txq.get_used()
        assert [r.peer.recv(200) for _ in range(50)] == [frame(i) for i in range(50)]
    finally:
        r.close()


# -- indirect descriptors -----------------------------------------------------------------
def put_table(mem, base, entries):
    for k, (addr, length, flags, nxt) in enumerate(entries):
        mem.write(base + 16 * k, struct.pack("<QIHH", addr, length, flags, nxt))
    return base, 16 * len(entries)


def test_indirect_tx_and_rx():
    r = Rig(features=VERSION_1 | INDIRECT_DESC)
    try:
        pkt = frame(5, 600)
        parts = [pkt[:HDR], pkt[HDR:300], pkt[300:]]
        segs = [r.txq.buf(p) for p in parts]
        table = put_table(r.mem, TABLE_BASE, [(a, n, F_NEXT, k + 1) for k, (a, n) in
                                               enumerate(segs[:-1])] + [(*segs[-1], 0, 0)])
        h = r.txq.add([(*table, F_INDIRECT)])
        assert r.dev.walk_chain(TX, h) == (3, len(pkt))
        # RX: two writable segments in an indirect table (WRITE on the table is ignored)
        bufs = [r.rxq.buf(HDR), r.rxq.buf(1500)]
        rtable = put_table(r.mem, TABLE_BASE + 0x1000,
                           [(*bufs[0], F_WRITE | F_NEXT, 1), (*bufs[1], F_WRITE, 0)])
        rh = r.rxq.add([(*rtable, F_INDIRECT | F_WRITE)])
        r.peer.send(frame(9, 700))
        r.dev.start()
        r.kick_q(TX)
        assert r.peer.recv(70000) == pkt
        assert wait_for(lambda: r.rxq.used_idx() == 1)
        assert r.rxq.get_used() == [(rh, len(frame(9, 700)))]
        assert r.mem.read(bufs[1][0], 700) == frame(9, 700)[HDR:]
        assert r.mem.read(bufs[0][0] + 10, 2) == struct.pack("<H", 1)
        assert r.dev.error() is None
    finally:
        r.close()


# -- malformed chains -------------------------------------------------------------------------
HALF = MEM_SIZE // 2


def bad_loop(r):
    a, n = r.txq.buf(frame(0))
    r.txq.put_desc(0, a, n, F_NEXT, 1)
    r.txq.put_desc(1, a, n, F_NEXT, 0)
    r.txq.publish(0)


def bad_oob(r):                            # buffer in RAM not in the memory table
    r.txq.add([(HALF + 0x1000, 100, 0)])


def bad_oob_straddle(r):
    r.txq.add([(HALF - 50, 100, 0)])


def bad_oob_wrap(r):                       # gpa + len overflows 64 bits
    r.txq.add([(0xFFFF_FFFF_FFFF_FF00, 0x200, 0)])


def bad_zero_len(r):
    r.txq.add([(*r.txq.buf(HDR), 0), (r.txq.buf(10)[0], 0, 0)])


def bad_too_long(r):
    r.txq.add([(0x400000, 40000, 0), (0x500000, 40000, 0)])


def bad_head(r):
    r.txq.publish(300)


def bad_write_in_tx(r):
    r.txq.add([(*r.txq.buf(100), F_WRITE)])


def bad_next_range(r):
    a, n = r.txq.buf(100)
    r.txq.put_desc(0, a, n, F_NEXT, 999)
    r.txq.publish(0)


def bad_avail_idx(r):
    r.mem.write(r.txq.avail + 2, struct.pack("<H", 1000))


def ind(r, length, addr=TABLE_BASE, flags=F_INDIRECT):
    r.txq.add([(addr, length, flags)])


def bad_ind_len(r):
    put_table(r.mem, TABLE_BASE, [(*r.txq.buf(100), 0, 0)] * 2)
    ind(r, 24)


def bad_ind_zero(r):
    ind(r, 0)


def bad_ind_nested(r):
    put_table(r.mem, TABLE_BASE, [(TABLE_BASE + 0x1000, 16, F_INDIRECT, 0)])
    ind(r, 16)


def bad_ind_oob(r):
    ind(r, 64, addr=HALF - 32)


def bad_ind_loop(r):
    a, n = r.txq.buf(100)
    put_table(r.mem, TABLE_BASE, [(a, n, F_NEXT, 1), (a, n, F_NEXT, 0)])
    ind(r, 32)


def bad_ind_next(r):
    put_table(r.mem, TABLE_BASE, [(*r.txq.buf(100), F_NEXT, 1), (*r.txq.buf(100), F_NEXT, 2)])
    ind(r, 32)


def bad_ind_and_next(r):
    a, n = r.txq.buf(100)
    put_table(r.mem, TABLE_BASE, [(a, n, 0, 0)])
    r.txq.put_desc(0, TABLE_BASE, 16, F_INDIRECT | F_NEXT, 1)
    r.txq.put_desc(1, a, n, 0, 0)
    r.txq.publish(0)


def bad_ind_too_many(r):                  # 1100 one-byte segments > the iovec limit
    a, _ = r.txq.buf(2000)
    put_table(r.mem, TABLE_BASE, [(a + k, 1, F_NEXT, k + 1) for k in range(1099)] +
              [(a, 1, 0, 0)])
    ind(r, 16 * 1100)


BAD_TX = {
    "loop": (bad_loop, "loops"), "oob": (bad_oob, "outside guest memory"),
    "oob_straddle": (bad_oob_straddle, "outside"), "oob_wrap": (bad_oob_wrap, "outside"),
    "zero_len": (bad_zero_len, "zero-length"), "too_long": (bad_too_long, "longer than"),
    "head": (bad_head, "head index 300"), "write_in_tx": (bad_write_in_tx, "write-only"),
    "next_range": (bad_next_range, "out of range"), "avail_idx": (bad_avail_idx, "avail index"),
    "ind_len": (bad_ind_len, "multiple of 16"), "ind_zero": (bad_ind_zero, "multiple of 16"),
    "ind_nested": (bad_ind_nested, "nested"), "ind_oob": (bad_ind_oob, "indirect table"),
    "ind_loop": (bad_ind_loop, "loops"), "ind_next": (bad_ind_next, "out of range"),
    "ind_and_next": (bad_ind_and_next, "INDIRECT and NEXT"),
    "ind_too_many": (bad_ind_too_many, "segments"),
}


def half_rig(features=VERSION_1 | INDIRECT_DESC, num=256):
    """A rig whose memory table covers only the lower half of RAM; the upper half is canary."""
    r = Rig(features=features, num=num)
    r.regions = [(0, HALF, r.mem.host_base)]
    r.dev.close()
    r.dev = r.new_device()
    r.mem.write(HALF, b"\xAA" * HALF)
    return r


@pytest.mark.parametrize("case", sorted(BAD_TX))
def test_bad_tx_chain_breaks_device(case):
    make, expect = BAD_TX[case]
    r = half_rig()
    try:
        make(r)
        before = r.mem.read(0, MEM_SIZE)
        r.dev.start()
        r.kick_q(TX)
        assert wait_for(lambda: r.dev.error() is not None)
        assert expect in r.dev.error(), r.dev.error()
        assert wait_for(lambda: r.dev.isr_read() & 2)
        assert wait_for(lambda: r.calls(TX) >= 1)
        # the thread keeps running, but leaves rings and memory alone
        r.kick_q(TX)
        r.kick_q(RX)
        r.peer.send(frame(1))
        time.sleep(0.02)
        assert r.dev.running()
        r.dev.stop()
        assert r.mem.read(0, MEM_SIZE) == before
        assert r.dev.get_vring_base(TX) == 0 and r.txq.used_idx() == 0
        with pytest.raises(socket.timeout):
            r.peer.settimeout(0.01)
            r.peer.recv(100)
    finally:
        r.close()


@pytest.mark.parametrize("case", ["readonly", "oob", "loop", "head", "small"])
def test_bad_rx_chain_breaks_device(case):
    r = half_rig()
    try:
        q = r.rxq
        if case == "readonly":
            q.add([(*q.buf(2048), 0)])
        elif case == "oob":
            q.add([(HALF + 0x100, 2048, F_WRITE)])
        elif case == "loop":
            a, n = q.buf(64)
            q.put_desc(0, a, n, F_WRITE | F_NEXT, 0)
            q.publish(0)
        elif case == "head":
            q.publish(256)
        else:
            q.add([(*q.buf(4), F_WRITE)])      # cannot even hold the header
        r.peer.send(frame(0))
        before = r.mem.read(0, MEM_SIZE)
        r.dev.start()
        assert wait_for(lambda: r.dev.error() is not None)
        assert r.dev.error().startswith("rx queue: ")
        r.dev.stop()
        assert r.mem.read(0, MEM_SIZE) == before
        assert r.dev.get_vring_base(RX) == 0
        # the frame is still in the "tap"
        assert r.dev_sock.recv(200) == frame(0)
    finally:
        r.close()


def test_walk_chain_reports_without_breaking(rig):
    bad_loop(rig)
    with pytest.raises(DeviceError) as e:
        rig.dev.walk_chain(TX, 0)
    assert e.value.errno == 40  # ELOOP
    with pytest.raises(DeviceError):
        rig.dev.walk_chain(TX, 256)
    assert rig.dev.error() is None


def test_restart_after_error_clears_it_and_redetects():
    r = half_rig()
    try:
        bad_zero_len(r)
        r.dev.start()
        r.kick_q(TX)
        assert wait_for(lambda: r.dev.error() is not None)
        r.dev.stop()
        r.dev.start()
        assert wait_for(lambda: r.dev.error() is not None)
        r.dev.stop()
    finally:
        r.close()


# -- stop / restore (live update) -------------------------------------------------------------
def test_stop_leaves_memory_and_tap_alone(rig):
    post_rx(rig, 8)
    rig.dev.start()
    rig.dev.stop()
    rig.peer.send(frame(0))
    tx_post(rig, 1)
    snap = rig.mem.read(0, MEM_SIZE)
    rig.kick_q(TX)
    rig.kick_q(RX)
    time.sleep(0.05)
    assert rig.mem.read(0, MEM_SIZE) == snap
    assert rig.dev_sock.recv(200) == frame(0)      # still queued: not drained after stop


def test_stop_restore_continues_without_loss_or_duplicates(rig):
    """Swap the backend for a fresh object (as a CPR does) many times under traffic."""
    total_tx, total_rx = 3000, 3000
    got_tx, got_rx = [], []
    stop = threading.Event()

    def sender():                      # the outside world feeding the "tap"
        for i in range(total_rx):
            while True:
                try:
                    rig.peer.send(frame(i, 64 + i % 500))
                    break
                except (BlockingIOError, socket.timeout):
                    time.sleep(0.001)

    def receiver():
        rig.peer.settimeout(0.2)
        while not stop.is_set() or len(got_tx) < total_tx:
            try:
                got_tx.append(rig.peer.recv(70000))
            except socket.timeout:
                if stop.is_set():
                    break

    rig.dev.start()
    threads = [threading.Thread(target=sender), threading.Thread(target=receiver)]
    for t in threads:
        t.start()
    rng = random.Random(1)
    sent = 0
    deadline = time.monotonic() + 30
    swaps = 0
    while (sent < total_tx or len(got_rx) < total_rx) and time.monotonic() < deadline:
        rig.txq.get_used()
        while sent < total_tx and len(rig.txq.free) > 0 and rng.random() < 0.9:
            rig.txq.add([(*rig.txq.buf(frame(sent, 64 + sent % 700)), 0)])
            sent += 1
        rig.kick_q(TX)
        got_rx += [rx_payload(rig, h, n) for h, n in rig.rxq.get_used()]
        if rig.rxq.free:
            post_rx(rig, min(len(rig.rxq.free), rng.randrange(1, 16)), 1600)
            rig.kick_q(RX)
        if rng.random() < 0.05:        # live update: stop, read indices, new object, restore
            rig.dev.stop()
            base = {q: rig.dev.get_vring_base(q) for q in (RX, TX)}
            assert base[TX] == rig.txq.used_idx() and base[RX] == rig.rxq.used_idx()
            rig.dev.close()
            rig.dev = rig.new_device(base)
            rig.dev.start()
            swaps += 1
        time.sleep(0.0002)
    stop.set()
    for t in threads:
        t.join(10)
    assert swaps > 5
    assert [struct.unpack("<I", p[HDR:HDR + 4])[0] for p in got_tx] == list(range(total_tx))
    assert [p[HDR:] for p in got_rx] == [frame(i, 64 + i % 500)[HDR:] for i in range(total_rx)]


# -- ownership and control errors ---------------------------------------------------------------
def test_set_owner_twice_is_ebusy():
    d = CNetBackend()
    with pytest.raises(DeviceError) as e:
        d.set_features(VERSION_1)
    assert e.value.errno == 1          # EPERM: not owned
    d.set_owner()
    with pytest.raises(DeviceError) as e:
        d.set_owner()
    assert e.value.errno == 16         # EBUSY
    assert "busy" in str(e.value)
    d.reset_owner()
    d.set_owner()
    d.close()


def test_control_errors(rig):
    with pytest.raises(DeviceError):
        rig.dev.set_vring_num(RX, 100)           # not a power of two
    with pytest.raises(DeviceError):
        rig.dev.set_vring_num(5, 256)
    with pytest.raises(DeviceError):
        rig.dev.set_vring_addr(TX, 0x1008, 0, 0)  # misaligned descriptor table
    with pytest.raises(DeviceError):
        rig.dev.set_mem_table([(0, 1 << 20, 0x1000), (0x80000, 1 << 20, 0x200000)])  # overlap
    with pytest.raises(DeviceError):
        rig.dev.set_mem_table([(0xFFFF_FFFF_FFFF_0000, 1 << 20, 0x1000)])  # wraps
    with pytest.raises(DeviceError):
        rig.dev.set_features(1 << 34)            # packed ring
    with pytest.raises(DeviceError):
        rig.dev.set_backend(rig.dev_sock.fileno(), 7)
    rig.dev.set_vring_addr(TX, 0xFF0000_0000, 0xFF0001_0000, 0xFF0002_0000)
    with pytest.raises(DeviceError):
        rig.dev.start()                          # rings outside the memory table
    assert not rig.dev.running()
    rig.dev.set_vring_addr(TX, rig.txq.desc, rig.txq.avail, rig.txq.used)
    rig.dev.start()
    with pytest.raises(DeviceError) as e:
        rig.dev.set_vring_num(RX, 128)
    assert e.value.errno == 16
    rig.dev.reset_owner()                        # stops the thread, forgets the fds
    assert not rig.dev.running()
    os.fstat(rig.kick[TX])                       # ... without closing them
    os.fstat(rig.dev_sock.fileno())


# -- a real tap ---------------------------------------------------------------------------------
TAP_SCRIPT = textwrap.dedent(r"""
    import os, socket, struct, subprocess, sys, time
    sys.path.insert(0, sys.argv[1])
    sys.argv[1:] = []
    import test_vnet_c as t
    from vmm.net.tap import Tap

    tap = Tap.create("vnt0")
    run = lambda *a: subprocess.run(a, check=True)
    run("ip", "link", "set", "lo", "up")
    run("ip", "addr", "add", "10.9.0.1/24", "dev", "vnt0")
    run("ip", "link", "set", "vnt0", "up")
    guest_mac = bytes.fromhex("525400123456")
    run("ip", "neigh", "add", "10.9.0.2", "lladdr", "52:54:00:12:34:56", "dev", "vnt0")
    r = t.Rig()
    r.dev.close()
    r.dev_sock.close()
    class S:  # the tap stands in for the socketpair end
        def fileno(self): return tap.fd
        def close(self): pass
    r.dev_sock = S()
    r.dev = r.new_device()
    t.post_rx(r, 16)
    r.dev.start()
    # host -> guest: a UDP datagram to the guest's IP arrives in an RX buffer
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("10.9.0.1", 5555))
    u.sendto(b"hello guest", ("10.9.0.2", 7777))
    assert t.wait_for(lambda: r.rxq.used_idx() >= 1), "no RX"
    found = False
    for h, n in r.rxq.get_used():
        data = t.rx_payload(r, h, n)
        if data[t.HDR:t.HDR + 6] == guest_mac and data.endswith(b"hello guest"):
            found = True
    assert found, "UDP frame not received"
    # guest -> host: a UDP datagram from 10.9.0.2 to the host's socket
    host_mac = bytes.fromhex(open("/sys/class/net/vnt0/address").read().strip().replace(":", ""))
    payload = b"hello host"
    udp = struct.pack("!HHHH", 7777, 5555, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                     socket.inet_aton("10.9.0.2"), socket.inet_aton("10.9.0.1"))
    s = sum(struct.unpack("!10H", ip)); s = (s & 0xFFFF) + (s >> 16); s = (s & 0xFFFF) + (s >> 16)
    ip = ip[:10] + struct.pack("!H", ~s & 0xFFFF) + ip[12:]
    eth = host_mac + guest_mac + b"\x08\x00"
    r.txq.add([(*r.txq.buf(t.hdr() + eth + ip + udp), 0)])
    r.kick_q(t.TX)
    u.settimeout(5)
    data, addr = u.recvfrom(100)
    assert data == payload and addr[0] == "10.9.0.2", (data, addr)
    r.dev.stop()
    assert r.dev.error() is None
    print("TAP-OK", r.dev.stats())
""")


def test_real_tap_in_netns(tmp_path):
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs root and /dev/net/tun to create a tap in a network namespace")
    ns = f"pyvmm-vnet-{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", ns], capture_output=True).returncode:
        pytest.skip("cannot create a network namespace (ip netns add failed)")
    try:
        script = tmp_path / "tap_check.py"
        script.write_text(TAP_SCRIPT)
        env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}")
        p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, str(script),
                            str(ROOT / "tests")], capture_output=True, text=True,
                           timeout=60, env=env, cwd=ROOT)
        assert p.returncode == 0 and "TAP-OK" in p.stdout, p.stdout + p.stderr
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_shared_kick_fd_wakes_both_queues(rig):
    rig.dev.set_vring_kick(TX, rig.kick[RX])
    post_rx(rig, 2)
    rig.dev.start()
    tx_post(rig, 0)
    rig.kick_q(RX)
    assert rig.peer.recv(200) == frame(0)
    rig.peer.send(frame(1))
    assert wait_for(lambda: rig.rxq.used_idx() == 1)
    rig.dev.stop()


def test_mem_table_change_while_running(rig):
    rig.dev.start()
    with pytest.raises(DeviceError):             # would leave the rings unmapped
        rig.dev.set_mem_table([(0, 0x10000, rig.mem.host_base)])
    rig.dev.set_mem_table([(0, HALF, rig.mem.host_base)])
    rig.txq.add([(HALF + 0x100, 100, 0)])        # now outside the table
    rig.kick_q(TX)
    assert wait_for(lambda: rig.dev.error() is not None)
    assert "outside guest memory" in rig.dev.error()
    rig.dev.stop()
