"""The driver's side of virtio-net, for testing a data-path backend without a guest.

One split virtqueue per direction laid out in a real GuestMemory (a memfd, as in
pyvmm), the descriptors and avail entries written by the test, the used entries
read back; a SOCK_DGRAM socketpair stands in for the tap (one datagram is one
frame, vnet header included).  Every backend (vmm/net/backend_c.py, backend_python.py,
backend_vhost.py) is driven through the same vhost-like control API, so one rig serves
them all: tests/test_datapath.py is their conformance suite.
"""

from __future__ import annotations

import os
import socket
import struct
import time

from vmm.memory import GuestMemory
from vmm.net import RX, TX

F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
GUEST_CSUM, GUEST_TSO4, MRG_RXBUF = 1 << 1, 1 << 7, 1 << 15
INDIRECT_DESC, EVENT_IDX, VERSION_1 = 1 << 28, 1 << 29, 1 << 32
AVAIL_F_NO_INTERRUPT = 1
HDR = 12                       # the vnet header with num_buffers (VERSION_1)
MEM_SIZE = 16 << 20
HALF = MEM_SIZE // 2
CTRL = 2                       # virtio-net's control queue (answered by the device model)
RING_BASE = {RX: 0x10000, TX: 0x20000, CTRL: 0x40000}
BUF_BASE = {RX: 0x100000, TX: 0x400000, CTRL: 0x700000}
BUF_AREA = 0x200000            # each queue's buffers, carved out round-robin
TABLE_BASE = 0x30000           # indirect tables


def backend_class(name: str):
    """The data-path backend class called `name` (as in --net ...,backend=NAME)."""
    if name == "c":
        from vmm.net.backend_c import CNetBackend
        return CNetBackend
    if name == "python":
        from vmm.net.backend_python import PyNetBackend
        return PyNetBackend
    from vmm.net.backend_vhost import VhostNetBackend
    return VhostNetBackend


def hdr(num_buffers: int = 0) -> bytes:
    return bytes(10) + struct.pack("<H", num_buffers)


def frame(i: int, size: int = 100) -> bytes:
    """Frame number `i`: a zero vnet header, then `size` bytes starting with i (u32)."""
    body = struct.pack("<I", i) + bytes((i + k) & 0xFF for k in range(size - 4))
    return hdr() + body


def frame_number(data: bytes) -> int:
    return struct.unpack_from("<I", data, HDR)[0]


def put_table(mem: GuestMemory, base: int, entries) -> tuple[int, int]:
    """Write an indirect table of (addr, len, flags, next); returns (base, its length)."""
    for k, (addr, length, flags, nxt) in enumerate(entries):
        mem.write(base + 16 * k, struct.pack("<QIHH", addr, length, flags, nxt))
    return base, 16 * len(entries)


def wait_for(cond, timeout: float = 5.0) -> bool:
    """Poll `cond` until true or `timeout` (a guard against hanging, never a speed claim)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.001)
    return cond()


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
    def put_desc(self, i, addr, length, flags=0, nxt=0):
        self.mem.write(self.desc + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def buf(self, data_or_len) -> tuple[int, int]:
        """Carve a buffer out of the queue's buffer area (wrapping around): (gpa, len)."""
        n = data_or_len if isinstance(data_or_len, int) else len(data_or_len)
        if self.next_buf + n > BUF_BASE[self.q] + BUF_AREA:
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

    def new_used(self) -> int:
        return (self.used_idx() - self.used_seen) & 0xFFFF

    def get_used(self) -> list[tuple[int, int]]:
        """The used entries not seen yet, as (head, length); their descriptors are free again."""
        out = []
        end = self.used_idx()
        while self.used_seen != end:
            e = self.used + 4 + 8 * (self.used_seen % self.num)
            head, length = struct.unpack("<II", self.mem.read(e, 8))
            out.append((head, length))
            self.free.extend(self.chains.pop(head, []))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out

    def wait_used(self, count: int, timeout: float = 5.0) -> list[tuple[int, int]]:
        assert wait_for(lambda: self.new_used() >= count, timeout), \
            f"the device used {self.new_used()} of {count} buffers"
        return self.get_used()

    # notification suppression
    def set_used_event(self, v):
        self.mem.write(self.avail + 4 + 2 * self.num, struct.pack("<H", v))

    def avail_event(self) -> int:
        return struct.unpack("<H", self.mem.read(self.used + 4 + 8 * self.num, 2))[0]

    def set_avail_flags(self, v):
        self.mem.write(self.avail, struct.pack("<H", v))


