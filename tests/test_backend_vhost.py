"""vhost-net behind the common backend API.

Most of this needs /dev/vhost-net (modprobe vhost_net) and root; without it
only the error a user would see and the ioctls' layout are checked.  Moving frames
through a tap is in test_datapath.py::test_real_tap_in_netns[vhost].
"""

import os
import struct

import pytest

from vmm.errors import DeviceError

vhost = pytest.importorskip("vmm.net.backend_vhost", reason="build vmm/net/_build_vhost.py first")
VhostNetBackend = vhost.VhostNetBackend

HAVE_VHOST = os.path.exists("/dev/vhost-net")
needs_vhost = pytest.mark.skipif(not HAVE_VHOST, reason="no /dev/vhost-net on this host")


def test_missing_device_says_what_to_do(tmp_path):
    with pytest.raises(DeviceError, match=r"not found: load the vhost_net module "
                                          r"\(modprobe vhost_net\) or use the C data path"):
        VhostNetBackend(path=str(tmp_path / "vhost-net"))


def test_ioctl_numbers_come_from_the_header():
    lib = vhost.lib
    assert lib.VHOST_SET_OWNER == 0xAF01
    assert lib.VHOST_GET_VRING_BASE != lib.VHOST_SET_VRING_BASE
    assert vhost.ffi.sizeof("struct vhost_memory_region") == 32


class FakeVhost:
    """Stands in for the kernel: records each ioctl and its argument bytes."""

    def __init__(self):
        self.calls = []

    def __call__(self, fd, request, arg=0, *rest):
        lib = vhost.lib
        self.calls.append((request, bytes(arg) if not isinstance(arg, int) else arg))
        if request == lib.VHOST_GET_FEATURES:
            arg[:] = struct.pack("<Q", 1 << 32 | 1 << 15 | 1 << 28 | 1 << 29)
        if request == lib.VHOST_GET_VRING_BASE:
            index = struct.unpack_from("<I", arg)[0]
            arg[:] = struct.pack("<II", index, 7 + index)
        return 0

    def of(self, request):
        return [a for r, a in self.calls if r == request]


def test_ioctl_sequence(tmp_path, monkeypatch):
    """Every method reaches the kernel with the layout the header defines (no vhost needed)."""
    fake = FakeVhost()
    monkeypatch.setattr(vhost.fcntl, "ioctl", fake)
    node = tmp_path / "vhost-net"
    node.write_bytes(b"")
    lib = vhost.lib
    b = VhostNetBackend(path=str(node))
    b.set_owner()
    b.set_mem_table([(0, 0x10000, 0x7F0000000000), (1 << 32, 0x1000, 0x7F1000000000)])
    b.set_features(1 << 32 | 1 << 15 | 1 << 1 | 1 << 7)  # offload bits are the tap's, not vhost's
    b.set_vring_num(1, 256)
    b.set_vring_addr(1, 0x1000, 0x2000, (1 << 32) + 0x40)
    b.set_vring_base(1, 3)
    b.set_vring_kick(1, 10)
    b.set_vring_call(1, 11)
    with pytest.raises(DeviceError, match="12-byte vnet header"):
        b.set_backend(12, 10)
    b.set_backend(12, 12)
    b.start()
    b.stop()
    assert b.get_vring_base(1) == 8
    b.reset_owner()
    with pytest.raises(DeviceError, match="outside the memory table"):
        b.set_vring_addr(0, 0x1000, 0x2000, 0x3000)
    b.close()

    assert fake.of(lib.VHOST_SET_FEATURES) == [struct.pack("<Q", 1 << 32 | 1 << 15)]
    table = fake.of(lib.VHOST_SET_MEM_TABLE)[0]
    assert struct.unpack_from("<II", table) == (2, 0)
    assert struct.unpack_from("<4Q", table, 8 + 32) == (1 << 32, 0x1000, 0x7F1000000000, 0)
    assert fake.of(lib.VHOST_SET_VRING_ADDR) == [struct.pack(
        "<IIQQQQ", 1, 0, 0x7F0000001000, 0x7F1000000040, 0x7F0000002000, 0)]
    assert fake.of(lib.VHOST_SET_VRING_BASE) == [struct.pack("<II", 1, 3)]
    assert fake.of(lib.VHOST_SET_VRING_KICK) == [struct.pack("<Ii", 1, 10)]
    assert fake.of(lib.VHOST_NET_SET_BACKEND) == [struct.pack("<Ii", q, fd) for fd in (12, -1)
                                                  for q in (0, 1)]
    assert len(fake.of(lib.VHOST_SET_VRING_ERR)) == 2
    assert fake.of(lib.VHOST_RESET_OWNER) == [0]


@needs_vhost
def test_owner_and_features():
    b = VhostNetBackend()
    try:
        b.set_owner()
        with pytest.raises(DeviceError, match="already has an owner"):
            b.set_owner()
        b.set_features(b.supported | 1 << 5)  # unknown bits are filtered, not refused
        assert b.error() is None
        assert b.isr_read() == 1
        b.reset_owner()
        b.set_owner()
    finally:
        b.close()
