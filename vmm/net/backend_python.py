"""The virtio-net data path in pure Python: a readable reference for vnet.c.

Same control API as the C path (backend_c.CNetBackend) and vhost-net
(backend_vhost.VhostNetBackend), so the device and the CPR code drive all three alike:

    set_owner, set_mem_table, set_features, set_vring_num/addr/base/kick/call,
    set_backend, start ... stop, get_vring_base, reset_owner

One I/O thread waits with epoll on the queues' kick eventfds and the tap fd,
moves frames between split virtqueues (virtio 1.2 §2.7) and the tap with
readv/writev straight into guest memory, and signals the call eventfd.  Every
guest address goes through a bounds-checked view of guest RAM and every
descriptor is copied out (struct.unpack) before it is checked.  A malformed
chain never raises out of the thread: the device is marked broken (error()),
the rings are left alone, and a config interrupt tells the transport to show
DEVICE_NEEDS_RESET.

It is several times slower than the C path (the GIL, an interpreter loop per
frame) and is kept for comparison benchmarks and for reading.

Memory ordering, as vnet.c does it with atomics:
- Every field the guest reads while we write it (used->idx, used->flags,
  avail_event, a used element) is written with ONE store, through typed
  memoryviews (`mv16[i] = v` is a single 16-bit store).  Not struct.pack_into:
  it zero-fills its destination before writing the value, so a guest polling
  used->idx sees 0 for an instant, takes (0 - last_used) mod 65536 stale
  entries for new frames, echoes them again and reposts buffers it does not
  own (that was the "TX ahead of RX" bug under load; see docs/BENCHMARKS.md).
- x86 keeps stores in order and loads in order, but lets a load pass an older
  store: after arming a notification (avail_event) and before re-reading
  avail->idx, and after publishing used->idx and before reading used_event,
  a full barrier is needed (_fence) or the device and the driver can each
  miss the other's update and both wait (a stall).
"""

from __future__ import annotations

import ctypes
import os
import select
import struct
import threading

from ..errors import DeviceError, GuestMemoryError
from ..virtio import F_EVENT_IDX, F_INDIRECT_DESC, INT_CONFIG, INT_VRING
from . import F_MRG_RXBUF, RX, TX, VNET_HDR_LEN

DESC = struct.Struct("<QIHH")
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1

MAX_IOV = 1024                 # UIO_MAXIOV
MAX_CHAIN_BYTES = 1 << 24      # no frame needs more; a bigger chain is a driver bug
FRAME_GUESS = VNET_HDR_LEN + 1518   # RX: gather this much before reading, spill over if needed
SCRATCH = 1 << 17              # catches the tail of a frame larger than the buffers


class ChainError(Exception):
    """The guest handed over something the device must not touch."""


_barrier = threading.Lock()


def _fence() -> None:
    """A full memory barrier: taking and dropping a lock is a locked instruction on x86
    (what __atomic_thread_fence(__ATOMIC_SEQ_CST) gives vnet.c)."""
    _barrier.acquire()
    _barrier.release()


class _MemTable:
    """Bounds-checked views of guest RAM from a vhost-style memory table: the device reaches
    what the table holds and nothing else (as vhost-net), through `mem` if given, else
    through the table's host addresses."""

    def __init__(self, regions, mem=None):
        self.regions = []
        for gpa, size, host in regions:
            if mem is not None:
                mv = mem.view(gpa, size)
            else:
                mv = memoryview((ctypes.c_char * size).from_address(host)).cast("B")
            self.regions.append((gpa, size, mv))

    def view(self, gpa: int, length: int) -> memoryview:
        for start, size, mv in self.regions:
            if start <= gpa and gpa + length <= start + size:
                return mv[gpa - start:gpa - start + length]
        raise GuestMemoryError(f"guest range {gpa:#x}..{gpa + length:#x} is outside guest RAM")


