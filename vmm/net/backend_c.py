"""The virtio-net data path in C (csrc/vnet.c), behind the vhost-like control API.

Same methods as backend_python.PyNetBackend and the vhost-net backend, so the device and
the CPR code drive all three alike:

    set_owner, set_mem_table, set_features, set_vring_num/addr/base/kick/call,
    set_backend, start ... stop, get_vring_base, reset_owner

One pthread per device polls the kick eventfds and the tap; cffi drops the GIL
around every call, so stop() can join that thread without blocking Python.
The fds passed in stay the caller's: nothing here closes them.
"""

from __future__ import annotations

import os

from ..errors import DeviceError

try:
    from . import _vnet
except ImportError as e:  # pragma: no cover - only without a build
    raise DeviceError("pyvmm's C data path is not built: run `python3 vmm/net/_build_vnet.py` "
                      "or `pip install -e .`") from e

ffi, lib = _vnet.ffi, _vnet.lib

MAX_REGIONS = lib.VNET_MAX_REGIONS
STATS = ("rx_packets", "rx_bytes", "rx_dropped", "tx_packets", "tx_bytes", "tx_dropped",
         "kicks", "interrupts", "wakeups")


def _check(r: int, what: str) -> int:
    if r < 0:
        err = DeviceError(f"C data path: {what} failed: {os.strerror(-r)}")
        err.errno = -r
        raise err
    return r


class CNetBackend:
    """virtio-net RX/TX queues between guest RAM and a tap, in a C thread."""

    def __init__(self, mem=None):
        """`mem` is accepted for symmetry with PyNetBackend; the C side uses the table only."""
        self.mem = mem
        self._n = ffi.gc(lib.vnet_new(), lib.vnet_free)
        if self._n == ffi.NULL:
            raise DeviceError("C data path: cannot allocate a device (out of memory or fds)")

    # -- control API (mirrors vhost) ------------------------------------------------
    def set_owner(self) -> None:
        _check(lib.vnet_set_owner(self._n), "set_owner (already owned? reset_owner first)")

    def reset_owner(self) -> None:
        """Stop and forget rings, fds and memory; the fds stay open (the caller's)."""
        _check(lib.vnet_reset_owner(self._n), "reset_owner")

    def set_mem_table(self, regions) -> None:
        regions = [tuple(int(x) for x in r) for r in regions]
        if len(regions) > MAX_REGIONS:
            raise DeviceError(f"C data path: {len(regions)} memory regions, at most {MAX_REGIONS}")
        table = ffi.new("struct vnet_mem_region[]", max(1, len(regions)))
        for i, (gpa, size, host) in enumerate(regions):
            table[i].gpa, table[i].size, table[i].host_addr = gpa, size, host
        _check(lib.vnet_set_mem_table(self._n, table, len(regions)), "set_mem_table")

    def set_features(self, features: int) -> None:
        _check(lib.vnet_set_features(self._n, features), f"set_features({features:#x})")

    def set_vring_num(self, q: int, num: int) -> None:
        _check(lib.vnet_set_vring_num(self._n, q, num), f"queue {q}: set_vring_num({num})")

    def set_vring_addr(self, q: int, desc: int, avail: int, used: int) -> None:
        _check(lib.vnet_set_vring_addr(self._n, q, desc, avail, used),
               f"queue {q}: set_vring_addr({desc:#x}, {avail:#x}, {used:#x})")

    def set_vring_base(self, q: int, idx: int) -> None:
        _check(lib.vnet_set_vring_base(self._n, q, idx & 0xFFFF), f"queue {q}: set_vring_base")

    def get_vring_base(self, q: int) -> int:
        """The next avail entry the device would take (exact once stopped)."""
        out = ffi.new("uint16_t *")
        _check(lib.vnet_get_vring_base(self._n, q, out), f"queue {q}: get_vring_base")
        return out[0]

    def set_vring_kick(self, q: int, fd: int) -> None:
        _check(lib.vnet_set_vring_kick(self._n, q, fd), f"queue {q}: set_vring_kick({fd})")

    def set_vring_call(self, q: int, fd: int) -> None:
        _check(lib.vnet_set_vring_call(self._n, q, fd), f"queue {q}: set_vring_call({fd})")

    def set_dirty_log(self, log: "DirtyLog | None") -> None:
        """Live migration: mark the pages this data path writes in `log` (None: stop)."""
        if log is None:
            lib.vnet_set_dirty_log(self._n, ffi.NULL, 0, 0)
        else:
            lib.vnet_set_dirty_log(self._n, log.bits, log.host_base, log.npages)

    def set_backend(self, tap_fd: int, hdr_len: int) -> None:
        """Attach the tap (made non-blocking); hdr_len is the tap's vnet header size."""
        _check(lib.vnet_set_backend(self._n, tap_fd, hdr_len),
               f"set_backend(fd {tap_fd}, {hdr_len}-byte header)")

    def start(self) -> None:
        if lib.vnet_running(self._n):
            return
        _check(lib.vnet_start(self._n),
               "start (are the memory table, both queues and the backend set, "
               "and the rings inside guest RAM?)")

    def stop(self) -> None:
        """Finish the frame in hand and join the thread; after this guest RAM is not touched."""
        _check(lib.vnet_stop(self._n), "stop")

    def running(self) -> bool:
        return bool(lib.vnet_running(self._n))

    def poll(self) -> None:
        """One synchronous pass over both queues (tests): the thread must not run."""
        _check(lib.vnet_poll(self._n), "poll")

    def walk_chain(self, q: int, head: int) -> tuple[int, int]:
        """(segments, bytes) of the chain at `head`, or DeviceError if it is malformed."""
        total = ffi.new("uint32_t *")
        nseg = _check(lib.vnet_walk_chain(self._n, q, head, total), f"queue {q}: chain {head}")
        return nseg, total[0]

    # -- status ---------------------------------------------------------------------
    def isr_read(self) -> int:
        return lib.vnet_isr_read(self._n)

    def isr_ack(self, bits: int) -> None:
        lib.vnet_isr_ack(self._n, bits)

    def error(self) -> str | None:
        buf = ffi.new("char[]", 256)
        if lib.vnet_get_error(self._n, buf, len(buf)) == 0:
            return None
        return ffi.string(buf).decode(errors="replace")

    def stats(self) -> dict:
        out = ffi.new("struct vnet_stats *")
        lib.vnet_get_stats(self._n, out)
        return {name: getattr(out, name) for name in STATS}

    def close(self) -> None:
        """Stop the thread and free the device now (else when garbage-collected)."""
        if self._n is not None:
            ffi.release(self._n)  # runs the gc destructor, vnet_free, now
            self._n = None


