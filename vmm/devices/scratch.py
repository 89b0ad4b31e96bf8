"""scratch: one 32-bit register in MMIO that the guest reads and writes, and nothing else.

The smallest device that goes through the whole persistence contract
(vmm/devices/__init__.py): it has state the guest changes (the ticker guest with
`scratch=0xd1000000` adds one to it every tick and prints what it read), so a
live update that lost or reset the state shows in the guest's own output.
Added with `--device scratch[,value=N]`; `pyvmm state` shows the value.
"""

from __future__ import annotations

from ..errors import VmmError
from ..schema import U32, Int
from . import Device, State

BASE = 0xD100_0000
SIZE = 4


class ScratchState(State):
    VERSION = 1
    FIELDS = {"value": Int(0, U32)}


class Scratch(Device):
    """The register at BASE: 1-, 2- or 4-byte accesses, little-endian."""

    KIND = "scratch"
    State = ScratchState

    def __init__(self, value: int = 0):
        self.id = "scratch"
        self.value = value

    @classmethod
    def create(cls, ctx, index, spec):
        if index:
            raise VmmError("--device scratch: a machine has one at most (its address is fixed)")
        key, eq, value = spec.partition("=")
        if spec and (key != "value" or not eq):
            raise VmmError(f"--device scratch,{spec}: the only option is value=N")
        try:
            number = int(value, 0) if spec else 0
        except ValueError:
            raise VmmError(f"--device scratch: value={value!r} is not a number") from None
        if not 0 <= number <= U32:
            raise VmmError(f"--device scratch: value={value} does not fit in 32 bits")
        return cls(number)

    @classmethod
    def restore(cls, ctx, state, fds):
        return cls(state.value)

    def attach(self, ctx) -> str:
        ctx.mmio_bus.insert(BASE, SIZE, self)
        return ""

    def read(self, offset: int, size: int) -> bytes:
        return self.value.to_bytes(SIZE, "little")[offset:offset + size]

    def write(self, offset: int, data: bytes) -> None:
        raw = bytearray(self.value.to_bytes(SIZE, "little"))
        raw[offset:offset + len(data)] = data
        self.value = int.from_bytes(raw, "little")

    def save(self) -> ScratchState:
        return ScratchState(value=self.value)

    def summary(self) -> dict:
        return {"name": self.id, "type": "scratch", "base": f"{BASE:#x}", "value": self.value}
