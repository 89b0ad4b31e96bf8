"""virtio-net (device id 1): feature negotiation, config space, and the data-path hand-off.

The device itself never touches a packet.  On activation it hands the rings,
the eventfds and the tap to a backend with vhost's control API (the C path,
the Python path or /dev/vhost-net, picked by `backend_factory`), and from then
on only answers config reads and interrupt-status questions.

Live update (CPR), old VMM:   quiesce() -> state() -> release() -> pass the tap fd
                    new VMM:  VirtioNet(Tap.from_fd(fd), ...) inside a fresh
                              VirtioMmio, transport.set_state(saved), which calls
                              set_state() and then activate() with new eventfds;
                              the rings carry on from the saved avail indices.
If the update is abandoned, the old VMM calls reacquire() and resume().
"""

from __future__ import annotations

import os

from ..errors import DeviceError, VmmError
from ..log import get_logger
from ..virtio import F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1, bit

log = get_logger(__name__)

DEVICE_ID = 1
QUEUE_SIZE = 256
RX, TX = 0, 1
VNET_HDR_LEN = 12  # virtio_net_hdr_v1: VERSION_1 always carries num_buffers

# Feature bits (virtio 1.2 §5.1.3).
F_CSUM, F_GUEST_CSUM = 0, 1
F_MAC = 5
F_GUEST_TSO4, F_GUEST_TSO6, F_GUEST_ECN, F_GUEST_UFO = 7, 8, 9, 10
F_HOST_TSO4, F_HOST_TSO6, F_HOST_ECN, F_HOST_UFO = 11, 12, 13, 14
F_MRG_RXBUF = 15
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
        self._clear()

    def _clear(self) -> None:
        self.acked = 0
        self.queues = [_queue_state() for _ in self.queue_sizes]
        self.vring_bases = [0, 0]
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
        """DRIVER_OK (or a restore): give the rings to the backend from the current bases."""
        self.queues = [dict(_queue_state(q), last_avail_idx=b)
                       for q, b in zip(queues, self.vring_bases)]
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
        b = self.backend
        b.set_owner()
        self.owned = True
        try:
            b.set_mem_table([(r.gpa, r.size, mem.host_base + r.offset) for r in mem.regions])
            b.set_features(self.acked)
            for i, q in enumerate(self.queues):
                b.set_vring_num(i, q["num"])
                b.set_vring_addr(i, q["desc"], q["avail"], q["used"])
                b.set_vring_base(i, self.vring_bases[i])
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

    def resume(self) -> None:
        """Start the data path (after activate, quiesce or reacquire)."""
        if not self.running:
            self.backend.start()
            self.running = True

    def quiesce(self) -> list[int]:
        """Stop the data path and read where each ring stands; RAM is untouched afterwards."""
        if self.running:
            self.backend.stop()
            self.running = False
        if self.owned:
            self.pending_isr |= self.backend.isr_read()   # survives release()
            self.vring_bases = [self.backend.get_vring_base(q) for q in (RX, TX)]
            for q, base in zip(self.queues, self.vring_bases):
                q["last_avail_idx"] = base
        return list(self.vring_bases)

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
    def state(self) -> dict:
        """Negotiation, rings and where they stand; exact after quiesce()."""
        bases = self._bases()
        return {"features": self.acked, "active": int(self.wiring is not None),
                "queues": [dict(q, last_avail_idx=b) for q, b in zip(self.queues, bases)],
                "status": self.link_status, "config": self.config(),
                "mac": self.mac or b"", "isr": self.isr()}

    def _bases(self) -> list[int]:
        if self.running:  # a live reading, for inspection; CPR quiesces first
            return [self.backend.get_vring_base(q) for q in (RX, TX)]
        return list(self.vring_bases)

    def set_state(self, d: dict) -> None:
        """Restore into an idle device; the transport's activate() then restarts the rings."""
        if self.owned:
            raise VmmError("virtio-net state must be restored into an idle device")
        if d["features"] & ~self.features & ~bit(F_MAC):
            raise VmmError(f"saved virtio-net state uses features {d['features']:#x} this "
                           f"pyvmm does not offer: update with the same pyvmm version")
        self.acked = d["features"]
        self.mac = bytes(d["mac"]) or None
        if self.mac is not None:
            self.features |= bit(F_MAC)
        self.link_status = d["status"]
        self.queues = [_queue_state(q) | {"last_avail_idx": q["last_avail_idx"]}
                       for q in d["queues"]]
        self.vring_bases = [q["last_avail_idx"] for q in d["queues"]]
        self.pending_isr = d["isr"]


def _queue_state(q=None) -> dict:
    """A queue's config as plain ints, from a transport Queue or a saved dict."""
    if q is None:
        return {"num": 0, "desc": 0, "avail": 0, "used": 0, "ready": 0, "last_avail_idx": 0}
    if isinstance(q, dict):
        return {k: q[k] for k in ("num", "desc", "avail", "used", "ready")}
    return {"num": q.num, "desc": q.desc, "avail": q.driver, "used": q.device,
            "ready": int(q.ready)}
