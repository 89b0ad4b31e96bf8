"""virtio: constants shared by the transport and the devices (virtio 1.2).

Only the split virtqueue and the virtio-mmio transport are implemented; the
device side (rings, buffers) lives in the data paths under vmm/net/.
"""

from __future__ import annotations


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


class Queue:
    """What the driver told the transport about one split virtqueue (guest-physical addresses)."""

    __slots__ = ("max_size", "num", "ready", "desc", "driver", "device")

    def __init__(self, max_size: int, num: int = 0, ready: bool = False, desc: int = 0,
                 driver: int = 0, device: int = 0):
        self.max_size, self.num, self.ready = max_size, num, ready
        self.desc = desc
        self.driver = driver   # the available ring
        self.device = device   # the used ring

    def __repr__(self):
        return (f"Queue(max_size={self.max_size}, num={self.num}, ready={self.ready}, "
                f"desc={self.desc:#x}, driver={self.driver:#x}, device={self.device:#x})")

    def reset(self) -> None:
        self.num = self.max_size
        self.ready = False
        self.desc = self.driver = self.device = 0

    def state(self) -> dict:
        return {"num": self.num, "ready": int(self.ready), "desc": self.desc,
                "driver": self.driver, "device": self.device}

    def set_state(self, d: dict) -> None:
        self.num, self.ready = d["num"], bool(d["ready"])
        self.desc, self.driver, self.device = d["desc"], d["driver"], d["device"]
