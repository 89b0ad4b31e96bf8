"""virtio-mmio register semantics against a fake VM (records eventfd wiring) and real RAM."""

import os
import struct

import pytest

from vmm.memory import GuestMemory, MiB
from vmm.virtio import (ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK,
                        F_VERSION_1, INT_CONFIG, bit)
from vmm.virtio import mmio as M
from vmm.state import dumps, loads
from vmm.virtio.mmio import MmioState, VirtioMmio

BASE, GSI = 0xD000_0000, 5


class FakeVm:
    """The four eventfd calls of the KVM Vm, recorded."""

    def __init__(self):
        self.ioeventfds, self.irqfds, self.log = {}, {}, []

    def add_ioeventfd(self, addr, length, fd, datamatch=None):
        self.log.append(("add_ioeventfd", addr, length, datamatch))
        self.ioeventfds[(addr, length, datamatch)] = fd

    def remove_ioeventfd(self, addr, length, fd, datamatch=None):
        self.log.append(("remove_ioeventfd", addr, length, datamatch))
        assert self.ioeventfds.pop((addr, length, datamatch)) == fd

    def add_irqfd(self, fd, gsi):
        self.log.append(("add_irqfd", gsi))
        self.irqfds[gsi] = fd

    def remove_irqfd(self, fd, gsi):
        self.log.append(("remove_irqfd", gsi))
        assert self.irqfds.pop(gsi) == fd


class FakeDevice:
    device_id = 1
    features = bit(F_VERSION_1) | bit(5) | bit(16)
    queue_sizes = (256, 128)

    def __init__(self):
        self.config = bytearray(b"\x52\x54\x00\x12\x34\x56\x01\x00")
        self.activations, self.resets, self.acked = [], 0, None
        self.isr_bits, self.err, self.refuse = 0, None, False

    def read_config(self, offset, size):
        return bytes(self.config[offset:offset + size]).ljust(size, b"\0")

    def write_config(self, offset, data):
        self.config[offset:offset + len(data)] = data

    def ack_features(self, features):
        self.acked = features
        return not self.refuse

    def activate(self, mem, queues, kick_fds, call_fd):
        self.activations.append(([q.to_tree() for q in queues], kick_fds, call_fd))

    def reset(self):
        self.resets += 1

    def isr(self):
        return self.isr_bits

    def isr_ack(self, bits):
        self.isr_bits &= ~bits

    def error(self):
        return self.err



@pytest.fixture
def mem():
    m = GuestMemory(16 * MiB)
    yield m
    m.close()


@pytest.fixture
def dev(mem):
    vm, device = FakeVm(), FakeDevice()
    t = VirtioMmio(device, BASE, GSI, vm, mem)
    yield t
    t.close()


def rd(t, off):
    return struct.unpack("<I", t.read(off, 4))[0]


def wr(t, off, value):
    t.write(off, struct.pack("<I", value))


def negotiate(t, features=None):
    features = t.device.features if features is None else features
    wr(t, M.STATUS, ACKNOWLEDGE)
    wr(t, M.STATUS, ACKNOWLEDGE | DRIVER)
    for sel in (0, 1):
        wr(t, M.DRIVER_FEATURES_SEL, sel)
        wr(t, M.DRIVER_FEATURES, features >> (32 * sel) & 0xFFFFFFFF)
    wr(t, M.STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK)
    return rd(t, M.STATUS)


def setup_queue(t, index, num, desc, driver, device):
    wr(t, M.QUEUE_SEL, index)
    wr(t, M.QUEUE_NUM, num)
    for reg, addr in ((M.QUEUE_DESC_LOW, desc), (M.QUEUE_DRIVER_LOW, driver),
                      (M.QUEUE_DEVICE_LOW, device)):
        wr(t, reg, addr & 0xFFFFFFFF)
        wr(t, reg + 4, addr >> 32)
    wr(t, M.QUEUE_READY, 1)


def bring_up(t):
    assert negotiate(t) & FEATURES_OK
    setup_queue(t, 0, 256, 0x10000, 0x11000, 0x12000)
    setup_queue(t, 1, 128, 0x20000, 0x21000, 0x22000)
    wr(t, M.STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)