class Ring:
    """One split virtqueue seen from the device side."""

    def __init__(self, view, num, desc, avail, used, base, features):
        self.view = view
        self.num = num
        self.desc = view(desc, 16 * num)
        # u16/u32 views: one load or store per field (little-endian x86 = the ring's order).
        # avail: flags, idx, ring[num], used_event; used: flags, idx, {id, len}[num], avail_event
        self.avail = view(avail, 6 + 2 * num).cast("H")
        self.used = view(used, 6 + 8 * num).cast("H")
        self.elems = view(used + 4, 8 * num).cast("I")
        self.event_idx = bool(features >> F_EVENT_IDX & 1)
        self.indirect = bool(features >> F_INDIRECT_DESC & 1)
        self.last_avail = base
        self.used_idx = self.used[1]  # the used ring lives in guest RAM
        self.signalled_used = self.used_idx

    # -- the available ring ------------------------------------------------------------
    def pending(self) -> int:
        n = (self.avail[1] - self.last_avail) & 0xFFFF
        if n > self.num:
            raise ChainError(f"avail index ran {n} entries ahead of a {self.num}-entry ring")
        return n

    def pop(self) -> int:
        head = self.avail[2 + self.last_avail % self.num]
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return head

    def unpop(self, count: int) -> None:
        self.last_avail = (self.last_avail - count) & 0xFFFF

    def take(self, writable: bool) -> tuple[int, list[memoryview]]:
        """Pop the next chain and walk it.  A malformed chain is not consumed (as in
        vhost-net): get_vring_base() still points at it, so a restarted device sees it again."""
        head = self.pop()
        try:
            return head, self.walk(head, writable)
        except ChainError:
            self.unpop(1)
            raise

    def walk(self, head: int, writable: bool) -> list[memoryview]:
        """The buffers of the chain at `head`, all device-writable (RX) or all readable (TX)."""
        if head >= self.num:
            raise ChainError(f"chain head {head} is outside a {self.num}-entry ring")
        table, size, index, nested = self.desc, self.num, head, False
        segs, total, seen = [], 0, 0
        while True:
            addr, length, flags, nxt = DESC.unpack_from(table, 16 * index)
            if flags & F_INDIRECT:
                if not self.indirect:
                    raise ChainError("indirect descriptor without VIRTIO_F_INDIRECT_DESC")
                if nested or flags & F_NEXT:
                    raise ChainError("indirect descriptor inside or chained to another")
                if length == 0 or length % 16 or length // 16 > 0xFFFF:
                    raise ChainError(f"indirect table of {length} bytes")
                table, size, index, nested, seen = self._guest(addr, length), length // 16, 0, True, 0
                continue
            if length == 0:
                raise ChainError("zero-length descriptor")
            if bool(flags & F_WRITE) != writable:
                raise ChainError("device-writable descriptor in a TX chain" if not writable
                                 else "device-readable descriptor in an RX chain")
            segs.append(self._guest(addr, length))
            total += length
            seen += 1
            if seen > size or len(segs) > MAX_IOV - 1:
                raise ChainError("descriptor chain loops or is too long")
            if total > MAX_CHAIN_BYTES:
                raise ChainError(f"descriptor chain holds over {MAX_CHAIN_BYTES} bytes")
            if not flags & F_NEXT:
                return segs
            if nxt >= size:
                raise ChainError(f"next descriptor {nxt} is outside a {size}-entry table")
            index = nxt

    def _guest(self, gpa, length):
        try:
            return self.view(gpa, length)
        except GuestMemoryError as e:
            raise ChainError(str(e)) from None

    # -- the used ring ------------------------------------------------------------------
    def push(self, head: int, length: int) -> None:
        slot = 2 * (self.used_idx % self.num)
        self.elems[slot] = head
        self.elems[slot + 1] = length
        self.used_idx = (self.used_idx + 1) & 0xFFFF

    def publish(self) -> None:
        self.used[1] = self.used_idx   # after the elements (x86 keeps stores in order)

    def wait_for_more(self) -> bool:
        """Ask for a kick as soon as the driver adds any entry (not just one past last_avail:
        the entries already there are too few); True if one came meanwhile (vnet.c's
        rx_wait_buffers)."""
        seen = self.avail[1]
        if self.event_idx:
            self.used[2 + 4 * self.num] = seen
        else:
            self.used[0] = 0
        _fence()
        return self.avail[1] != seen

    def notifications(self, on: bool) -> None:
        """Ask the driver to kick (on) or not; with EVENT_IDX, kick at the next new entry.
        Turning them on is followed by a barrier: the caller re-reads avail->idx next."""
        if self.event_idx:
            if on:
                self.used[2 + 4 * self.num] = self.last_avail
                _fence()
        else:
            self.used[0] = 0 if on else USED_F_NO_NOTIFY
            if on:
                _fence()

    def needs_interrupt(self) -> bool:
        old, new = self.signalled_used, self.used_idx
        if old == new:
            return False
        self.signalled_used = new
        _fence()                       # used->idx out before used_event / flags are read
        if self.event_idx:
            event = self.avail[2 + self.num]
            return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF
        return not self.avail[0] & AVAIL_F_NO_INTERRUPT


