"""Guest RAM: one memfd, mapped shared, laid out around the x86 MMIO hole.

RAM lives in a memfd so that a live update never copies it: the fd is handed
to the new VMM, which maps the very same pages.  The layout is the usual x86
one: RAM from 0 up to 3 GiB, a hole for device MMIO (virtio-mmio, IOAPIC,
LAPIC) up to 4 GiB, and the rest of RAM above 4 GiB.

Every accessor checks the guest-physical range against the regions, so a
guest-supplied address can never make the VMM touch host memory outside RAM.

`re` and the KVM mapping are imported inside functions on purpose: this module
is on the cpr-exec resume path, where every import is downtime.
"""

from __future__ import annotations

import errno
import os

from .errors import GuestMemoryError, VmmError

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
MMIO_HOLE_START = 3 * GiB
MMIO_HOLE_END = 4 * GiB
PAGE_SIZE = 4096
HUGE_PAGE_SIZE = 2 * MiB
MIN_RAM = 2 * MiB

_UNITS = {"": MiB, "k": KiB, "m": MiB, "g": GiB, "t": 1 << 40}


def parse_size(text: str | int) -> int:
    """Parse a memory size like QEMU's -m: '256M', '1G', '512' (MiB by default)."""
    if isinstance(text, int):
        return text
    import re
    m = re.match(r"^\s*(\d+)\s*([kKmMgGtT]?)(i?[bB])?\s*$", text)
    if not m:
        raise VmmError(f"cannot read memory size {text!r}: use a number with K, M or G, e.g. 256M")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def host_ram_bytes() -> int:
    """Physical RAM of the host, from /proc/meminfo."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * KiB
    return 0


class Region:
    """A contiguous piece of guest RAM: guest-physical address, size, offset in the memfd."""

    __slots__ = ("gpa", "size", "offset")

    def __init__(self, gpa: int, size: int, offset: int):
        self.gpa, self.size, self.offset = gpa, size, offset

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def __eq__(self, other):
        return isinstance(other, Region) and \
            (self.gpa, self.size, self.offset) == (other.gpa, other.size, other.offset)

    def __hash__(self):
        return hash((self.gpa, self.size, self.offset))

    def __repr__(self):
        return f"Region(gpa={self.gpa:#x}, size={self.size:#x}, offset={self.offset:#x})"


def layout(size: int) -> tuple[Region, ...]:
    """Split `size` bytes of RAM around the MMIO hole below 4 GiB."""
    low = min(size, MMIO_HOLE_START)
    regions = [Region(0, low, 0)]
    if size > low:
        regions.append(Region(MMIO_HOLE_END, size - low, low))
    return tuple(regions)


class GuestMemory:
    """Guest RAM backed by a named memfd and mapped MAP_SHARED into this process."""

    def __init__(self, size: int, *, name: str = "pyvmm-ram", hugetlb: bool = False,
                 fd: int | None = None, address: int = 0):
        align = HUGE_PAGE_SIZE if hugetlb else PAGE_SIZE
        if size < MIN_RAM:
            raise VmmError(f"memory size {size} bytes is too small: give at least 2M")
        if size % align:
            raise VmmError(f"memory size {size} bytes is not a multiple of {align // KiB} KiB")
        host = host_ram_bytes() if fd is None else 0   # (adopted RAM exists already)
        if host and size > host:
            raise VmmError(f"memory size {size // MiB} MiB is larger than this host's "
                           f"{host // MiB} MiB of RAM: ask for less with --memory")
        self.size = size
        self.name = name
        self.hugetlb = hugetlb
        self.preallocated = False   # prealloc() done: every page of RAM is allocated
        self.regions = layout(size)
        self._adopted = fd is not None
        if fd is None:
            flags = os.MFD_CLOEXEC | (os.MFD_HUGETLB if hugetlb else 0)
            try:
                fd = os.memfd_create(name, flags)
                os.ftruncate(fd, size)
            except OSError as e:
                what = "hugetlb " if hugetlb else ""
                raise VmmError(f"cannot create {size // MiB} MiB of {what}guest RAM: {e.strerror}"
                               + (" (are huge pages reserved in /proc/sys/vm/nr_hugepages?)"
                                  if hugetlb else "")) from e
        else:
            actual = os.fstat(fd).st_size
            if actual != size:
                raise VmmError(f"RAM memfd holds {actual} bytes, expected {size}")
        self.fd = fd
        from .kvm.ffi import SharedMapping
        try:
            self._map = SharedMapping(fd, size, address=address)
        except OSError as e:
            if fd is not None and self.fd == fd and not self._adopted:
                os.close(fd)
            hint = (f": reserve {size // HUGE_PAGE_SIZE} huge pages first "
                    f"(echo {size // HUGE_PAGE_SIZE} > /proc/sys/vm/nr_hugepages)"
                    if hugetlb else "")
            raise VmmError(f"cannot map {size // MiB} MiB of guest RAM ({e.strerror})"
                           + hint) from None
        self._view = memoryview(self._map.buffer())
        self.host_base = self._map.address

    @classmethod
    def from_fd(cls, fd: int, size: int, *, name: str = "pyvmm-ram",
                hugetlb: bool = False, address: int = 0) -> "GuestMemory":
        """Map RAM that another process created (the CPR path): nothing is copied.
        With `address`, adopt the mapping the cpr-exec prebuilder already made."""
        return cls(size, name=name, hugetlb=hugetlb, fd=fd, address=address)

    # -- address translation -------------------------------------------------
    def offset_of(self, gpa: int, length: int) -> int:
        """Offset in the memfd of [gpa, gpa+length); raises if it is not all in one region."""
        if length < 0 or gpa < 0:
            raise GuestMemoryError(f"bad guest range {gpa:#x}+{length:#x}")
        for r in self.regions:
            if r.gpa <= gpa and gpa + length <= r.end:
                return r.offset + (gpa - r.gpa)
        raise GuestMemoryError(f"guest range {gpa:#x}..{gpa + length:#x} is outside guest RAM")

    def host_address(self, gpa: int, length: int = 1) -> int:
        """Host virtual address of guest-physical `gpa` (checked)."""
        return self.host_base + self.offset_of(gpa, length)

    def contains(self, gpa: int, length: int = 1) -> bool:
        return any(r.gpa <= gpa and gpa + length <= r.end for r in self.regions)

    # -- accessors -------------------------------------------------------------
    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of guest RAM (checked); valid until close()."""
        off = self.offset_of(gpa, length)
        return self._view[off:off + length]

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes) -> None:
        self.view(gpa, len(data))[:] = data

    def prealloc(self, chunk: int = 64 * MiB) -> None:
        """Allocate every page of RAM now (QEMU's -mem-prealloc), so that neither the
        guest nor an incoming migration pays for it later.  On a host that backs its
        own memory lazily (a nested or ballooned VM, as this project's CI), a first
        write to a page costs ~11 us more than a copy: 4 GiB were written into fresh
        pages at 353 MB/s, into allocated ones at 4.9 GB/s (bench/fresh_pages.py,
        docs/MIGRATION.md "Fresh pages")."""
        for off in range(0, self.size, chunk):
            try:
                self._map.populate(off, min(chunk, self.size - off))
            except OSError as e:
                raise VmmError(f"cannot preallocate {self.size // MiB} MiB of guest RAM: "
                               f"{e.strerror}" + (" (not enough free memory or huge pages)"
                                                  if e.errno in (errno.ENOMEM, errno.EFAULT)
                                                  else "")) from None
        self.preallocated = True

    def state(self) -> dict:
        """What a new VMM needs to map this RAM again (the fd travels separately)."""
        return {"size": self.size, "name": self.name, "hugetlb": self.hugetlb,
                "regions": [[r.gpa, r.size, r.offset] for r in self.regions]}

    def close(self) -> None:
        """Unmap and close the memfd (the RAM lives on if another process holds it)."""
        if self._map is not None:
            self._view.release()
            self._map.close()
            self._map = None
            os.close(self.fd)
            self.fd = -1
