"""Which pages of guest RAM to send, and sending or writing them (C: csrc/migrate.c).

Pass 1 sends every page.  From then on a page is sent again when it was written
since it was last read: by a vCPU (KVM's dirty log, KVM_MEM_LOG_DIRTY_PAGES on
every memory slot, read and cleared by KVM_GET_DIRTY_LOG) or by pyvmm itself
(the C data path's device dirty log: RX buffers and used rings, which KVM never
sees).  Pages are numbered by their offset in the RAM memfd, so KVM's per-slot
bitmaps are shifted by their region's offset.
"""

from __future__ import annotations

import errno
import os

from ..errors import VmmError
from ..kvm.ffi import ffi, lib

PAGE = lib.PYVMM_MIG_PAGE
ENTRY = lib.PYVMM_MIG_ENTRY   # the most one page takes on the wire
BATCH_PAGES = lib.PYVMM_MIG_BATCH   # pages in one PAGE section, at most


class PageSet:
    """The pages still to send (a C bitmap) over the RAM of `memory`, and the packer."""

    def __init__(self, memory):
        self.memory = memory
        self.npages = memory.size // PAGE
        self.nbytes = (self.npages + 63) // 64 * 8
        self.bits = ffi.new("uint64_t[]", self.nbytes // 8)
        self.cursor = ffi.new("uint64_t *")
        self.counts = ffi.new("struct pyvmm_mig_counts *")
        self.ram = ffi.cast("uint8_t *", memory.host_base)

    def add(self, pages: int) -> None:
        """OR in an int bitmap (bit n: page n) and start again from the first page."""
        mine = int.from_bytes(ffi.buffer(self.bits), "little") | pages
        ffi.memmove(self.bits, mine.to_bytes(self.nbytes, "little"), self.nbytes)
        self.cursor[0] = 0

    def add_populated(self) -> None:
        """Pass 1: every page the RAM memfd holds.  Its holes (pages nobody ever wrote)
        read as zeros and are not sent at all, nor read (reading would allocate them
        here); they count as zero pages (QEMU's "duplicate")."""
        fd, size = self.memory.fd, self.memory.size
        pages = pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:   # no data past pos
                    break
                self.add((1 << self.npages) - 1)   # (a file system without SEEK_DATA)
                return
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            first, last = start // PAGE, (end + PAGE - 1) // PAGE
            pages |= ((1 << (last - first)) - 1) << first
            pos = end
        self.add(pages)
        self.counts.zero_pages += self.npages - pages.bit_count()

    def bitmap(self) -> bytes:
        """The pages still to send, one bit each (bit n: page n), little-endian u64 words:
        pass 1's (HELO's "populated", which the destination allocates beforehand)."""
        return bytes(ffi.buffer(self.bits))

    def count(self) -> int:
        return lib.pyvmm_mig_count(self.bits, self.npages)

    def send(self, fd: int, buf, max_pages: int, budget: int,
             timeout_ms: int) -> tuple[int, int]:
        """Send the next pages as PAGE sections of at most `max_pages` pages on the
        socket fd, about `budget` bytes of them, all in C without the GIL (buf: a cffi
        buffer of PYVMM_MIG_BUF bytes).  (status, bytes sent): status 0 when no page is
        left, 1 when the budget is spent, lib.PYVMM_MIG_PEER when the peer sent
        something or hung up, -errno when the socket failed (-ETIMEDOUT: it took
        nothing for timeout_ms)."""
        sent = ffi.new("uint64_t *")
        r = lib.pyvmm_mig_send(self.ram, self.npages, self.bits, self.cursor, fd, buf,
                               max_pages, budget, timeout_ms, self.counts, sent)
        return r, sent[0]


class DirtyTracker:
    """KVM's dirty log on every memory slot plus the devices' log, while a migration runs."""

    def __init__(self, machine):
        from ..net.backend_c import DirtyLog
        self.machine = machine
        self.memory = machine.memory
        self.device_log = DirtyLog(self.memory.host_base, self.memory.size)
        self.on = False

    def start(self) -> None:
        """Log from now on (raises VmmError, nothing left on, if a device cannot)."""
        try:
            self.machine.log_dirty_devices(self.device_log)
            self._set_slots(lib.KVM_MEM_LOG_DIRTY_PAGES)
        except BaseException:
            self.stop()
            raise
        self.on = True
        self.sync()   # KVM: start from a clean log

    def sync(self) -> int:
        """Every page written since the last sync, as an int bitmap (bit n: page n)."""
        vm = self.machine.vm
        pages = self.device_log.collect()
        for slot, (gpa, size, host, flags) in sorted(vm.slots.items()):
            first = (host - self.memory.host_base) // PAGE
            pages |= int.from_bytes(vm.get_dirty_log(slot), "little") << first
        return pages

    def _set_slots(self, flags: int) -> None:
        vm = self.machine.vm
        for slot, (gpa, size, host, _) in sorted(vm.slots.items()):
            vm.set_memory_region(slot, gpa, size, host, flags)

    def stop(self) -> None:
        """Back to no logging (a rollback; or after the last pass, which has read it all)."""
        self.on = False
        try:
            self.machine.log_dirty_devices(None)
            self._set_slots(0)
        except VmmError as e:   # (never in the way of a rollback: say it and go on)
            import sys
            print(f"pyvmm: migration: cannot turn dirty logging off: {e}", file=sys.stderr)


class Applier:
    """The destination's side: PAGE sections received into fresh RAM (csrc/migrate.c)."""

    def __init__(self, memory):
        self.memory = memory
        self.npages = memory.size // PAGE
        self.ram = ffi.cast("uint8_t *", memory.host_base)
        self.touched = ffi.new("uint64_t[]", (self.npages + 63) // 64)
        self.counts = ffi.new("struct pyvmm_mig_counts *")
        self.received = 0   # bytes of PAGE sections and of the headers read here
        self._buf = self._head = None

    def prealloc(self, bitmap: bytes) -> None:
        """Allocate the pages set in `bitmap` (the source's pass 1, HELO's "populated"),
        before pass 1 comes, so that applying it copies and no longer allocates too; a
        guest that does not fit here fails now, with a clear error, and not half-way."""
        from .stream import StreamError
        if not isinstance(bitmap, bytes) or len(bitmap) != len(self.touched) * 8:
            raise StreamError("migration stream is corrupt: its HELO section's page "
                              "bitmap does not match the guest's RAM size")
        if self.memory.preallocated:   # (--mem-prealloc: all there; the walk cost 40 ms/GiB)
            return
        r = lib.pyvmm_mig_prealloc(self.memory.fd, ffi.from_buffer("uint64_t[]", bitmap),
                                   self.npages)
        if r < 0:
            raise VmmError(f"cannot allocate the guest's {self.memory.size >> 20} MiB of RAM "
                           f"here: {os.strerror(-r)}")

    def receive(self, sock, budget: int, timeout_ms: int) -> bytes | None:
        """Take PAGE sections from the socket into RAM, in C without the GIL, until a
        section of another kind comes: its header (16 bytes; the payload is still to
        read, stream.recv_section(head=...)); None after about `budget` bytes (call
        again).  A stream that is corrupt, cut, stalls or fails raises StreamError.
        Preallocated RAM (--mem-prealloc) and huge pages take the pages straight from
        the socket; other RAM through a buffer and pwritev() (csrc/migrate.h says why);
        a failed write raises VmmError."""
        from .stream import StreamError
        if self._buf is None:
            self._buf = ffi.new("uint8_t[]", lib.PYVMM_MIG_BUF)
            self._head = ffi.new("uint8_t[]", lib.PYVMM_MIG_HEAD)
        # (huge pages: hugetlbfs has no write(), and mapping a 2 MiB page costs what
        # mapping a 4 KiB one does: they go through the mapping too)
        fd = -1 if self.memory.preallocated or self.memory.hugetlb else self.memory.fd
        got = ffi.new("uint64_t *")
        r = lib.pyvmm_mig_recv(sock.fileno(), fd, self.ram, self.npages, self.touched,
                               self._buf, budget, timeout_ms, self._head, self.counts, got)
        self.received += got[0]
        if r == 0:
            return bytes(ffi.buffer(self._head))
        if r == 1:
            return None
        if r == lib.PYVMM_MIG_WRITE:
            raise VmmError(f"cannot write the guest's RAM here: {os.strerror(ffi.errno)}")
        raise StreamError({
            lib.PYVMM_MIG_END: "migration stream truncated: the peer closed the connection "
                               "in a section header",
            lib.PYVMM_MIG_CUT: "migration stream truncated: the peer closed the connection "
                               "in a PAGE section",
            lib.PYVMM_MIG_CORRUPT: "migration stream is corrupt: a PAGE section names a "
                                   "page outside guest RAM or out of order, or its length "
                                   "does not match its pages",
            lib.PYVMM_MIG_BADCRC: "migration stream is corrupt: the PAGE section's CRC-32C "
                                  "does not match",
            -errno.ETIMEDOUT: "migration stream stalled while reading a PAGE section",
        }.get(r) or f"migration connection failed while reading a PAGE section: "
                    f"{os.strerror(-r)}")
