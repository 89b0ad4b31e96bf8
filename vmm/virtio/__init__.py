"""virtio: constants shared by the transport and the devices (virtio 1.2).

Only the split virtqueue and the virtio-mmio transport are implemented; the
device side (rings, buffers) lives in the data paths under vmm/net/.
"""

from __future__ import annotations

from ..devices import State
from ..schema import U16, U32, U64, Bool, Int


# Device status bits (§2.1).
ACKNOWLEDGE = 0x01
DRIVER = 0x02
DRIVER_OK = 0x04
FEATURES_OK = 0x08
DEVICE_NEEDS_RESET = 0x40
FAILED = 0x80

# Interrupt status bits (§4.2.2, InterruptStatus).
INT_VRING = 0x1
INT_CONFIG = 0x2

# Transport and ring feature bits (§6).
F_INDIRECT_DESC = 28
F_EVENT_IDX = 29
F_VERSION_1 = 32
F_ACCESS_PLATFORM = 33
F_RING_PACKED = 34


def bit(n: int) -> int:
    return 1 << n


class Queue(State):
    """One split virtqueue: what the driver told the transport (guest-physical
    addresses) and where the device stands in it (next_avail: the next available
    ring entry it will take, vhost's vring base).  The transport owns it, the
    device reads it on activation and writes next_avail when it quiesces, and it
    is saved once, with the transport (as rust-vmm virtio-queue's QueueState).
    `max_size` is the device's limit, not state."""

    VERSION = 1
    FIELDS = {"num": Int(0, U32), "ready": Bool(), "desc": Int(0, U64), "avail": Int(0, U64),
              "used": Int(0, U64), "next_avail": Int(0, U16)}

    def __init__(self, max_size: int = 0, num: int = 0, ready: bool = False, desc: int = 0,
                 avail: int = 0, used: int = 0, next_avail: int = 0):
        super().__init__(num=num, ready=ready, desc=desc, avail=avail, used=used,
                         next_avail=next_avail)
        self.max_size = max_size

    def reset(self) -> None:
        self.num = self.max_size
        self.ready = False
        self.desc = self.avail = self.used = self.next_avail = 0

    def set_state(self, saved: "Queue") -> None:
        for name in self.FIELDS:
            setattr(self, name, getattr(saved, name))
