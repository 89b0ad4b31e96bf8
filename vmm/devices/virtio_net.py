"""virtio-net (device id 1): feature negotiation, config space, and the data-path hand-off.

(The virtio device model only; the machine's device that owns it, its tap and its
MMIO window is devices/net.py, NetDevice; the data paths are in vmm/net/.)

The device itself never touches a packet.  On activation it hands the rings,
the eventfds and the tap to a backend with vhost's control API (the C path,
the Python path or /dev/vhost-net, picked by `backend_factory`), and from then
on only answers config reads and interrupt-status questions.

Live update (CPR), old VMM:   quiesce() -> save() -> release() -> pass the tap fd
                    new VMM:  VirtioNet(Tap.from_fd(fd), ...) inside a fresh
                              VirtioMmio, restore(saved), then the transport's
                              restore(), which calls activate() with new eventfds;
                              the rings carry on from the queues' next_avail.
If the update is abandoned, the old VMM calls reacquire() and resume().

The control queue (queue 2, VIRTIO_NET_F_CTRL_VQ) is the exception to "never
touches a packet": its messages are rare, so its kicks come to Python (the
transport's python_queues: the QueueNotify write exits to the vCPU thread) and
are answered there, synchronously, as QEMU's virtio_net_handle_ctrl does.  The
only command is VIRTIO_NET_F_GUEST_ANNOUNCE's: after a live migration the VMM
sets VIRTIO_NET_S_ANNOUNCE in the config status and raises a config interrupt
(request_announce); the driver sends its own gratuitous ARP and acks with
VIRTIO_NET_CTRL_ANNOUNCE_ACK, which clears the bit (virtio 1.2 §5.1.6.5.4).
The data-path backends get queues 0 and 1 only.
"""

from __future__ import annotations

import os
import struct
import threading

from ..errors import DeviceError, GuestMemoryError, VmmError
from ..log import get_logger
from ..schema import U16, U32, U64, Bool, Bytes, Int
from ..net import F_MRG_RXBUF, VNET_HDR_LEN
from ..virtio import F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1, INT_VRING, bit
from . import State

log = get_logger(__name__)

DEVICE_ID = 1
QUEUE_SIZE = 256
CTRL = 2                 # the control queue's index (after receiveq1, transmitq1)
CTRL_QUEUE_SIZE = 64     # (QEMU's)
DATA_QUEUES = 2          # what the data-path backends get

# Feature bits (virtio 1.2 §5.1.3).
F_CSUM, F_GUEST_CSUM = 0, 1
F_MAC = 5
F_GUEST_TSO4, F_GUEST_TSO6, F_GUEST_ECN, F_GUEST_UFO = 7, 8, 9, 10
F_HOST_TSO4, F_HOST_TSO6, F_HOST_ECN, F_HOST_UFO = 11, 12, 13, 14
F_STATUS = 16
F_CTRL_VQ = 17
F_GUEST_ANNOUNCE = 21

S_LINK_UP = 1
S_ANNOUNCE = 2

# The control queue (§5.1.6.5): a readable {u8 class, u8 command, data...}, a writable u8 ack.
CTRL_ANNOUNCE, CTRL_ANNOUNCE_ACK = 3, 0
NET_OK, NET_ERR = 0, 1
CTRL_MAX_COMMAND = 4096  # readable bytes taken from a command (ours are 2)

OFFERED = sum(bit(b) for b in (
    F_VERSION_1, F_STATUS, F_MRG_RXBUF, F_EVENT_IDX, F_INDIRECT_DESC, F_CSUM, F_GUEST_CSUM,
    F_GUEST_TSO4, F_GUEST_TSO6, F_GUEST_ECN, F_GUEST_UFO,
    F_HOST_TSO4, F_HOST_TSO6, F_HOST_ECN, F_HOST_UFO, F_CTRL_VQ, F_GUEST_ANNOUNCE))

# (feature, what it needs) pairs from §5.1.3.1; a driver breaking one is refused.
_REQUIRES = [
    (F_GUEST_TSO4, (F_GUEST_CSUM,)), (F_GUEST_TSO6, (F_GUEST_CSUM,)),
    (F_GUEST_UFO, (F_GUEST_CSUM,)), (F_GUEST_ECN, (F_GUEST_TSO4, F_GUEST_TSO6)),
    (F_HOST_TSO4, (F_CSUM,)), (F_HOST_TSO6, (F_CSUM,)), (F_HOST_UFO, (F_CSUM,)),
    (F_HOST_ECN, (F_HOST_TSO4, F_HOST_TSO6)), (F_GUEST_ANNOUNCE, (F_CTRL_VQ,)),
]