def test_identity_registers(dev):
    assert rd(dev, M.MAGIC_VALUE) == 0x74726976
    assert rd(dev, M.VERSION_REG) == 2
    assert rd(dev, M.DEVICE_ID) == 1
    assert rd(dev, M.VENDOR_ID_REG) == M.VENDOR_ID
    assert dev.cmdline() == "virtio_mmio.device=4K@0xd0000000:5"


def test_device_features_by_selector(dev):
    feats = dev.device.features
    for sel in (0, 1, 2):
        wr(dev, M.DEVICE_FEATURES_SEL, sel)
        assert rd(dev, M.DEVICE_FEATURES) == (feats >> (32 * sel) & 0xFFFFFFFF if sel < 2 else 0)


def test_odd_sized_register_access_is_ignored(dev):
    assert dev.read(M.MAGIC_VALUE, 2) == b"\0\0"
    dev.write(M.STATUS, b"\x01")
    assert rd(dev, M.STATUS) == 0


def test_negotiation_accepts_subset(dev):
    assert negotiate(dev, bit(F_VERSION_1) | bit(5)) == ACKNOWLEDGE | DRIVER | FEATURES_OK
    assert dev.device.acked == bit(F_VERSION_1) | bit(5)
    # Features are frozen once FEATURES_OK is set.
    wr(dev, M.DRIVER_FEATURES_SEL, 0)
    wr(dev, M.DRIVER_FEATURES, 0)
    assert dev.driver_features == bit(F_VERSION_1) | bit(5)


@pytest.mark.parametrize("features", [bit(5), bit(F_VERSION_1) | bit(7)])
def test_features_ok_refused(dev, features):
    """No VERSION_1, or a feature never offered: FEATURES_OK does not stick."""
    assert negotiate(dev, features) == ACKNOWLEDGE | DRIVER


def test_features_ok_refused_by_device(dev):
    dev.device.refuse = True
    assert negotiate(dev) == ACKNOWLEDGE | DRIVER


def test_driver_features_need_driver_status(dev):
    wr(dev, M.DRIVER_FEATURES, 0xFFFF)
    assert dev.driver_features == 0


def test_status_cannot_clear_bits_or_skip_features_ok(dev):
    wr(dev, M.STATUS, ACKNOWLEDGE | DRIVER)
    wr(dev, M.STATUS, ACKNOWLEDGE)
    assert rd(dev, M.STATUS) == ACKNOWLEDGE | DRIVER
    wr(dev, M.STATUS, ACKNOWLEDGE | DRIVER | DRIVER_OK)
    assert rd(dev, M.STATUS) == ACKNOWLEDGE | DRIVER
    assert not dev.device.activations
    wr(dev, M.STATUS, ACKNOWLEDGE | DRIVER | FAILED)
    assert rd(dev, M.STATUS) == ACKNOWLEDGE | DRIVER | FAILED


def test_queue_setup(dev):
    wr(dev, M.QUEUE_SEL, 1)
    assert rd(dev, M.QUEUE_NUM_MAX) == 128
    wr(dev, M.QUEUE_SEL, 7)
    assert rd(dev, M.QUEUE_NUM_MAX) == 0
    negotiate(dev)
    setup_queue(dev, 0, 64, 0x1_0000_1000, 0x2000, 0x3000)
    q = dev.queues[0]
    assert (q.num, q.desc, q.avail, q.used, q.ready) == (64, 0x1_0000_1000, 0x2000, 0x3000, True)
    assert rd(dev, M.QUEUE_READY) == 1
    wr(dev, M.QUEUE_NUM, 32)  # a ready queue is frozen
    assert q.num == 64
    wr(dev, M.QUEUE_READY, 0)
    wr(dev, M.QUEUE_NUM, 32)
    assert q.num == 32


def test_queue_registers_ignored_before_features_ok(dev):
    wr(dev, M.QUEUE_NUM, 8)
    assert dev.queues[0].num == 256


def test_driver_ok_wires_eventfds_and_activates(dev):
    bring_up(dev)
    vm, device = dev.vm, dev.device
    assert rd(dev, M.STATUS) == ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
    assert sorted(vm.ioeventfds) == [(BASE + 0x50, 4, 0), (BASE + 0x50, 4, 1)]
    assert list(vm.irqfds) == [GSI]
    queues, kicks, call = device.activations[0]
    assert queues[0] == {"num": 256, "ready": True, "desc": 0x10000, "avail": 0x11000,
                         "used": 0x12000, "next_avail": 0}
    assert kicks == [vm.ioeventfds[(BASE + 0x50, 4, 0)], vm.ioeventfds[(BASE + 0x50, 4, 1)]]
    assert call == vm.irqfds[GSI]
    for fd in kicks + [call]:
        assert not os.get_inheritable(fd)
    # A QueueNotify that reached Python (no ioeventfd match) still kicks the queue.
    wr(dev, M.QUEUE_NOTIFY, 1)
    assert os.eventfd_read(kicks[1]) == 1
    with pytest.raises(BlockingIOError):
        os.eventfd_read(kicks[0])


