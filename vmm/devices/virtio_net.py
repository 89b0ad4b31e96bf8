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
"""

from __future__ import annotations

import os

from ..errors import DeviceError, VmmError
from ..log import get_logger
from ..schema import U16, U32, U64, Bytes, Int
from ..net import F_MRG_RXBUF, VNET_HDR_LEN
from ..virtio import F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1, bit
from . import State

log = get_logger(__name__)

DEVICE_ID = 1
QUEUE_SIZE = 256

# Feature bits (virtio 1.2 §5.1.3).
F_CSUM, F_GUEST_CSUM = 0, 1
F_MAC = 5
F_GUEST_TSO4, F_GUEST_TSO6, F_GUEST_ECN, F_GUEST_UFO = 7, 8, 9, 10
F_HOST_TSO4, F_HOST_TSO6, F_HOST_ECN, F_HOST_UFO = 11, 12, 13, 14
F_STATUS = 16

S_LINK_UP = 1

OFFERED = sum(bit(b) for b in (
    F_VERSION_1, F_STATUS, F_MRG_RXBUF, F_EVENT_IDX, F_INDIRECT_DESC, F_CSUM, F_GUEST_CSUM,
    F_GUEST_TSO4, F_GUEST_TSO6, F_GUEST_ECN, F_GUEST_UFO,
    F_HOST_TSO4, F_HOST_TSO6, F_HOST_ECN, F_HOST_UFO))

# (feature, what it needs) pairs from §5.1.3.1; a driver breaking one is refused.
_REQUIRES = [
    (F_GUEST_TSO4, (F_GUEST_CSUM,)), (F_GUEST_TSO6, (F_GUEST_CSUM,)),
    (F_GUEST_UFO, (F_GUEST_CSUM,)), (F_GUEST_ECN, (F_GUEST_TSO4, F_GUEST_TSO6)),
    (F_HOST_TSO4, (F_CSUM,)), (F_HOST_TSO6, (F_CSUM,)), (F_HOST_UFO, (F_CSUM,)),
    (F_HOST_ECN, (F_HOST_TSO4, F_HOST_TSO6)),
]


class VirtioNetState(State):
    """Negotiation, link status, MAC and interrupt bits; the rings are the transport's."""
    VERSION = 1
    FIELDS = {"features": Int(0, U64), "status": Int(0, U16), "mac": Bytes(sizes=(0, 6)),
              "isr": Int(0, U32)}


class VirtioNet:
    """A virtio-net device on a tap, its data path run by a vhost-like backend."""

    device_id = DEVICE_ID
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)

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
        self._clear()

    def _clear(self) -> None:
        self.acked = 0
        self.queues = []         # the transport's Queue objects, from activate()
        self.wiring = None       # (mem, kick_fds, call_fd) while the driver is OK
        self.owned = False       # the backend holds our rings
        self.running = False
        self.pending_isr = 0     # ISR bits carried over a live update

    # -- config space ----------------------------------------------------------------
    def config(self) -> bytes:
        """mac[6], status u16 (the config layout of §5.1.4, without MQ/MTU fields)."""
        return (self.mac or bytes(6)) + self.link_status.to_bytes(2, "little")

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
            for i, q in enumerate(self.queues):
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
            for i, q in enumerate(self.queues):
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
            return [self.backend.get_vring_base(i) for i in range(len(self.queues))]
        return [q.next_avail for q in self.queues]

    def save(self) -> VirtioNetState:
        return VirtioNetState(features=self.acked, status=self.link_status,
                              mac=self.mac or b"", isr=self.isr())

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
