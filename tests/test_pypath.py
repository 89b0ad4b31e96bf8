"""The Python data path against rings laid out in real guest RAM and a datagram socketpair.

A SOCK_DGRAM socketpair behaves like a tap for the data path: one writev is
one frame, one readv reads one frame.  The test plays the guest driver.
"""

import os
import select
import socket
import struct
import threading
import time

import pytest

from vmm.errors import DeviceError
from vmm.memory import GuestMemory, MiB
from vmm.net.pypath import F_EVENT_IDX, F_INDIRECT_DESC, F_MRG_RXBUF, PyNetBackend

VERSION_1 = 1 << 32
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
NUM = 16
HDR = 12


class Queue:
    """The driver's side of one split ring in guest RAM."""

    def __init__(self, mem, base):
        self.mem, self.desc, self.avail, self.used = mem, base, base + 0x1000, base + 0x2000
        self.free = list(range(NUM))
        self.avail_idx = 0
        self.used_seen = 0

    def add(self, bufs, *, indirect_at=None):
        """bufs: list of (gpa, len, writable). Returns the head."""
        if indirect_at is not None:
            for i, (gpa, ln, w) in enumerate(bufs):
                flags = (F_WRITE if w else 0) | (F_NEXT if i + 1 < len(bufs) else 0)
                self.mem.write(indirect_at + 16 * i, struct.pack("<QIHH", gpa, ln, flags, i + 1))
            head = self.free.pop(0)
            self.write_desc(head, indirect_at, 16 * len(bufs), F_INDIRECT, 0)
        else:
            ids = [self.free.pop(0) for _ in bufs]
            for i, (gpa, ln, w) in enumerate(bufs):
                flags = (F_WRITE if w else 0) | (F_NEXT if i + 1 < len(bufs) else 0)
                self.write_desc(ids[i], gpa, ln, flags, ids[i + 1] if i + 1 < len(bufs) else 0)
            head = ids[0]
        self.publish(head)
        return head

    def write_desc(self, i, gpa, ln, flags, nxt):
        self.mem.write(self.desc + 16 * i, struct.pack("<QIHH", gpa, ln, flags, nxt))

    def publish(self, head):
        self.mem.write(self.avail + 4 + 2 * (self.avail_idx % NUM), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write(self.avail + 2, struct.pack("<H", self.avail_idx))

    def used_idx(self):
        return struct.unpack("<H", self.mem.read(self.used + 2, 2))[0]

    def wait_used(self, count, timeout=3.0):
        end = time.monotonic() + timeout
        while (self.used_idx() - self.used_seen) & 0xFFFF < count:
            assert time.monotonic() < end, "device did not use the buffers"
            time.sleep(0.005)
        out = []
        for _ in range(count):
            out.append(struct.unpack("<II", self.mem.read(self.used + 4 + 8 * (self.used_seen % NUM), 8)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out

    def avail_event(self):
        return struct.unpack("<H", self.mem.read(self.used + 4 + 8 * NUM, 2))[0]


class Rig:
    def __init__(self, mem, features, *, use_mem=True, bases=(0, 0)):
        self.mem = mem
        self.rx, self.tx = Queue(mem, 0x10000), Queue(mem, 0x20000)
        self.kicks = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2)]
        self.call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.dev_sock, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.dev_sock.setblocking(False)
        self.peer.settimeout(3)
        self.backend = PyNetBackend(mem if use_mem else None)
        self.features = features
        self.configure(bases)

    def configure(self, bases):
        b = self.backend
        b.set_owner()
        b.set_mem_table([(r.gpa, r.size, self.mem.host_base + r.offset) for r in self.mem.regions])
        b.set_features(self.features)
        for q, ring in enumerate((self.rx, self.tx)):
            b.set_vring_num(q, NUM)
            b.set_vring_addr(q, ring.desc, ring.avail, ring.used)
            b.set_vring_base(q, bases[q])
            b.set_vring_kick(q, self.kicks[q])
            b.set_vring_call(q, self.call)
        b.set_backend(self.dev_sock.fileno(), HDR)
        b.start()

    def kick(self, q):
        os.eventfd_write(self.kicks[q], 1)

    def wait_call(self, timeout=3.0):
        r, _, _ = select.select([self.call], [], [], timeout)
        assert r, "no interrupt"
        return os.eventfd_read(self.call)

    def close(self):
        self.backend.reset_owner()
        for fd in self.kicks + [self.call]:
            os.close(fd)
        self.dev_sock.close()
        self.peer.close()


@pytest.fixture
def mem():
    m = GuestMemory(8 * MiB)
    yield m
    m.close()


@pytest.fixture
def rig_factory(mem):
    rigs = []

    def make(features=VERSION_1, **kw):
        rigs.append(Rig(mem, features, **kw))
        return rigs[-1]
    yield make
    for r in rigs:
        r.close()
    assert not [t for t in threading.enumerate() if t.name == "pyvmm-net"]


def frame(n, seed=1):
    return bytes(HDR) + bytes((seed + i) % 251 for i in range(n))


def test_tx(rig_factory, mem):
    rig = rig_factory()
    pkt = frame(300)
    mem.write(0x100000, pkt[:100])
    mem.write(0x200000, pkt[100:])
    head = rig.tx.add([(0x100000, 100, False), (0x200000, len(pkt) - 100, False)])
    rig.kick(1)
    assert rig.peer.recv(4096) == pkt
    assert rig.tx.wait_used(1) == [(head, 0)]
    rig.wait_call()
    assert rig.backend.isr_read() & 1
    rig.backend.isr_ack(1)
    assert rig.backend.isr_read() == 0
    st = rig.backend.stats()
    assert st["tx_packets"] == 1 and st["tx_bytes"] == 300
    assert rig.backend.error() is None


def test_tx_indirect(rig_factory, mem):
    rig = rig_factory(VERSION_1 | 1 << F_INDIRECT_DESC)
    pkt = frame(64, seed=7)
    mem.write(0x100000, pkt)
    rig.tx.add([(0x100000, HDR, False), (0x100000 + HDR, 64, False)], indirect_at=0x300000)
    rig.kick(1)
    assert rig.peer.recv(4096) == pkt
    rig.tx.wait_used(1)


def test_tx_many_then_vring_base(rig_factory, mem):
    rig = rig_factory()
    for i in range(40):  # more than the ring holds: reuse descriptors as they come back
        mem.write(0x100000, frame(50, seed=i))
        rig.tx.add([(0x100000, HDR + 50, False)])
        rig.kick(1)
        assert rig.peer.recv(4096) == frame(50, seed=i)
        ((head, _),) = rig.tx.wait_used(1)
        rig.tx.free.append(head)
    rig.backend.stop()
    assert rig.backend.get_vring_base(1) == 40
    assert rig.backend.get_vring_base(0) == 0


def test_rx(rig_factory, mem):
    rig = rig_factory()
    heads = [rig.rx.add([(0x400000 + i * 0x1000, 2048, True)]) for i in range(2)]
    rig.kick(0)
    pkt = frame(500, seed=3)
    rig.peer.send(pkt)
    ((head, length),) = rig.rx.wait_used(1)
    assert (head, length) == (heads[0], len(pkt))
    got = mem.read(0x400000, length)
    assert got[HDR:] == pkt[HDR:]
    assert struct.unpack_from("<H", got, 10)[0] == 1  # num_buffers
    assert rig.backend.stats()["rx_packets"] == 1


def test_rx_waits_for_buffers(rig_factory, mem):
    rig = rig_factory()
    rig.peer.send(frame(100))
    time.sleep(0.05)
    assert rig.rx.used_idx() == 0
    rig.rx.add([(0x400000, 2048, True)])
    rig.kick(0)
    assert rig.rx.wait_used(1)[0][1] == HDR + 100


def test_rx_mergeable(rig_factory, mem):
    rig = rig_factory(VERSION_1 | 1 << F_MRG_RXBUF)
    heads = [rig.rx.add([(0x400000 + i * 0x1000, 512, True)]) for i in range(14)]
    rig.kick(0)
    pkt = frame(5000 - HDR, seed=9)  # spills past what the device gathers up front
    rig.peer.send(pkt)
    used = rig.rx.wait_used(10)
    assert [h for h, _ in used] == heads[:10]
    assert [ln for _, ln in used] == [512] * 9 + [5000 - 9 * 512]
    got = b"".join(mem.read(0x400000 + i * 0x1000, ln) for i, (_, ln) in enumerate(used))
    assert got[HDR:] == pkt[HDR:]
    assert struct.unpack_from("<H", got, 10)[0] == 10
    # the four buffers left over serve the next frame
    rig.peer.send(frame(20))
    assert rig.rx.wait_used(1) == [(heads[10], HDR + 20)]


def test_rx_too_big_is_dropped(rig_factory, mem):
    rig = rig_factory()
    rig.rx.add([(0x400000, 256, True)])
    rig.kick(0)
    rig.peer.send(frame(1000))
    rig.peer.send(frame(100))
    assert rig.rx.wait_used(1)[0][1] == HDR + 100
    assert rig.backend.stats()["rx_dropped"] == 1


def test_event_idx(rig_factory, mem):
    rig = rig_factory(VERSION_1 | 1 << F_EVENT_IDX)
    # used_event far ahead: the driver does not want an interrupt for this one
    mem.write(rig.tx.avail + 4 + 2 * NUM, struct.pack("<H", 5))
    mem.write(0x100000, frame(10))
    rig.tx.add([(0x100000, HDR + 10, False)])
    rig.kick(1)
    rig.peer.recv(4096)
    rig.tx.wait_used(1)
    time.sleep(0.05)
    with pytest.raises(BlockingIOError):
        os.eventfd_read(rig.call)
    assert rig.tx.avail_event() == 1  # kick me when entry 1 appears


def test_restart_from_saved_base(rig_factory, mem):
    """The CPR sequence: stop, read the base, reset_owner, set it up again from that base."""
    rig = rig_factory()
    for i in range(3):
        mem.write(0x100000 + i * 0x1000, frame(10, seed=i))
        rig.tx.add([(0x100000 + i * 0x1000, HDR + 10, False)])
    rig.kick(1)
    for i in range(3):
        assert rig.peer.recv(4096) == frame(10, seed=i)
    rig.tx.wait_used(3)
    rig.backend.stop()
    bases = [rig.backend.get_vring_base(0), rig.backend.get_vring_base(1)]
    assert bases == [0, 3]
    rig.backend.reset_owner()
    # the guest queued a frame while the device was away
    mem.write(0x180000, frame(10, seed=42))
    rig.tx.add([(0x180000, HDR + 10, False)])
    rig.configure(bases)
    rig.kick(1)
    assert rig.peer.recv(4096) == frame(10, seed=42)
    assert rig.tx.wait_used(1)
    assert rig.backend.stats()["tx_packets"] == 1


def test_host_address_table(rig_factory, mem):
    rig = rig_factory(use_mem=False)
    mem.write(0x100000, frame(33))
    rig.tx.add([(0x100000, HDR + 33, False)])
    rig.kick(1)
    assert rig.peer.recv(4096) == frame(33)


def bad_tx(rig, mem, desc):
    """Queue a hand-made descriptor (list of raw tuples) and expect the device to break."""
    for i, d in enumerate(desc):
        rig.tx.write_desc(i, *d)
    rig.tx.publish(0)
    rig.kick(1)
    assert rig.wait_call() >= 1
    return rig.backend.error()


@pytest.mark.parametrize("desc, why", [
    ([(0x100000, 64, F_NEXT, 0)], "loops"),
    ([(0x100000, 64, F_NEXT, 1), (0x100000, 64, F_NEXT, 0)], "loops"),
    ([(0x7FFFFF0, 64, 0, 0)], "outside guest RAM"),
    ([(0x100000, 0, 0, 0)], "zero-length"),
    ([(0x100000, 64, F_NEXT, NUM + 3)], "outside a 16-entry table"),
    ([(0x100000, 64, F_WRITE, 0)], "device-writable"),
    ([(0x300000, 32, F_INDIRECT, 0)], "without VIRTIO_F_INDIRECT_DESC"),
])
def test_bad_chain_breaks_device(rig_factory, mem, desc, why):
    rig = rig_factory()
    err = bad_tx(rig, mem, desc)
    assert err is not None and why in err
    assert rig.backend.isr_read() & 2
    assert rig.tx.used_idx() == 0
    rig.backend.stop()  # the thread is gone or goes quietly


@pytest.mark.parametrize("desc, why", [
    ([(0x300000, 20, F_INDIRECT, 0)], "indirect table of 20 bytes"),
    ([(0x310000, 16, F_INDIRECT, 0)], "indirect descriptor inside"),
    ([(0x300000, 16, F_INDIRECT | F_NEXT, 1), (0x100000, 64, 0, 0)], "chained to another"),
])
def test_bad_indirect_table(rig_factory, mem, desc, why):
    mem.write(0x310000, struct.pack("<QIHH", 0x300000, 16, F_INDIRECT, 0))  # a nested table
    rig = rig_factory(VERSION_1 | 1 << F_INDIRECT_DESC)
    assert why in bad_tx(rig, mem, desc)


def test_avail_index_running_ahead(rig_factory, mem):
    rig = rig_factory()
    mem.write(rig.tx.avail + 2, struct.pack("<H", NUM + 5))
    rig.kick(1)
    rig.wait_call()
    assert "ahead" in rig.backend.error()


def test_control_errors(mem):
    b = PyNetBackend(mem)
    with pytest.raises(DeviceError, match="set_owner first"):
        b.set_features(0)
    b.set_owner()
    with pytest.raises(DeviceError, match="already has an owner"):
        b.set_owner()
    with pytest.raises(DeviceError, match="no queue 2"):
        b.set_vring_num(2, 16)
    with pytest.raises(DeviceError, match="does not match"):
        b.set_mem_table([(0, 4096, 1234)])
    with pytest.raises(DeviceError, match="before set_mem_table"):
        b.start()
    b.reset_owner()


# -- the whole device: virtio-mmio + VirtioNet + this data path ------------------------------

from vmm import state as state_blob  # noqa: E402
from vmm.devices.virtio_net import VirtioNet  # noqa: E402
from vmm.virtio import ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FEATURES_OK  # noqa: E402
from vmm.virtio import mmio as M  # noqa: E402
from vmm.virtio.mmio import VirtioMmio  # noqa: E402


class FakeVm:
    def __init__(self):
        self.ioeventfds, self.irqfds = {}, {}

    def add_ioeventfd(self, addr, length, fd, datamatch=None):
        self.ioeventfds[datamatch] = fd

    def remove_ioeventfd(self, addr, length, fd, datamatch=None):
        del self.ioeventfds[datamatch]

    def add_irqfd(self, fd, gsi):
        self.irqfds[gsi] = fd

    def remove_irqfd(self, fd, gsi):
        del self.irqfds[gsi]


class SocketTap:
    """A datagram socket standing in for a Tap."""

    def __init__(self, sock):
        self.sock, self.fd, self.offloads, self.up = sock, sock.fileno(), None, True

    def set_offloads(self, features):
        self.offloads = features

    def link_up(self):
        return self.up


def wr(t, off, value):
    t.write(off, struct.pack("<I", value))


def rd(t, off):
    return struct.unpack("<I", t.read(off, 4))[0]


def driver_bring_up(t, rx, tx, features):
    wr(t, M.STATUS, ACKNOWLEDGE | DRIVER)
    for sel in (0, 1):
        wr(t, M.DEVICE_FEATURES_SEL, sel)
        offered = rd(t, M.DEVICE_FEATURES)
        wr(t, M.DRIVER_FEATURES_SEL, sel)
        wr(t, M.DRIVER_FEATURES, offered & (features >> 32 * sel))
    wr(t, M.STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK)
    assert rd(t, M.STATUS) & FEATURES_OK
    for i, q in enumerate((rx, tx)):
        wr(t, M.QUEUE_SEL, i)
        wr(t, M.QUEUE_NUM, NUM)
        wr(t, M.QUEUE_DESC_LOW, q.desc)
        wr(t, M.QUEUE_DRIVER_LOW, q.avail)
        wr(t, M.QUEUE_DEVICE_LOW, q.used)
        wr(t, M.QUEUE_READY, 1)
    wr(t, M.STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)


def test_virtio_net_end_to_end_with_live_update(mem):
    a, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)
    peer.settimeout(3)
    mac = bytes.fromhex("525400123456")
    rx, tx = Queue(mem, 0x10000), Queue(mem, 0x20000)
    net = VirtioNet(SocketTap(a), mac, lambda: PyNetBackend(mem))
    t = VirtioMmio(net, 0xD000_0000, 5, FakeVm(), mem)
    new_t = None
    try:
        assert t.read(M.CONFIG, 8) == mac + b"\x01\x00"
        feats = VERSION_1 | 1 << 5 | 1 << 16 | 1 << F_MRG_RXBUF | 1 << F_EVENT_IDX | 0b11
        driver_bring_up(t, rx, tx, feats)
        assert net.tap.offloads == feats
        assert rd(t, M.STATUS) == ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK

        mem.write(0x100000, frame(40))
        tx.add([(0x100000, HDR + 40, False)])
        wr(t, M.QUEUE_NOTIFY, 1)
        assert peer.recv(4096) == frame(40)
        tx.wait_used(1)
        assert rd(t, M.INTERRUPT_STATUS) & 1
        wr(t, M.INTERRUPT_ACK, 1)

        rx.add([(0x400000, 2048, True)])
        wr(t, M.QUEUE_NOTIFY, 0)
        peer.send(frame(70))
        assert rx.wait_used(1)[0][1] == HDR + 70

        # -- live update: old side
        assert net.quiesce() == [1, 1]
        saved = state_blob.loads(state_blob.dumps({"net": t.state()}))["net"]
        net.release()
        t.close()
        assert saved["device"]["queues"][1]["last_avail_idx"] == 1
        # the guest queues a frame while no VMM is looking
        mem.write(0x110000, frame(41))
        tx.add([(0x110000, HDR + 41, False)])

        # -- new side: same RAM, same "tap" fd, new eventfds
        net2 = VirtioNet(SocketTap(a), None, lambda: PyNetBackend(mem))
        new_t = VirtioMmio(net2, 0xD000_0000, 5, FakeVm(), mem)
        new_t.set_state(saved)
        assert net2.mac == mac
        assert peer.recv(4096) == frame(41)  # replayed kick found it
        assert tx.wait_used(1)
        assert new_t.state()["status"] == saved["status"]

        # a broken chain shows up as DEVICE_NEEDS_RESET; a reset brings the device back
        tx.write_desc(0, 0x100000, 64, 1, 0)
        tx.publish(0)
        wr(new_t, M.QUEUE_NOTIFY, 1)
        end = time.monotonic() + 3
        while not rd(new_t, M.STATUS) & DEVICE_NEEDS_RESET:
            assert time.monotonic() < end
            time.sleep(0.01)
        wr(new_t, M.STATUS, 0)
        assert rd(new_t, M.STATUS) == 0
        assert net2.tap.offloads == 0
    finally:
        if new_t is not None:
            new_t.reset()
        t.reset()
        a.close()
        peer.close()
    assert not [th for th in threading.enumerate() if th.name == "pyvmm-net"]


def test_virtio_net_refuses_inconsistent_offloads(mem):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        net = VirtioNet(SocketTap(a), None, PyNetBackend)
        assert not net.ack_features(VERSION_1 | 1 << 7)      # GUEST_TSO4 without GUEST_CSUM
        assert not net.ack_features(VERSION_1 | 1 << 13 | 1)  # HOST_ECN without HOST_TSO
        assert net.ack_features(VERSION_1 | 1 << 7 | 1 << 1)
        assert not net.features & 1 << 5  # no MAC given: the guest picks one
        with pytest.raises(DeviceError, match="6 bytes"):
            VirtioNet(SocketTap(a), b"\x01\x02", PyNetBackend)
    finally:
        a.close()
        b.close()