class _Vring:
    """What the owner configured for one queue."""

    def __init__(self):
        self.num = 0
        self.addr = (0, 0, 0)
        self.base = 0
        self.kick = -1
        self.call = -1


class PyNetBackend:
    """virtio-net RX/TX queues between guest RAM and a tap, in a Python thread."""

    def __init__(self, mem=None):
        """`mem`: a GuestMemory to reach RAM through; else views of the table's host addresses."""
        self.mem = mem
        self._lock = threading.Lock()
        self._thread = None
        self._isr = 0
        self._owned = False
        self._forget()

    def _forget(self):
        self._view = None
        self._features = 0
        self._vrings = [_Vring() for _ in (RX, TX)]
        self._rings = None
        self._tap = -1
        self._hdr_len = 0
        self._error = None
        self._stats = dict.fromkeys(("rx_packets", "rx_bytes", "rx_dropped", "tx_packets",
                                     "tx_bytes", "tx_dropped", "kicks", "interrupts",
                                     "wakeups"), 0)

    # -- control API (mirrors vhost) --------------------------------------------------
    def set_owner(self) -> None:
        if self._owned:
            raise DeviceError("the Python data path already has an owner: reset_owner first")
        self._owned = True

    def reset_owner(self) -> None:
        """Stop and forget rings, fds and memory; the fds themselves stay open (the caller's)."""
        self.stop()
        self._forget()
        self._owned = False

    def set_mem_table(self, regions) -> None:
        self._need_owner()
        regions = [tuple(r) for r in regions]
        if self.mem is not None:
            for gpa, size, host in regions:
                if not self.mem.contains(gpa, size) or self.mem.host_address(gpa, size) != host:
                    raise DeviceError(f"memory table entry {gpa:#x}+{size:#x} does not match "
                                      f"guest RAM")
        self._view = _MemTable(regions, self.mem).view

    def set_features(self, features: int) -> None:
        self._need_owner()
        self._features = features

    def set_vring_num(self, q: int, num: int) -> None:
        if not 0 < num <= 32768:
            raise DeviceError(f"queue {q}: bad size {num}")
        self._vring(q).num = num

    def set_vring_addr(self, q: int, desc: int, avail: int, used: int) -> None:
        self._vring(q).addr = (desc, avail, used)

    def set_vring_base(self, q: int, idx: int) -> None:
        self._vring(q).base = idx & 0xFFFF

    def get_vring_base(self, q: int) -> int:
        """The next avail entry the device would take (exact once stopped)."""
        if self._rings is not None:
            return self._rings[q].last_avail
        return self._vring(q).base

    def set_vring_kick(self, q: int, fd: int) -> None:
        self._vring(q).kick = fd

    def set_vring_call(self, q: int, fd: int) -> None:
        self._vring(q).call = fd

    def set_backend(self, tap_fd: int, hdr_len: int) -> None:
        self._need_owner()
        if hdr_len != VNET_HDR_LEN:
            raise DeviceError(f"vnet header of {hdr_len} bytes: pyvmm uses {VNET_HDR_LEN} "
                              "(VERSION_1)")
        os.set_blocking(tap_fd, False)   # as vnet.c: the thread must never sleep in readv
        self._tap, self._hdr_len = tap_fd, hdr_len

    def start(self) -> None:
        self._need_owner()
        if self._thread is not None:
            return
        if self._view is None or self._tap < 0:
            raise DeviceError("start before set_mem_table/set_backend")
        try:
            self._rings = []
            for q, v in enumerate(self._vrings):
                if not v.num or v.kick < 0 or v.call < 0:
                    raise DeviceError(f"queue {q} is not configured")
                self._rings.append(Ring(self._view, v.num, *v.addr, v.base, self._features))
        except GuestMemoryError as e:
            self._rings = None
            raise DeviceError(f"virtqueue outside guest RAM: {e}") from e
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._thread = threading.Thread(target=self._run, name="pyvmm-net", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish the frame in hand and join the thread; after this guest RAM is not touched."""
        if self._thread is None:
            return
        os.eventfd_write(self._stop_fd, 1)
        self._thread.join()
        self._thread = None
        os.close(self._stop_fd)
        for q, ring in enumerate(self._rings):
            self._vrings[q].base = ring.last_avail

    def running(self) -> bool:
        return self._thread is not None

    def close(self) -> None:
        """Stop and let go (the C path frees its device here)."""
        if self._owned:
            self.reset_owner()

    def isr_read(self) -> int:
        return self._isr

    def isr_ack(self, bits: int) -> None:
        with self._lock:
            self._isr &= ~bits

    def error(self) -> str | None:
        return self._error

    def stats(self) -> dict:
        return dict(self._stats)

    def _need_owner(self):
        if not self._owned:
            raise DeviceError("the Python data path has no owner: set_owner first")

    def _vring(self, q: int) -> _Vring:
        self._need_owner()
        if q not in (RX, TX):
            raise DeviceError(f"no queue {q}: virtio-net has RX (0) and TX (1)")
        if self._thread is not None:
            raise DeviceError("stop the data path before changing its queues")
        return self._vrings[q]

    # -- the I/O thread ----------------------------------------------------------------
    def _run(self) -> None:
        ep = select.epoll()
        try:
            kicks = {v.kick: q for q, v in enumerate(self._vrings)}
            for fd in kicks:
                ep.register(fd, select.EPOLLIN)
            ep.register(self._stop_fd, select.EPOLLIN)
            self._scratch = bytearray(SCRATCH)
            self._tap_mask = select.EPOLLIN
            ep.register(self._tap, self._tap_mask)
            self._tx_blocked = False
            while True:
                self._tx()
                rx_ready = self._rx()
                mask = (select.EPOLLIN if rx_ready else 0) | \
                    (select.EPOLLOUT if self._tx_blocked else 0)
                if mask != self._tap_mask:
                    ep.modify(self._tap, mask)
                    self._tap_mask = mask
                events = ep.poll()
                self._stats["wakeups"] += 1
                for fd, ev in events:
                    if fd == self._stop_fd:
                        return
                    if fd in kicks:
                        try:
                            os.eventfd_read(fd)
                            self._stats["kicks"] += 1
                        except BlockingIOError:
                            pass
                    elif fd == self._tap:
                        if ev & (select.EPOLLERR | select.EPOLLHUP):
                            self._break("the tap went away (was its interface deleted?)")
                            return
                        if ev & select.EPOLLOUT:
                            self._tx_blocked = False
        except ChainError as e:
            self._break(str(e))
        except Exception as e:  # a bug here must not take the VMM down with it
            self._break(f"internal error in the Python data path: {e!r}")
        finally:
            ep.close()

    def _break(self, why: str) -> None:
        """Stop touching the rings; the transport shows DEVICE_NEEDS_RESET."""
        self._error = why
        self._signal(RX, INT_CONFIG)

    def _signal(self, q: int, bits: int = INT_VRING) -> None:
        with self._lock:
            self._isr |= bits
        self._stats["interrupts"] += 1
        os.eventfd_write(self._vrings[q].call, 1)

    def _tx(self) -> None:
        """Send every frame the guest queued, until the ring is empty or the tap is full."""
        ring = self._rings[TX]
        ring.notifications(False)
        while not self._tx_blocked:
            if not ring.pending():
                ring.notifications(True)
                if not ring.pending():  # the guest may have added one meanwhile
                    break
                ring.notifications(False)
            head, segs = ring.take(writable=False)
            try:
                os.writev(self._tap, segs)
                self._stats["tx_packets"] += 1
                self._stats["tx_bytes"] += sum(map(len, segs)) - self._hdr_len
            except BlockingIOError:
                ring.unpop(1)  # try again when the tap has room
                self._tx_blocked = True
                break
            except OSError:
                self._stats["tx_dropped"] += 1
            ring.push(head, 0)
        ring.publish()
        if ring.needs_interrupt():
            self._signal(TX)

    def _rx(self) -> bool:
        """Deliver frames from the tap while the guest has buffers; False when it has none."""
        ring = self._rings[RX]
        merge = bool(self._features >> F_MRG_RXBUF & 1)
        has_buffers = True
        while True:
            if not ring.pending():
                ring.notifications(True)
                if not ring.pending():  # the guest may have added one meanwhile
                    has_buffers = False
                    break
            ring.notifications(False)
            got = self._rx_one(ring, merge)
            if got is None:          # too few buffers for a full-size frame: wait for more
                if ring.wait_for_more():
                    continue
                has_buffers = False
                break
            if not got:
                break
        ring.publish()
        if ring.needs_interrupt():
            self._signal(RX)
        return has_buffers

    def _rx_one(self, ring: Ring, merge: bool) -> bool | None:
        """Read one frame into the guest's buffers; False when the tap has nothing, None
        (nothing read) when with MRG_RXBUF the guest offers less than a full-size frame."""
        chains = []  # (head, segments, capacity)
        try:
            return self._rx_into(ring, merge, chains)
        except ChainError:
            ring.unpop(len(chains))   # give back this frame's chains: nothing was used
            raise

    def _rx_into(self, ring: Ring, merge: bool, chains: list) -> bool | None:
        room = 0
        while ring.pending() and (merge or not chains) and room < FRAME_GUESS:
            head, segs = ring.take(writable=True)
            chains.append((head, segs, sum(map(len, segs))))
            room += chains[-1][2]
        if merge and room < FRAME_GUESS:
            ring.unpop(len(chains))
            chains.clear()
            return None
        scratch = self._scratch
        try:
            n = os.readv(self._tap, [s for _, segs, _ in chains for s in segs] + [scratch])
        except BlockingIOError:
            ring.unpop(len(chains))
            return False
        truncated = n == room + SCRATCH
        if n > room:  # spill the tail into more buffers, if the guest has them
            spill = memoryview(scratch)[:n - room]
            while merge and spill and ring.pending():
                head, segs = ring.take(writable=True)
                cap = sum(map(len, segs))
                _scatter(segs, spill[:cap])
                spill = spill[cap:]
                chains.append((head, segs, cap))
                room += cap
            if n > room or truncated:
                ring.unpop(len(chains))
                self._stats["rx_dropped"] += 1
                return True
        used = []
        left = n
        for head, segs, cap in chains:
            if not left:
                break
            used.append((head, segs, min(cap, left)))
            left -= used[-1][2]
        ring.unpop(len(chains) - len(used))
        # num_buffers (header bytes 10-11): the tap leaves them alone, so always write them.
        _scatter([s for _, segs, _ in used for s in segs], len(used).to_bytes(2, "little"), offset=10)
        for head, _, length in used:
            ring.push(head, length)
        self._stats["rx_packets"] += 1
        self._stats["rx_bytes"] += n - self._hdr_len
        return True


def _scatter(segs, data, offset: int = 0) -> None:
    """Copy `data` into the concatenation of `segs`, starting `offset` bytes in."""
    data = memoryview(data)
    for s in segs:
        if offset >= len(s):
            offset -= len(s)
            continue
        take = min(len(s) - offset, len(data))
        s[offset:offset + take] = data[:take]
        data = data[take:]
        offset = 0
        if not data:
            return
