"""The virtio-mmio transport, version 2 (virtio 1.2 §4.2.2).

The transport owns the registers and the feature/status handshake; the device
behind it owns its config space and its data path.  When the driver sets
DRIVER_OK the transport wires the fast path and steps out of it: one kick
eventfd per queue becomes a KVM ioeventfd on QueueNotify (matched on the queue
index), one call eventfd becomes a KVM irqfd on the device's GSI, and the
device (or its C/vhost backend) then talks to the guest without a VM exit
reaching Python.

Device protocol (duck-typed): `device_id`, `features` (offered), `queue_sizes`
(max size per queue), `read_config(offset, size) -> bytes`,
`write_config(offset, data)`, `ack_features(features) -> bool`,
`activate(mem, queues, kick_fds, call_fd)`, `reset()`, `isr() -> int`,
`isr_ack(bits)`, `error() -> str | None`; optionally `python_queues` (the indices
of queues whose kicks come to Python: no eventfd, no ioeventfd, the QueueNotify write
exits to the VMM, which calls `notify(index)` in the vCPU thread; for rare messages,
e.g. virtio-net's control queue; their kick_fds entry is -1).  The queues are the
transport's (Queue objects, given to activate()); the device writes where it stands
in them (next_avail) when it stops, and they are saved once, here.
"""

from __future__ import annotations

import os
import struct
import threading

from ..devices import State
from ..errors import VmmError
from ..log import get_logger
from ..schema import U32, U64, Int, List, Str
from . import (ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, F_VERSION_1, FAILED,
               FEATURES_OK, INT_CONFIG, Queue, bit)

log = get_logger(__name__)

MMIO_SIZE = 0x1000
MAGIC = 0x74726976  # "virt"
VERSION = 2
VENDOR_ID = 0x554D4551  # "QEMU", which Linux and firmware already know

# Register offsets.
MAGIC_VALUE = 0x000
VERSION_REG = 0x004
DEVICE_ID = 0x008
VENDOR_ID_REG = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_DRIVER_LOW = 0x090
QUEUE_DRIVER_HIGH = 0x094
QUEUE_DEVICE_LOW = 0x0A0
QUEUE_DEVICE_HIGH = 0x0A4
SHM_SEL = 0x0AC
SHM_LEN_LOW = 0x0B0
SHM_LEN_HIGH = 0x0B4
SHM_BASE_LOW = 0x0B8
SHM_BASE_HIGH = 0x0BC
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

# The driver area is the available ring, the device area the used ring.
_QUEUE_ADDRS = {QUEUE_DESC_LOW: "desc", QUEUE_DRIVER_LOW: "avail", QUEUE_DEVICE_LOW: "used"}


class MmioState(State):
    """The transport's registers and its queues (the device's own state is apart)."""
    VERSION = 1
    FIELDS = {"status": Int(0, U32), "device_features_sel": Int(0, U32),
              "driver_features_sel": Int(0, U32), "driver_features": Int(0, U64),
              "queue_sel": Int(0, U32), "queues": List(Queue, 16),
              "config_generation": Int(0, U32), "isr": Int(0, U32), "failure": Str()}


