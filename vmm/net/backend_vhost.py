"""The virtio-net data path in the host kernel: /dev/vhost-net, behind the common API.

vhost-net is what the C path imitates, so this is a thin mapping: each method
is one ioctl.  Differences the caller should know:

* vhost wants host virtual addresses for the rings, so set_vring_addr
  translates the guest-physical ones through the memory table (checked).
* vhost starts moving packets as soon as a queue has a backend; start() and
  stop() therefore attach and detach the tap (VHOST_NET_SET_BACKEND fd / -1),
  and stop() leaves the rings exactly where get_vring_base() says.
* vhost signals the call eventfd (a KVM irqfd) itself and never tells
  userspace, so the ISR is unknowable here: isr_read() always reports the
  vring bit (the guest then scans both queues, which is harmless), plus the
  config bit once a ring error was seen.
* Ring errors arrive on a per-queue error eventfd (VHOST_SET_VRING_ERR);
  error() reports them.  There are no statistics: stats() is empty.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from ..errors import DeviceError
from ..virtio import F_VERSION_1, INT_CONFIG, INT_VRING
from . import F_MRG_RXBUF, RX, TX, VNET_HDR_LEN

try:
    from . import _vhost
except ImportError as e:  # pragma: no cover - only without a build
    raise DeviceError("pyvmm's vhost binding is not built: run "
                      "`python3 vmm/net/_build_vhost.py` or `pip install -e .`") from e

ffi, lib = _vhost.ffi, _vhost.lib

VHOST_NET_PATH = "/dev/vhost-net"


class VhostNetBackend:
    """An open /dev/vhost-net: two queues served by a kernel thread."""

    def __init__(self, mem=None, *, path: str = VHOST_NET_PATH):
        """`mem` is unused (vhost reads RAM through the memory table); kept so every
        backend class can serve as a backend_factory the same way."""
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError as e:
            raise DeviceError(f"{path} not found: load the vhost_net module "
                              f"(modprobe vhost_net) or use the C data path") from e
        except PermissionError as e:
            raise DeviceError(f"no permission to open {path}: run as root or give the user "
                              f"access to it (e.g. the kvm group)") from e
        buf = bytearray(8)
        self._ioctl(lib.VHOST_GET_FEATURES, buf, "GET_FEATURES")
        self.supported = struct.unpack("<Q", buf)[0]
        self._regions: list[tuple[int, int, int]] = []
        self._features = 0
        self._tap = -1
        self._running = False
        self._err_fds: list[int] = []
        self._error = None
        self._isr = 0

    def _ioctl(self, request, arg, what):
        try:
            return fcntl.ioctl(self.fd, request, arg)
        except OSError as e:
            raise DeviceError(f"vhost-net {what} failed: {e.strerror}") from e

    # -- control API -----------------------------------------------------------------
    def set_owner(self) -> None:
        try:
            fcntl.ioctl(self.fd, lib.VHOST_SET_OWNER, 0)
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise DeviceError("vhost-net already has an owner: reset_owner first") from e
            raise DeviceError(f"vhost-net SET_OWNER failed: {e.strerror}") from e
        flags = os.EFD_CLOEXEC | os.EFD_NONBLOCK
        self._err_fds = [os.eventfd(0, flags) for _ in (RX, TX)]
        for q, fd in enumerate(self._err_fds):
            self._vring_file(lib.VHOST_SET_VRING_ERR, q, fd, "SET_VRING_ERR")

    def reset_owner(self) -> None:
        """Detach everything (rings, fds, memory); the fds we were given stay open."""
        self.stop()
        self._ioctl(lib.VHOST_RESET_OWNER, 0, "RESET_OWNER")
        for fd in self._err_fds:
            os.close(fd)
        self._err_fds = []
        self._regions, self._tap, self._error, self._isr = [], -1, None, 0

    def set_mem_table(self, regions) -> None:
        regions = [tuple(r) for r in regions]
        table = ffi.new("char[]", ffi.sizeof("struct vhost_memory") +
                        len(regions) * ffi.sizeof("struct vhost_memory_region"))
        mem = ffi.cast("struct vhost_memory *", table)
        mem.nregions = len(regions)
        for i, (gpa, size, host) in enumerate(regions):
            mem.regions[i].guest_phys_addr = gpa
            mem.regions[i].memory_size = size
            mem.regions[i].userspace_addr = host
        self._ioctl(lib.VHOST_SET_MEM_TABLE, bytes(ffi.buffer(table)), "SET_MEM_TABLE")
        self._regions = regions

    def set_features(self, features: int) -> None:
        """Pass on the bits vhost knows; tap offloads and config bits are not its business."""
        self._features = features & self.supported & ~(1 << lib.VHOST_NET_F_VIRTIO_NET_HDR)
        self._ioctl(lib.VHOST_SET_FEATURES, struct.pack("<Q", self._features), "SET_FEATURES")

    def set_vring_num(self, q: int, num: int) -> None:
        self._vring_state(lib.VHOST_SET_VRING_NUM, q, num, "SET_VRING_NUM")

    def set_vring_addr(self, q: int, desc: int, avail: int, used: int) -> None:
        addr = ffi.new("struct vhost_vring_addr *", {
            "index": q, "flags": 0, "desc_user_addr": self._hva(desc),
            "avail_user_addr": self._hva(avail), "used_user_addr": self._hva(used)})
        self._ioctl(lib.VHOST_SET_VRING_ADDR, bytes(ffi.buffer(addr)), "SET_VRING_ADDR")

    def set_vring_base(self, q: int, idx: int) -> None:
        self._vring_state(lib.VHOST_SET_VRING_BASE, q, idx & 0xFFFF, "SET_VRING_BASE")

    def get_vring_base(self, q: int) -> int:
        """The next avail entry vhost would take (exact once stopped)."""
        st = ffi.new("struct vhost_vring_state *", {"index": q})
        buf = bytearray(ffi.buffer(st))
        self._ioctl(lib.VHOST_GET_VRING_BASE, buf, "GET_VRING_BASE")
        ffi.buffer(st)[:] = bytes(buf)
        return st.num

    def set_vring_kick(self, q: int, fd: int) -> None:
        self._vring_file(lib.VHOST_SET_VRING_KICK, q, fd, "SET_VRING_KICK")

    def set_vring_call(self, q: int, fd: int) -> None:
        self._vring_file(lib.VHOST_SET_VRING_CALL, q, fd, "SET_VRING_CALL")

    def set_backend(self, tap_fd: int, hdr_len: int) -> None:
        """Remember the tap; vhost gets it on start().  The tap, not vhost, handles headers."""
        want = VNET_HDR_LEN if self._features & ((1 << F_MRG_RXBUF) | (1 << F_VERSION_1)) \
            else 10
        if hdr_len != want:
            raise DeviceError(f"vhost-net with these features needs a {want}-byte vnet "
                              f"header on the tap, not {hdr_len}")
        self._tap = tap_fd

    def start(self) -> None:
        if self._running:
            return
        if self._tap < 0:
            raise DeviceError("vhost-net: start before set_backend")
        for q in (RX, TX):
            self._vring_file(lib.VHOST_NET_SET_BACKEND, q, self._tap, "NET_SET_BACKEND")
        self._running = True

    def stop(self) -> None:
        """Detach the tap: vhost finishes in-flight work and leaves the rings alone."""
        if not self._running:
            return
        for q in (RX, TX):
            self._vring_file(lib.VHOST_NET_SET_BACKEND, q, lib.VHOST_FILE_UNBIND,
                             "NET_SET_BACKEND")
        self._running = False

    def running(self) -> bool:
        return self._running

    # -- status ------------------------------------------------------------------------
    def isr_read(self) -> int:
        """Always INT_VRING: vhost interrupts through the irqfd without telling us."""
        self.error()
        return self._isr | INT_VRING

    def isr_ack(self, bits: int) -> None:
        self._isr &= ~bits

    def error(self) -> str | None:
        for q, fd in enumerate(self._err_fds):
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                continue
            self._error = self._error or f"vhost-net found a bad ring on queue {q}"
            self._isr |= INT_CONFIG
        return self._error

    def stats(self) -> dict:
        return {}

    def close(self) -> None:
        if self.fd >= 0:
            for fd in self._err_fds:
                os.close(fd)
            self._err_fds = []
            os.close(self.fd)
            self.fd = -1

    # -- helpers -----------------------------------------------------------------------
    def _hva(self, gpa: int) -> int:
        for start, size, host in self._regions:
            if start <= gpa < start + size:
                return host + gpa - start
        raise DeviceError(f"vhost-net: ring address {gpa:#x} is outside the memory table")

    def _vring_state(self, request, q, num, what):
        st = ffi.new("struct vhost_vring_state *", {"index": q, "num": num})
        self._ioctl(request, bytes(ffi.buffer(st)), what)

    def _vring_file(self, request, q, fd, what):
        f = ffi.new("struct vhost_vring_file *", {"index": q, "fd": fd})
        self._ioctl(request, bytes(ffi.buffer(f)), what)