class VirtioNetState(State):
    """Negotiation, link status, MAC, interrupt bits and whether the guest is asked to
    announce itself (S_ANNOUNCE); the rings, the control queue's too, are the
    transport's.  Version 2 added `announce` (the NetState that holds it converts a
    version 1 tree: devices/net.py)."""
    VERSION = 2
    FIELDS = {"features": Int(0, U64), "status": Int(0, U16), "mac": Bytes(sizes=(0, 6)),
              "isr": Int(0, U32), "announce": Bool()}


class ChainError(Exception):
    """A control queue chain the device must not (or cannot) follow."""


class VirtioNet:
    """A virtio-net device on a tap, its data path run by a vhost-like backend."""

    device_id = DEVICE_ID
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE, CTRL_QUEUE_SIZE)
    python_queues = (CTRL,)

    def __init__(self, tap, mac: bytes | None, backend_factory):
        if mac is not None and len(mac) != 6:
            raise DeviceError(f"MAC address {mac.hex(':')} is not 6 bytes: "
                              f"give one like 52:54:00:12:34:56")
        self.tap = tap
        self.mac = mac
        self.backend_factory = backend_factory
        self.backend = None
        self.features = OFFERED | (bit(F_MAC) if mac is not None else 0)
        self.link_status = S_LINK_UP
        self.defer_start = False
        self.dirty_log = None    # live migration: the backend marks the pages it writes
        self.isr_lock = threading.Lock()   # pending_isr: vCPU threads and the QMP thread
        self.ctrl_lock = threading.Lock()  # one vCPU at a time walks the control queue
        self._clear()

    def _clear(self) -> None:
        self.acked = 0
        self.queues = []         # the transport's Queue objects, from activate()
        self.wiring = None       # (mem, kick_fds, call_fd) while the driver is OK
        self.owned = False       # the backend holds our rings
        self.running = False
        self.pending_isr = 0     # ISR bits carried over a live update, or the control queue's
        self.announce = False    # S_ANNOUNCE: the guest is asked to announce itself

    # -- config space ----------------------------------------------------------------
    def config(self) -> bytes:
        """mac[6], status u16 (the config layout of §5.1.4, without MQ/MTU fields)."""
        status = self.link_status | (S_ANNOUNCE if self.announce else 0)
        return (self.mac or bytes(6)) + status.to_bytes(2, "little")

    def read_config(self, offset: int, size: int) -> bytes:
        if offset <= 6 < offset + size:
            self.link_status = S_LINK_UP if self.tap.link_up() else 0
        return self.config()[offset:offset + size].ljust(size, b"\0")

    def write_config(self, offset: int, data: bytes) -> None:
        log.debug("virtio-net: config write at %#x ignored (read-only)", offset)

    # -- negotiation and activation ------------------------------------------------------
    def ack_features(self, features: int) -> bool:
        for feature, needs in _REQUIRES:
            if features & bit(feature) and not any(features & bit(n) for n in needs):
                log.info("virtio-net: feature %d without %s refused", feature, needs)
                return False
        self.acked = features
        return True

    def activate(self, mem, queues, kick_fds, call_fd) -> None:
        """DRIVER_OK (or a restore): give the rings to the backend from their next_avail."""
        self.queues = list(queues)
        self.wiring = (mem, list(kick_fds), call_fd)
        self.reacquire()
        if not self.defer_start:   # a live update starts the rings only on "go"
            self.resume()
        if self.pending_isr:
            os.eventfd_write(call_fd, 1)  # the guest has yet to see this interrupt

    def reacquire(self) -> None:
        """Make the backend ours again and program it (also after an abandoned CPR)."""
        if self.owned:
            return
        if self.wiring is None:
            raise DeviceError("virtio-net has no rings to program: the driver is not ready")
        mem, kick_fds, call_fd = self.wiring
        if self.backend is None:
            self.backend = self.backend_factory()
            if self.dirty_log is not None:
                self.backend.set_dirty_log(self.dirty_log)
        b = self.backend
        b.set_owner()
        self.owned = True
        try:
            b.set_mem_table([(r.gpa, r.size, mem.host_base + r.offset) for r in mem.regions])
            b.set_features(self.acked)
            for i, q in enumerate(self.queues[:DATA_QUEUES]):
                b.set_vring_num(i, q.num)
                b.set_vring_addr(i, q.desc, q.avail, q.used)
                b.set_vring_base(i, q.next_avail)
                b.set_vring_kick(i, kick_fds[i])
                b.set_vring_call(i, call_fd)
            self.tap.set_offloads(self.acked)
            b.set_backend(self.tap.fd, VNET_HDR_LEN)
        except VmmError:
            self.release()
            raise
        except OSError as e:
            self.release()
            raise DeviceError(f"virtio-net data path refused its setup: {e}") from e

    def set_dirty_log(self, log) -> None:
        """Live migration: have the backend mark every page it writes in `log`
        (vmm.net.backend_c.DirtyLog; None: stop)."""
        self.dirty_log = log
        if self.backend is not None:
            self.backend.set_dirty_log(log)

    def resume(self) -> None:
        """Start the data path (after activate, quiesce or reacquire)."""
        if not self.running:
            self.backend.start()
            self.running = True

    def quiesce(self) -> None:
        """Stop the data path and write where each ring stands into its queue's
        next_avail; RAM is untouched afterwards."""
        if self.running:
            self.backend.stop()
            self.running = False
        if self.owned:
            self.pending_isr |= self.backend.isr_read()   # survives release()
            for i, q in enumerate(self.queues[:DATA_QUEUES]):
                q.next_avail = self.backend.get_vring_base(i)

    def release(self) -> None:
        """Let go of rings, fds and memory (vhost's RESET_OWNER); the tap stays as it is."""
        if self.owned:
            self.backend.reset_owner()
        self.owned = self.running = False

    def close(self) -> None:
        """Stop the data path and free the backend (at VMM exit; the tap is the caller's)."""
        self.release()
        if self.backend is not None:
            self.backend.close()
        self.backend = None

    def reset(self) -> None:
        """The driver wrote status 0: drop the rings and forget the negotiation."""
        self.release()
        if self.acked:
            self.tap.set_offloads(0)
        self._clear()

    # -- what the transport asks -----------------------------------------------------------
    def isr(self) -> int:
        return (self.backend.isr_read() if self.owned else 0) | self.pending_isr

    def isr_ack(self, bits: int) -> None:
        if self.owned:
            self.backend.isr_ack(bits)
        with self.isr_lock:
            self.pending_isr &= ~bits

    def error(self) -> str | None:
        return self.backend.error() if self.owned else None

    def stats(self) -> dict:
        return self.backend.stats() if self.backend is not None else {}

    # -- state -------------------------------------------------------------------------------
    def next_avail(self) -> list[int]:
        """Where each ring stands: a live reading while running (for inspection; a live
        update quiesces first, which writes it into the queues)."""
        if self.running:
            return [self.backend.get_vring_base(i) for i in range(DATA_QUEUES)] + \
                [q.next_avail for q in self.queues[DATA_QUEUES:]]
        return [q.next_avail for q in self.queues]

    def save(self) -> VirtioNetState:
        return VirtioNetState(features=self.acked, status=self.link_status,
                              mac=self.mac or b"", isr=self.isr(), announce=self.announce)

    def restore(self, saved: VirtioNetState) -> None:
        """Restore into an idle device, before its transport (whose restore re-activates)."""
        if self.owned:
            raise VmmError("virtio-net state must be restored into an idle device")
        if saved.features & ~self.features & ~bit(F_MAC):
            raise VmmError(f"saved virtio-net state uses features {saved.features:#x} this "
                           f"pyvmm does not offer: update with the same pyvmm version")
        self.acked = saved.features
        self.mac = bytes(saved.mac) or None
        if self.mac is not None:
            self.features |= bit(F_MAC)
        self.link_status = saved.status
        self.pending_isr = saved.isr
        self.announce = saved.announce

    # -- the control queue (VIRTIO_NET_F_CTRL_VQ, GUEST_ANNOUNCE) ------------------------------
    def request_announce(self) -> bool:
        """Ask the guest to announce itself (S_ANNOUNCE); True if the driver negotiated
        GUEST_ANNOUNCE and is running, so the caller raises the config interrupt."""
        if not self.acked & bit(F_GUEST_ANNOUNCE) or self.wiring is None:
            return False
        self.announce = True
        return True

    def notify(self, index: int) -> None:
        """A kick on the control queue (in the vCPU thread that wrote QueueNotify): answer
        every command the driver has made available, then interrupt it.  Nothing the
        guest wrote reaches past guest RAM or raises out of here: a bad ring is logged
        and left alone, a bad chain is logged and given back unanswered."""
        if index != CTRL or self.wiring is None or not self.acked & bit(F_CTRL_VQ) or \
                len(self.queues) <= CTRL or not self.queues[CTRL].ready:
            return
        with self.ctrl_lock:
            self._ctrl(self.wiring[0], self.queues[CTRL], self.wiring[2])

    def _ctrl(self, mem, q, call_fd: int) -> None:
        try:
            old_used = new_used = _u16(mem, q.used + 2)
            pending = (_u16(mem, q.avail + 2) - q.next_avail) & 0xFFFF
            if pending > q.num:
                log.warning("virtio-net: control queue: avail index ran %d entries ahead of a "
                            "%d-entry ring; ignored", pending, q.num)
                return
            for _ in range(pending):
                head = _u16(mem, q.avail + 4 + 2 * (q.next_avail % q.num))
                q.next_avail = (q.next_avail + 1) & 0xFFFF
                written = self._command(mem, q, head)
                elem = q.used + 4 + 8 * (new_used % q.num)
                mem.write(elem, struct.pack("<II", head, written))
                new_used = (new_used + 1) & 0xFFFF
                mem.view(q.used + 2, 2).cast("H")[0] = new_used   # one store, after the element
                self._wrote(mem, q.used + 2, 2)
                self._wrote(mem, elem, 8)
        except GuestMemoryError as e:   # (the transport checked the ring areas: not expected)
            log.warning("virtio-net: control queue: %s; ignored", e)
            return
        if new_used != old_used and self._wants_interrupt(mem, q, old_used, new_used):
            with self.isr_lock:
                self.pending_isr |= INT_VRING
            os.eventfd_write(call_fd, 1)

    def _wants_interrupt(self, mem, q, old: int, new: int) -> bool:
        """The driver's interrupt suppression (§2.7.10): used_event with EVENT_IDX, else the flag."""
        if self.acked & bit(F_EVENT_IDX):
            event = _u16(mem, q.avail + 4 + 2 * q.num)
            return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF
        return not _u16(mem, q.avail) & 1

    def _command(self, mem, q, head: int) -> int:
        """Answer the command in the chain at `head`; the bytes written (0: dropped)."""
        try:
            command, acks = self._chain(mem, q, head)
        except ChainError as e:
            log.warning("virtio-net: control queue: malformed chain at %d dropped: %s", head, e)
            return 0
        if not acks:
            log.warning("virtio-net: control queue: chain at %d has no device-writable ack "
                        "byte; dropped", head)
            return 0
        ack = NET_ERR
        if command[:2] == bytes((CTRL_ANNOUNCE, CTRL_ANNOUNCE_ACK)) and self.announce:
            self.announce = False   # (as QEMU: an ack nobody asked for is an error)
            ack = NET_OK
        else:
            log.info("virtio-net: control command %s refused (only ANNOUNCE_ACK, after an "
                     "announce request, is known)", command[:2].hex() or "(empty)")
        mem.write(acks[0], bytes((ack,)))
        self._wrote(mem, acks[0], 1)
        return 1

    def _wrote(self, mem, gpa: int, length: int) -> None:
        """A live migration's precopy must send again what the VMM wrote (KVM logs only
        the vCPUs' writes)."""
        if self.dirty_log is not None:
            self.dirty_log.mark(mem.offset_of(gpa, length), length)

    def _chain(self, mem, q, head: int) -> tuple[bytes, list[int]]:
        """The chain at `head`: its readable bytes (at most CTRL_MAX_COMMAND) and the guest
        addresses of its writable descriptors, which come after every readable one (§2.7.4.2).
        Every descriptor is copied out of guest RAM, then checked against it."""
        if head >= q.num:
            raise ChainError(f"head {head} is outside a {q.num}-entry ring")
        table, size, index, nested = q.desc, q.num, head, False
        command, acks, seen = b"", [], 0
        while True:
            try:
                addr, length, flags, nxt = struct.unpack("<QIHH", mem.read(table + 16 * index, 16))
            except GuestMemoryError as e:
                raise ChainError(str(e)) from None
            if flags & 4:   # VIRTQ_DESC_F_INDIRECT
                if not self.acked & bit(F_INDIRECT_DESC) or nested or flags & 1:
                    raise ChainError("indirect descriptor not negotiated, nested or chained")
                if length == 0 or length % 16 or length // 16 > 0xFFFF or \
                        not mem.contains(addr, length):
                    raise ChainError(f"indirect table {addr:#x}+{length:#x}")
                table, size, index, nested, seen = addr, length // 16, 0, True, 0
                continue
            if length == 0 or not mem.contains(addr, length):
                raise ChainError(f"buffer {addr:#x}+{length:#x} is empty or outside guest RAM")
            if flags & 2:   # VIRTQ_DESC_F_WRITE
                acks.append(addr)
            elif acks:
                raise ChainError("a device-readable descriptor after a device-writable one")
            elif len(command) < CTRL_MAX_COMMAND:
                command += mem.read(addr, min(length, CTRL_MAX_COMMAND - len(command)))
            seen += 1
            if seen > size:
                raise ChainError("the chain loops or is longer than its table")
            if not flags & 1:   # VIRTQ_DESC_F_NEXT
                return command, acks
            if nxt >= size:
                raise ChainError(f"next descriptor {nxt} is outside a {size}-entry table")
            index = nxt


def _u16(mem, gpa: int) -> int:
    """One u16 of guest RAM (checked)."""
    return int.from_bytes(mem.read(gpa, 2), "little")
