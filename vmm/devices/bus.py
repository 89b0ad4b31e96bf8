"""Address buses: which device answers a port-IO or MMIO access.

Every port-IO and MMIO exit of every vCPU goes through `Bus.read` or
`Bus.write`, so the lookup is kept cheap: ranges live in a sorted list searched
with bisect, and the range hit last is remembered because a guest talking to a
device (a UART printing a line, a driver polling a status register) hits the
same range many times in a row.

A device is any object with (offsets are relative to the device's base):

    read(offset: int, size: int) -> bytes     # exactly `size` bytes
    write(offset: int, data: bytes) -> None

An access that is not wholly inside one device's range reaches no device:
reads return None (the vCPU loop answers 0xff bytes, like an empty ISA bus)
and writes are dropped.  Devices therefore never see offset + size > length.
"""

from __future__ import annotations

import bisect


class BusDevice:
    """What a device on a bus provides (documentation; any object with these two works)."""

    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


class Bus:
    """Non-overlapping [base, base + length) ranges, each mapped to a device."""

    def __init__(self, name: str = "bus"):
        self.name = name
        self._bases: list[int] = []                          # sorted, for bisect
        self._ranges: list[tuple[int, int, BusDevice]] = []  # (base, end, device), same order
        self._last: tuple[int, int, BusDevice] | None = None

    def insert(self, base: int, length: int, device: BusDevice) -> None:
        """Map [base, base + length) to `device`; ValueError if that overlaps a mapped range."""
        if base < 0 or length <= 0:
            raise ValueError(f"{self.name}: bad range base={base:#x} length={length:#x}")
        end = base + length
        i = bisect.bisect_left(self._bases, base)
        for j in (i - 1, i):  # only the neighbours can overlap a sorted, disjoint list
            if 0 <= j < len(self._ranges):
                b, e, other = self._ranges[j]
                if base < e and b < end:
                    raise ValueError(f"{self.name}: {base:#x}-{end - 1:#x} for "
                                     f"{type(device).__name__} overlaps {b:#x}-{e - 1:#x} "
                                     f"of {type(other).__name__}")
        self._bases.insert(i, base)
        self._ranges.insert(i, (base, end, device))

    def remove(self, base: int) -> BusDevice:
        """Unmap the range that starts at `base` and return its device (KeyError if none)."""
        i = bisect.bisect_left(self._bases, base)
        if i == len(self._bases) or self._bases[i] != base:
            raise KeyError(f"{self.name}: nothing is mapped at {base:#x}")
        del self._bases[i]
        _, _, device = self._ranges.pop(i)
        self._last = None
        return device

    def _find(self, addr: int, size: int) -> tuple[int, int, BusDevice] | None:
        last = self._last
        if last is not None and last[0] <= addr and addr + size <= last[1]:
            return last
        i = bisect.bisect_right(self._bases, addr) - 1
        if i < 0:
            return None
        hit = self._ranges[i]
        if addr + size > hit[1]:
            return None
        self._last = hit  # one reference store: safe to race between vCPU threads
        return hit

    def read(self, addr: int, size: int) -> bytes | None:
        """The device's answer, or None when no device covers [addr, addr + size)."""
        hit = self._find(addr, size)
        if hit is None:
            return None
        return hit[2].read(addr - hit[0], size)

    def write(self, addr: int, data: bytes) -> bool:
        """Give `data` to the device at addr; False when no device covers the range."""
        hit = self._find(addr, len(data))
        if hit is None:
            return False
        hit[2].write(addr - hit[0], data)
        return True

    def __iter__(self):
        """(base, length, device) for each mapped range, in address order."""
        return iter([(b, e - b, d) for b, e, d in self._ranges])

    def __len__(self) -> int:
        return len(self._ranges)
