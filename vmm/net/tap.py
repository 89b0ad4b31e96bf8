"""A Linux tap device carrying virtio-net headers.

The tap is opened with IFF_VNET_HDR and a 12-byte header (virtio_net_hdr_v1,
num_buffers included), so frames move between the tap and the guest's rings
without rewriting headers, and checksum/segmentation offloads pass straight
through.

A live update (CPR) hands the tap fd to the new VMM, so `Tap.from_fd` only
reads the fd's settings and changes nothing that is already right: QEMU once
reset the vnet header size on such an fd and corrupted packets in flight.

`socket` is imported inside functions on purpose: a cpr-exec's new image reopens
the tap on its resume path (every import there is downtime) and never needs it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from ..errors import DeviceError
from . import VNET_HDR_LEN

try:
    from . import _tun
except ImportError as e:  # pragma: no cover - only without a build
    raise DeviceError("pyvmm's tap binding is not built: run `python3 vmm/net/_build_tun.py` "
                      "or `pip install -e .`") from e

lib = _tun.lib

TUN_PATH = "/dev/net/tun"

# virtio-net feature bits that map to tap offloads (virtio 1.2 §5.1.3).
_GUEST_CSUM, _GUEST_TSO4, _GUEST_TSO6, _GUEST_ECN, _GUEST_UFO = 1, 7, 8, 9, 10


class Tap:
    """An open tap fd (non-blocking, close-on-exec) and the name of its interface."""

    def __init__(self, fd: int, name: str):
        self.fd = fd
        self.name = name

    # -- the three ways to get one -----------------------------------------------
    @classmethod
    def create(cls, name: str | None = None) -> "Tap":
        """A new tap; the kernel picks a name (tapN) when `name` is None."""
        if name is not None:
            _check_name(name)
            if _exists(name):
                raise DeviceError(f"network interface {name} already exists: pick another "
                                  f"name or attach to it with --tap {name}")
        return cls._setiff(name or "tap%d", creating=True)

    @classmethod
    def open(cls, name: str) -> "Tap":
        """Attach to an existing tap, e.g. one made by `ip tuntap add dev NAME mode tap`."""
        _check_name(name)
        if not _exists(name):
            raise DeviceError(f"no network interface {name}: create it with "
                              f"`ip tuntap add dev {name} mode tap`")
        return cls._setiff(name, creating=False)

    @classmethod
    def from_fd(cls, fd: int) -> "Tap":
        """Adopt a tap fd opened by someone else (a management tool, or the old VMM in a CPR).

        The vnet header size is set only if it is not already 12: an fd that
        carries traffic keeps its settings.
        """
        try:
            ifr = _ifreq()
            fcntl.ioctl(fd, lib.TUNGETIFF, ifr)
        except OSError as e:
            raise DeviceError(f"fd {fd} is not a tap device ({e.strerror}): pass an fd "
                              f"opened on {TUN_PATH} and attached with TUNSETIFF") from e
        name, flags = _unpack(ifr)
        if not flags & lib.IFF_TAP:
            raise DeviceError(f"fd {fd} ({name}) is a tun, not a tap: create it with mode tap")
        if not flags & lib.IFF_VNET_HDR:
            raise DeviceError(f"tap fd {fd} ({name}) was opened without IFF_VNET_HDR: "
                              f"reopen it with vnet_hdr on")
        tap = cls(fd, name)
        if tap.vnet_hdr_len() != VNET_HDR_LEN:
            tap._set_vnet_hdr_len()
        os.set_inheritable(fd, False)
        os.set_blocking(fd, False)
        return tap

    @classmethod
    def _setiff(cls, name: str, *, creating: bool) -> "Tap":
        try:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError as e:
            raise DeviceError(f"{TUN_PATH} not found: load the tun module (modprobe tun) "
                              f"or create the node (mknod {TUN_PATH} c 10 200)") from e
        except PermissionError as e:
            raise DeviceError(f"no permission to open {TUN_PATH}: run as root or give "
                              f"pyvmm CAP_NET_ADMIN") from e
        try:
            ifr = _ifreq(name, lib.IFF_TAP | lib.IFF_NO_PI | lib.IFF_VNET_HDR)
            try:
                fcntl.ioctl(fd, lib.TUNSETIFF, ifr)
            except OSError as e:
                raise _setiff_error(e, name, creating) from e
            tap = cls(fd, _unpack(ifr)[0])
            tap._set_vnet_hdr_len()
            return tap
        except BaseException:
            os.close(fd)
            raise

    # -- settings ------------------------------------------------------------------
    def vnet_hdr_len(self) -> int:
        buf = bytearray(4)
        fcntl.ioctl(self.fd, lib.TUNGETVNETHDRSZ, buf)
        return struct.unpack("i", buf)[0]

    def _set_vnet_hdr_len(self) -> None:
        try:
            fcntl.ioctl(self.fd, lib.TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
        except OSError as e:
            raise DeviceError(f"tap {self.name} refused a {VNET_HDR_LEN}-byte vnet header "
                              f"({e.strerror}): the host kernel is too old") from e

    def set_offloads(self, features: int) -> None:
        """Let the tap hand over frames the guest can take, from its negotiated features.

        The kernel insists on TSO/UFO only with CSUM and ECN only with TSO, as
        does the virtio spec for the GUEST_* bits.
        """
        def has(bit):
            return bool(features >> bit & 1)
        flags = 0
        if has(_GUEST_CSUM):
            flags |= lib.TUN_F_CSUM
            if has(_GUEST_TSO4):
                flags |= lib.TUN_F_TSO4
            if has(_GUEST_TSO6):
                flags |= lib.TUN_F_TSO6
            if has(_GUEST_ECN) and flags & (lib.TUN_F_TSO4 | lib.TUN_F_TSO6):
                flags |= lib.TUN_F_TSO_ECN
            if has(_GUEST_UFO):
                flags |= lib.TUN_F_UFO
        try:
            fcntl.ioctl(self.fd, lib.TUNSETOFFLOAD, flags)
        except OSError as e:
            raise DeviceError(f"tap {self.name} refused offloads {flags:#x} ({e.strerror}): "
                              f"turn off the guest's offloads (csum=off)") from e

    def link_up(self) -> bool:
        """True when the interface is administratively up and has carrier (IFF_UP|IFF_RUNNING).

        Asked through a socket of this thread's network namespace, which is the
        tap's as long as the tap was created or opened here.
        """
        ifr = _ifreq(self.name)
        import socket
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                fcntl.ioctl(s.fileno(), lib.SIOCGIFFLAGS, ifr)
            except OSError:
                return False
        want = lib.IFF_UP | lib.IFF_RUNNING
        return _unpack(ifr)[1] & want == want

    def close(self) -> None:
        """Close the fd; a tap we created (not persistent) disappears with it."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"Tap({self.name!r}, fd={self.fd})"