class DirtyLog:
    """Live migration's device dirty log: one bit per 4 KiB page of guest RAM (by offset
    in the RAM memfd), set by the C data path for every page it writes (RX buffers, used
    rings), which KVM's own dirty log never sees.  Shared by all of a machine's NICs.
    The VMM's own writes (virtio-net's control queue, answered in Python) are marked
    with mark(), in a bitmap of their own: the C writers' word-atomic ORs and a Python
    read-modify-write of the same words could lose a bit."""

    def __init__(self, host_base: int, size: int):
        import threading
        self.host_base = host_base
        self.npages = size // 4096
        self.nwords = (self.npages + 63) // 64
        self.bits = ffi.new("uint64_t[]", self.nwords)
        self._out = ffi.new("uint64_t[]", self.nwords)
        self._lock = threading.Lock()
        self._python = 0   # the pages mark() was told of, as an int bitmap

    def mark(self, offset: int, length: int) -> None:
        """Python wrote [offset, offset + length) of the RAM memfd."""
        first, last = offset // 4096, (offset + length - 1) // 4096
        with self._lock:
            self._python |= ((1 << (last - first + 1)) - 1) << first

    def collect(self) -> int:
        """The pages marked since the last collect, as an int bitmap (bit n: page n),
        and clear them (word by word, atomically against the writers)."""
        ffi.memmove(self._out, bytes(self.nwords * 8), self.nwords * 8)
        lib.vnet_dirty_collect(self.bits, self._out, self.nwords)
        with self._lock:
            python, self._python = self._python, 0
        return int.from_bytes(ffi.buffer(self._out), "little") | python