def test_reset_on_status_zero(dev):
    bring_up(dev)
    wr(dev, M.STATUS, 0)
    assert dev.device.resets == 1
    assert not dev.vm.ioeventfds and not dev.vm.irqfds
    assert rd(dev, M.STATUS) == 0
    assert dev.driver_features == 0
    assert all(not q.ready for q in dev.queues)
    # and it can come up again
    bring_up(dev)
    assert len(dev.device.activations) == 2


def test_bad_queue_sets_needs_reset(dev):
    negotiate(dev)
    setup_queue(dev, 0, 100, 0x10000, 0x11000, 0x12000)  # not a power of two
    wr(dev, M.STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
    assert rd(dev, M.STATUS) & DEVICE_NEEDS_RESET
    assert not dev.device.activations
    wr(dev, M.STATUS, 0)
    assert rd(dev, M.STATUS) == 0


def test_queue_outside_ram_sets_needs_reset(dev):
    negotiate(dev)
    setup_queue(dev, 0, 256, 0x10000, 0x11000, 0xF000_0000)
    wr(dev, M.STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
    assert rd(dev, M.STATUS) & DEVICE_NEEDS_RESET
    assert rd(dev, M.INTERRUPT_STATUS) & INT_CONFIG


def test_device_error_shows_needs_reset(dev):
    bring_up(dev)
    dev.device.err = "descriptor loop"
    assert rd(dev, M.STATUS) & DEVICE_NEEDS_RESET
    wr(dev, M.STATUS, rd(dev, M.STATUS))  # writing NEEDS_RESET back is harmless
    assert rd(dev, M.STATUS) & DRIVER_OK


def test_interrupt_status_and_ack(dev):
    dev.device.isr_bits = 3
    assert rd(dev, M.INTERRUPT_STATUS) == 3
    wr(dev, M.INTERRUPT_ACK, 1)
    assert rd(dev, M.INTERRUPT_STATUS) == 2
    dev.config_changed()
    assert rd(dev, M.CONFIG_GENERATION) == 1


def test_config_space(dev):
    assert dev.read(M.CONFIG, 6) == b"\x52\x54\x00\x12\x34\x56"
    assert dev.read(M.CONFIG + 6, 2) == b"\x01\x00"
    dev.write(M.CONFIG + 0, b"\xaa")
    assert dev.read(M.CONFIG, 1) == b"\xaa"


def test_state_round_trip_reactivates(mem):
    vm = FakeVm()
    old = VirtioMmio(FakeDevice(), BASE, GSI, vm, mem)
    bring_up(old)
    wr(old, M.QUEUE_SEL, 1)
    old.queues[0].next_avail, old.queues[1].next_avail = 3, 9   # (as a device's quiesce)
    saved = MmioState.from_tree(loads(dumps({"t": old.save().to_tree()}))["t"])
    old.close()

    vm2, dev2 = FakeVm(), FakeDevice()
    new = VirtioMmio(dev2, BASE, GSI, vm2, mem)
    new.restore(saved)
    try:
        assert new.save() == saved
        assert len(dev2.activations) == 1
        assert [q["next_avail"] for q in dev2.activations[0][0]] == [3, 9]
        _, kicks, call = dev2.activations[0]
        assert sorted(vm2.ioeventfds) == [(BASE + 0x50, 4, 0), (BASE + 0x50, 4, 1)]
        # kicks lost during the handover are replayed once
        assert [os.eventfd_read(k) for k in kicks] == [1, 1]
    finally:
        new.close()


def test_state_of_idle_device_round_trips(dev, mem):
    negotiate(dev)
    saved = dev.save()
    new = VirtioMmio(FakeDevice(), BASE, GSI, FakeVm(), mem)
    new.restore(saved)
    assert new.save() == saved
    assert not new.device.activations
