"""Real taps, made inside a network namespace of the test's own (removed afterwards)."""

import ctypes
import os
import subprocess
import threading
import time
import uuid

import pytest

from vmm.errors import DeviceError

tap_mod = pytest.importorskip("vmm.net.tap", reason="build vmm/net/_build_tun.py first")
Tap = tap_mod.Tap

CLONE_NEWNET = 0x40000000

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="taps and netns need root"),
    pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="no /dev/net/tun on this host"),
]


def _setns(fd):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")


@pytest.fixture
def netns():
    """Move this thread into a fresh netns; come back and delete it afterwards."""
    name = f"pyvmm-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    home = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    try:
        ns = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            _setns(ns)
        finally:
            os.close(ns)
        try:
            yield name
        finally:
            _setns(home)
    finally:
        os.close(home)
        subprocess.run(["ip", "netns", "del", name], check=True)


def ip(ns, *args):
    return subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True, text=True).stdout


def links(ns):
    return ip(ns, "-o", "link")


def test_create_named(netns):
    with Tap.create("pv0") as tap:
        assert tap.name == "pv0"
        assert tap.vnet_hdr_len() == 12
        assert os.get_blocking(tap.fd) is False
        assert os.get_inheritable(tap.fd) is False
        assert "pv0" in links(netns)
        tap.set_offloads((1 << 1) | (1 << 7) | (1 << 8) | (1 << 9) | (1 << 10))
        tap.set_offloads(0)
    assert "pv0" not in links(netns)


def test_create_kernel_name(netns):
    with Tap.create() as tap:
        assert tap.name.startswith("tap")
        assert tap.name in links(netns)


def test_create_existing_name_fails(netns):
    ip(netns, "tuntap", "add", "dev", "pv1", "mode", "tap")
    with pytest.raises(DeviceError, match="already exists"):
        Tap.create("pv1")


def test_open_by_name(netns):
    ip(netns, "tuntap", "add", "dev", "pv2", "mode", "tap", "vnet_hdr")
    with Tap.open("pv2") as tap:
        assert tap.name == "pv2"
        assert tap.vnet_hdr_len() == 12
        with pytest.raises(DeviceError, match="busy"):
            Tap.open("pv2")
    assert "pv2" in links(netns)  # persistent: ours to attach to, not to delete


def test_open_missing_or_bad_names(netns):
    with pytest.raises(DeviceError, match="ip tuntap add"):
        Tap.open("nosuchtap")
    for bad in ("", "x" * 16, "a/b", "a b"):
        with pytest.raises(DeviceError, match="bad interface name"):
            Tap.create(bad)
    with pytest.raises(DeviceError, match="not a tap"):
        Tap.open("lo")


def test_from_fd_keeps_vnet_hdr_size(netns, monkeypatch):
    tap = Tap.create("pv3")
    try:
        fd = os.dup(tap.fd)
        calls = []
        real_ioctl = tap_mod.fcntl.ioctl

        def spy(fd_, req, *args):
            calls.append(req)
            return real_ioctl(fd_, req, *args)
        monkeypatch.setattr(tap_mod.fcntl, "ioctl", spy)
        adopted = Tap.from_fd(fd)
        monkeypatch.undo()
        assert adopted.name == "pv3"
        assert adopted.vnet_hdr_len() == 12
        assert tap_mod.lib.TUNSETVNETHDRSZ not in calls
        assert tap_mod.lib.TUNSETIFF not in calls
        adopted.close()
    finally:
        tap.close()


def test_from_fd_fixes_wrong_vnet_hdr_size(netns):
    import fcntl
    import struct
    with Tap.create("pv4") as tap:
        fcntl.ioctl(tap.fd, tap_mod.lib.TUNSETVNETHDRSZ, struct.pack("i", 10))
        adopted = Tap.from_fd(os.dup(tap.fd))
        assert adopted.vnet_hdr_len() == 12
        adopted.close()


def test_from_fd_rejects_non_tap(netns):
    r, w = os.pipe()
    try:
        with pytest.raises(DeviceError, match="not a tap"):
            Tap.from_fd(r)
    finally:
        os.close(r)
        os.close(w)


def _wait_for(pred, timeout=3.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def test_link_up_follows_ip_link(netns):
    with Tap.create("pv5") as tap:
        assert not tap.link_up()
        ip(netns, "link", "set", "pv5", "up")
        assert _wait_for(tap.link_up)
        ip(netns, "link", "set", "pv5", "down")
        assert _wait_for(lambda: not tap.link_up())
