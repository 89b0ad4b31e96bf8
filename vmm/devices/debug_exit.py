"""A debug-exit port: the guest ends the VM and picks pyvmm's exit status.

Like QEMU's isa-debug-exit (4 ports at 0xf4), which test kernels use to report
pass/fail without a shutdown path of their own.  Unlike QEMU, which exits with
(value << 1) | 1 so that 0 can never mean success, pyvmm exits with the value
itself: `outb 0, $0xf4` is a clean exit 0.
"""

from __future__ import annotations

from . import Device, State

PORT = 0xF4


class DebugExit:
    """Any 1-, 2- or 4-byte write calls on_exit(value); reads return zeros."""

    def __init__(self, on_exit):
        self.on_exit = on_exit

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        if len(data) in (1, 2, 4):
            self.on_exit(int.from_bytes(data, "little"))



class DebugExitState(State):
    """Nothing: the device has no registers."""
    VERSION = 1
    FIELDS: dict = {}


class DebugExitDevice(Device):
    """The debug-exit port of every machine, on 4 ports at PORT."""

    KIND = "debug-exit"
    State = DebugExitState

    def __init__(self, ctx):
        self.id = "debug-exit"
        self.port = DebugExit(ctx.request_exit)

    @classmethod
    def create(cls, ctx, index, spec):
        return cls(ctx)

    @classmethod
    def restore(cls, ctx, state, fds):
        return cls(ctx)

    def attach(self, ctx) -> str:
        ctx.pio_bus.insert(PORT, 4, self.port)
        return ""

    def save(self) -> DebugExitState:
        return DebugExitState()

    def summary(self) -> dict:
        return {"name": self.id, "type": "isa-debug-exit", "port": f"{PORT:#x}"}