class Rig:
    """Guest memory, two queues, a socketpair "tap", kick and call eventfds, and a backend.

    `make_backend(mem)` builds the backend (a class of vmm/net, or a lambda);
    `table` is the memory table the backend gets: all of RAM, or with
    table="lower-half" only the lower half, the upper half then filled with a
    canary the backend must never touch.  With `tap_fd` (a real tap) there is no
    socketpair: the test talks to the tap's interface itself."""

    def __init__(self, make_backend, features=VERSION_1, num=256, table="all", tap_fd=None):
        self.make_backend = make_backend
        self.mem = GuestMemory(MEM_SIZE)
        self.features = features
        self.rxq, self.txq = Queue(self.mem, RX, num), Queue(self.mem, TX, num)
        self.dev_sock = self.peer = None
        if tap_fd is None:
            self.dev_sock, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            for s in (self.dev_sock, self.peer):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            self.peer.settimeout(5)
            tap_fd = self.dev_sock.fileno()
        self.tap_fd = tap_fd
        self.kick = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2)]
        self.call = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2)]
        if table == "lower-half":
            self.regions = [(0, HALF, self.mem.host_base)]
            self.mem.write(HALF, b"\xAA" * HALF)
        else:
            self.regions = [(r.gpa, r.size, self.mem.host_base + r.offset)
                            for r in self.mem.regions]
        self.dev = None
        self.dev = self.new_device()

    def new_device(self, base=None):
        """A freshly set-up backend (with `base`, resuming at those ring indices: a CPR)."""
        d = self.make_backend(self.mem)
        d.set_owner()
        d.set_mem_table(self.regions)
        d.set_features(self.features)
        for q, vq in ((RX, self.rxq), (TX, self.txq)):
            d.set_vring_num(q, vq.num)
            d.set_vring_addr(q, vq.desc, vq.avail, vq.used)
            d.set_vring_base(q, 0 if base is None else base[q])
            d.set_vring_kick(q, self.kick[q])
            d.set_vring_call(q, self.call[q])
        d.set_backend(self.tap_fd, HDR)
        return d

    def replace_device(self, base=None):
        self.dev.close()
        self.dev = self.new_device(base)

    # the driver's actions
    def kick_q(self, q):
        os.eventfd_write(self.kick[q], 1)

    def calls(self, q) -> int:
        """Interrupts signalled on queue q since the last look (reads the eventfd)."""
        try:
            return os.eventfd_read(self.call[q])
        except BlockingIOError:
            return 0

    def post_rx(self, count, size=2048) -> list[int]:
        return [self.rxq.add([(*self.rxq.buf(size), F_WRITE)]) for _ in range(count)]

    def post_tx(self, data) -> int:
        return self.txq.add([(*self.txq.buf(data), 0)])

    def post_tx_indirect(self, data, cuts=(HDR, 300)) -> int:
        """`data` in one indirect table (at TABLE_BASE), split into segments at `cuts`."""
        edges = [0, *cuts, len(data)]
        segs = [self.txq.buf(data[a:b]) for a, b in zip(edges, edges[1:])]
        table = put_table(self.mem, TABLE_BASE, [(a, n, F_NEXT, k + 1) for k, (a, n) in
                                                  enumerate(segs[:-1])] + [(*segs[-1], 0, 0)])
        return self.txq.add([(*table, F_INDIRECT)])

    def rx_payload(self, head, length) -> bytes:
        """The first `length` bytes of the (one-segment) RX chain at `head`."""
        addr = struct.unpack("<Q", self.mem.read(self.rxq.desc + 16 * head, 8))[0]
        return self.mem.read(addr, length)

    def stats(self) -> dict:
        """The backend's counters; vhost-net keeps none (an empty dict)."""
        return self.dev.stats()

    def close(self):
        if self.dev is not None:
            self.dev.close()
        for fd in self.kick + self.call:
            os.close(fd)
        if self.peer is not None:
            self.dev_sock.close()
            self.peer.close()
        self.mem.close()
