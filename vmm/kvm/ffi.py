"""Access to the compiled cffi module, with helpers shared by the KVM classes."""

from __future__ import annotations

import errno
import os

from ..errors import KvmError

try:
    from . import _kvm
except ImportError as e:  # pragma: no cover - only without a build
    raise KvmError("pyvmm's KVM binding is not built: run `make build` first") from e

ffi = _kvm.ffi
lib = _kvm.lib


def ioctl(fd: int, request: int, arg=ffi.NULL, *, what: str = "") -> int:
    """ioctl with a pointer argument; raises KvmError naming the call on failure."""
    r = lib.pyvmm_ioctl(fd, request, arg)
    if r < 0:
        raise KvmError(f"KVM {what or hex(request)} failed: {os.strerror(-r)}")
    return r


def ioctl_int(fd: int, request: int, arg: int = 0, *, what: str = "") -> int:
    """ioctl with an integer argument."""
    r = lib.pyvmm_ioctl_int(fd, request, arg)
    if r < 0:
        raise KvmError(f"KVM {what or hex(request)} failed: {os.strerror(-r)}")
    return r


def put_bytes(buf, span: tuple[int, int], ctype: str, data: bytes) -> None:
    """Copy `data`, a saved `ctype`, into the cffi buffer `buf` at `span` (start, end:
    where that struct lies in it): it must have this kernel's exact size."""
    start, end = span
    if len(data) != end - start:
        raise KvmError(f"saved {ctype} is {len(data)} bytes, this kernel's is {end - start}")
    buf[start:end] = data


def to_dict(cdata) -> dict | list | int:
    """A struct as plain dicts/lists/ints, for people to read (pyvmm state, QMP)."""
    if not isinstance(cdata, ffi.CData):
        return cdata
    t = ffi.typeof(cdata)
    if t.kind == "pointer":
        return to_dict(cdata[0])
    if t.kind == "struct" or t.kind == "union":
        return {name: to_dict(getattr(cdata, name)) for name, _ in t.fields if name}
    if t.kind == "array":
        if t.item.cname in ("char", "unsigned char", "__u8"):
            return bytes(ffi.buffer(cdata)).hex()
        return [to_dict(x) for x in cdata]
    return cdata


class SharedMapping:
    """mmap(MAP_SHARED) of an fd without dup()ing it (Python's mmap module keeps a
    private copy of the fd, which would double every RAM and vCPU fd we hold)."""

    def __init__(self, fd: int, size: int, *, address: int = 0):
        if address:   # a mapping made in C (the cpr-exec prebuilder): ours to unmap now
            self.ptr = ffi.cast("void *", address)
            self.size = size
            self.address = address
            return
        ptr = lib.mmap(ffi.NULL, size, lib.PROT_READ | lib.PROT_WRITE, lib.MAP_SHARED, fd, 0)
        if ptr == ffi.cast("void *", -1):
            err = ffi.errno
            raise OSError(err, f"mmap of {size} bytes failed: {os.strerror(err)}")
        self.ptr = ptr
        self.size = size
        self.address = int(ffi.cast("uintptr_t", ptr))

    def buffer(self):
        return ffi.buffer(self.ptr, self.size)

    def populate(self, offset: int, length: int) -> None:
        """Fault [offset, offset+length) in, writable (MADV_POPULATE_WRITE, Linux 5.14):
        every page allocated and zeroed now, not at its first touch."""
        while True:
            if lib.madvise(ffi.cast("char *", self.ptr) + offset, length,
                           lib.MADV_POPULATE_WRITE) == 0:
                return
            err = ffi.errno
            if err != errno.EINTR:   # (EINTR: a signal came; the pages done stay done)
                raise OSError(err, os.strerror(err))

    def close(self) -> None:
        if self.ptr is not None:
            lib.munmap(self.ptr, self.size)
            self.ptr = None