class VirtioMmio:
    """One virtio-mmio device window of 4 KiB at `base`, interrupting on `gsi`."""

    def __init__(self, device, base: int, gsi: int, vm, mem):
        self.device = device
        self.base = base
        self.gsi = gsi
        self.vm = vm
        self.mem = mem
        self.queues = [Queue(size) for size in device.queue_sizes]
        self.kick_fds: list[int] = []
        self.call_fd = -1
        self.isr_lock = threading.Lock()   # isr_extra: the vCPU's acks, config_changed()'s sets
        self._reset_registers()
        self.config_generation = 0

    def _reset_registers(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.isr_extra = 0      # interrupt bits raised by the transport itself
        self.failure = ""       # why the transport set DEVICE_NEEDS_RESET
        for q in self.queues:
            q.reset()

    def cmdline(self) -> str:
        """The Linux kernel parameter that makes the guest probe this device."""
        return f"virtio_mmio.device=4K@{self.base:#x}:{self.gsi}"

    @property
    def activated(self) -> bool:
        return self.call_fd >= 0

    # -- bus protocol ------------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        if offset >= CONFIG:
            return self.device.read_config(offset - CONFIG, size)
        if size != 4 or offset % 4:
            log.debug("virtio-mmio: %d-byte read at %#x ignored", size, offset)
            return bytes(size)
        return struct.pack("<I", self._read32(offset) & 0xFFFFFFFF)

    def write(self, offset: int, data: bytes) -> None:
        if offset >= CONFIG:
            self.device.write_config(offset - CONFIG, bytes(data))
            return
        if len(data) != 4 or offset % 4:
            log.debug("virtio-mmio: %d-byte write at %#x ignored", len(data), offset)
            return
        self._write32(offset, struct.unpack("<I", data)[0])

    # -- registers -----------------------------------------------------------------
    def _read32(self, offset: int) -> int:
        q = self._queue()
        if offset == MAGIC_VALUE:
            return MAGIC
        if offset == VERSION_REG:
            return VERSION
        if offset == DEVICE_ID:
            return self.device.device_id
        if offset == VENDOR_ID_REG:
            return VENDOR_ID
        if offset == DEVICE_FEATURES:
            return self.device.features >> (32 * self.device_features_sel) if \
                self.device_features_sel < 2 else 0
        if offset == QUEUE_NUM_MAX:
            return q.max_size if q else 0
        if offset == QUEUE_READY:
            return int(q.ready) if q else 0
        if offset == INTERRUPT_STATUS:
            return self.device.isr() | self.isr_extra
        if offset == STATUS:
            return self.status | (DEVICE_NEEDS_RESET if self.needs_reset() else 0)
        if offset in (SHM_LEN_LOW, SHM_LEN_HIGH):
            return 0xFFFFFFFF  # no shared memory regions
        if offset == CONFIG_GENERATION:
            return self.config_generation
        return 0  # write-only or reserved registers read as zero

    def _write32(self, offset: int, value: int) -> None:
        if offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == DRIVER_FEATURES:
            if self.status & DRIVER and not self.status & FEATURES_OK and \
                    self.driver_features_sel < 2:
                shift = 32 * self.driver_features_sel
                self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | \
                    (value << shift)
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        elif offset == QUEUE_NOTIFY:
            self._notify(value)
        elif offset == INTERRUPT_ACK:
            self.device.isr_ack(value)
            with self.isr_lock:
                self.isr_extra &= ~value
        elif offset == STATUS:
            self._set_status(value)
        elif offset in (QUEUE_NUM, QUEUE_READY) or offset in _QUEUE_ADDRS or \
                offset - 4 in _QUEUE_ADDRS:
            self._write_queue(offset, value)
        else:
            log.debug("virtio-mmio: write %#x to read-only/reserved %#x ignored", value, offset)

    def _queue(self) -> Queue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _write_queue(self, offset: int, value: int) -> None:
        q = self._queue()
        # Queues are set up between FEATURES_OK and DRIVER_OK, and a ready queue is frozen.
        if q is None or not self.status & FEATURES_OK or self.status & DRIVER_OK:
            return
        if offset == QUEUE_READY:
            q.ready = bool(value & 1)
        elif q.ready:
            return
        elif offset == QUEUE_NUM:
            q.num = value
        else:
            name = _QUEUE_ADDRS.get(offset) or _QUEUE_ADDRS[offset - 4]
            shift = 0 if offset in _QUEUE_ADDRS else 32
            old = getattr(q, name)
            setattr(q, name, (old & ~(0xFFFFFFFF << shift)) | (value << shift))

    def _notify(self, index: int) -> None:
        """A kick KVM did not turn into an eventfd signal (e.g. before DRIVER_OK): forward it;
        a python queue's goes to the device itself."""
        if not self.activated or index >= len(self.kick_fds):
            return
        if self.kick_fds[index] < 0:
            self.device.notify(index)
        else:
            os.eventfd_write(self.kick_fds[index], 1)

    # -- status machine -------------------------------------------------------------
    def needs_reset(self) -> bool:
        return bool(self.failure) or self.device.error() is not None

    def _set_status(self, value: int) -> None:
        value &= 0xFF & ~DEVICE_NEEDS_RESET
        if value == 0:
            self.reset()
            return
        if self.status & ~value:
            log.debug("virtio-mmio: status %#x -> %#x clears bits; ignored", self.status, value)
            return
        new = value & ~self.status
        if new & FAILED:
            self.status |= FAILED
            new &= ~FAILED
        if new & DRIVER and not (self.status | value) & ACKNOWLEDGE:
            return
        if new & FEATURES_OK:
            if not value & DRIVER or not self._features_ok():
                new &= ~FEATURES_OK  # refused: the driver reads the status back and gives up
        if new & DRIVER_OK and not (self.status | new) & FEATURES_OK:
            return
        self.status |= new & ~DRIVER_OK
        if new & DRIVER_OK:
            self.status |= DRIVER_OK
            self._activate()

    def _features_ok(self) -> bool:
        feats = self.driver_features
        if feats & ~self.device.features:
            log.info("virtio-mmio: driver asked for unoffered features %#x",
                     feats & ~self.device.features)
            return False
        if not feats & bit(F_VERSION_1):
            log.info("virtio-mmio: driver did not accept VIRTIO_F_VERSION_1")
            return False
        return bool(self.device.ack_features(feats))

    def _check_queues(self) -> None:
        for i, q in enumerate(self.queues):
            if not q.ready:
                continue
            if not 0 < q.num <= q.max_size or q.num & (q.num - 1):
                raise VmmError(f"queue {i}: size {q.num} is not a power of two up to {q.max_size}")
            for name, align, length in (("desc", 16, 16 * q.num), ("avail", 2, 6 + 2 * q.num),
                                        ("used", 4, 6 + 8 * q.num)):
                addr = getattr(q, name)
                if addr % align or not self.mem.contains(addr, length):
                    raise VmmError(f"queue {i}: {name} area {addr:#x}+{length:#x} is misaligned "
                                   f"or outside guest RAM")

    def _activate(self, *, restoring: bool = False) -> None:
        """DRIVER_OK: wire eventfds into KVM, then hand the rings to the device."""
        try:
            self._check_queues()
        except VmmError as e:
            self._fail(str(e))
            return
        flags = os.EFD_CLOEXEC | os.EFD_NONBLOCK
        self.call_fd = os.eventfd(0, flags)
        python = getattr(self.device, "python_queues", ())
        self.kick_fds = [-1 if i in python else os.eventfd(0, flags)
                         for i in range(len(self.queues))]
        for i, fd in enumerate(self.kick_fds):
            if fd >= 0:
                self.vm.add_ioeventfd(self.base + QUEUE_NOTIFY, 4, fd, datamatch=i)
        self.vm.add_irqfd(self.call_fd, self.gsi)
        try:
            self.device.activate(self.mem, self.queues, list(self.kick_fds), self.call_fd)
        except VmmError as e:
            self._fail(f"activation failed: {e}")
            return
        if restoring:
            # Kicks that reached the old VMM after it stopped were lost with it: look again.
            # (A python queue's kick was handled in the vCPU's exit, before the stop.)
            for fd in self.kick_fds:
                if fd >= 0:
                    os.eventfd_write(fd, 1)

    def _fail(self, why: str) -> None:
        """Show DEVICE_NEEDS_RESET and tell the driver through a config interrupt."""
        log.warning("virtio-mmio at %#x: %s", self.base, why)
        self.failure = why
        self.isr_extra |= INT_CONFIG
        if self.call_fd >= 0:
            os.eventfd_write(self.call_fd, 1)

    def config_changed(self) -> None:
        """The device's config space changed (e.g. link status): bump generation, interrupt.
        (From any thread: e.g. the announcement's, after a migration.)"""
        with self.isr_lock:
            self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
            self.isr_extra |= INT_CONFIG
        if self.call_fd >= 0:
            os.eventfd_write(self.call_fd, 1)

    def reset(self) -> None:
        """Status 0: the device lets go of the rings, the eventfds leave KVM."""
        self.device.reset()
        self._teardown()
        self._reset_registers()

    def _teardown(self) -> None:
        for i, fd in enumerate(self.kick_fds):
            if fd >= 0:
                self.vm.remove_ioeventfd(self.base + QUEUE_NOTIFY, 4, fd, datamatch=i)
                os.close(fd)
        self.kick_fds = []
        if self.call_fd >= 0:
            self.vm.remove_irqfd(self.call_fd, self.gsi)
            os.close(self.call_fd)
            self.call_fd = -1

    def close(self) -> None:
        """Unwire the eventfds without touching the device (it may live on in a new VMM)."""
        self._teardown()

    # -- state ------------------------------------------------------------------------
    def save(self) -> MmioState:
        """Registers and queues (take it after the device quiesced: next_avail is exact)."""
        return MmioState(status=self.status, device_features_sel=self.device_features_sel,
                         driver_features_sel=self.driver_features_sel,
                         driver_features=self.driver_features, queue_sel=self.queue_sel,
                         queues=[Queue(**{n: getattr(q, n) for n in Queue.FIELDS})
                                 for q in self.queues],
                         config_generation=self.config_generation, isr=self.isr_extra,
                         failure=self.failure)

    def restore(self, saved: MmioState) -> None:
        """Restore into a fresh transport, after the device's own state; a live device is
        re-activated on new eventfds."""
        if self.activated:
            raise VmmError("virtio-mmio state must be restored into a fresh device")
        if len(saved.queues) != len(self.queues):
            raise VmmError(f"saved virtio device has {len(saved.queues)} queues, "
                           f"this one has {len(self.queues)}")
        self.status = saved.status
        self.device_features_sel = saved.device_features_sel
        self.driver_features_sel = saved.driver_features_sel
        self.driver_features = saved.driver_features
        self.queue_sel = saved.queue_sel
        for q, qs in zip(self.queues, saved.queues):
            q.set_state(qs)
        self.config_generation = saved.config_generation
        self.isr_extra = saved.isr
        self.failure = saved.failure
        if self.status & DRIVER_OK and not self.failure:
            self._activate(restoring=True)