# -- helpers ---------------------------------------------------------------------
def _check_name(name: str) -> None:
    if not name or len(name.encode()) >= lib.IFNAMSIZ or "/" in name or any(
            c.isspace() for c in name) or name in (".", ".."):
        raise DeviceError(f"bad interface name {name!r}: use 1 to {lib.IFNAMSIZ - 1} "
                          f"characters without '/' or spaces")


def _exists(name: str) -> bool:
    try:
        import socket
        socket.if_nametoindex(name)
        return True
    except OSError:
        return False


def _ifreq(name: str = "", flags: int = 0) -> bytearray:
    ifr = bytearray(lib.IFREQ_SIZE)
    raw = name.encode()
    ifr[lib.IFREQ_NAME_OFFSET:lib.IFREQ_NAME_OFFSET + len(raw)] = raw
    struct.pack_into("H", ifr, lib.IFREQ_FLAGS_OFFSET, flags)
    return ifr


def _unpack(ifr: bytearray) -> tuple[str, int]:
    raw = bytes(ifr[lib.IFREQ_NAME_OFFSET:lib.IFREQ_NAME_OFFSET + lib.IFNAMSIZ])
    return raw.split(b"\0", 1)[0].decode(), struct.unpack_from("H", ifr, lib.IFREQ_FLAGS_OFFSET)[0]


def _setiff_error(e: OSError, name: str, creating: bool) -> DeviceError:
    if e.errno == errno.EPERM:
        return DeviceError(f"no permission to {'create' if creating else 'attach to'} tap "
                           f"{name}: run as root, give pyvmm CAP_NET_ADMIN, or make the tap "
                           f"with `ip tuntap add dev {name} mode tap user $USER`")
    if e.errno == errno.EBUSY:
        return DeviceError(f"tap {name} is busy: another process has it open; "
                           f"stop it or use another tap")
    if e.errno == errno.EINVAL:
        return DeviceError(f"cannot use {name} as a tap: it is not a tap with vnet_hdr "
                           f"(a tun, a multiqueue tap or another kind of interface)")
    return DeviceError(f"cannot set up tap {name}: {e.strerror}")
