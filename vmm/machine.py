"""The machine: guest RAM, a KVM VM, vCPU threads and devices, put together.

`Machine` owns everything a running guest needs and knows how to start, pause,
resume and stop it.  It is also the unit a live update saves and restores, so
each part it holds can report its state and take it back.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Callable

from .errors import GuestError, VmmError
from .memory import MiB, GuestMemory

COM1_PORT, COM1_IRQ = 0x3F8, 4
DEBUG_EXIT_PORT = 0xF4


@dataclass
class MachineConfig:
    """What `pyvmm run` was asked for."""

    kernel: str | None = None
    memory: int = 256 * MiB
    cmdline: str = ""
    vcpus: int = 1
    hugetlb: bool = False
    console: Callable[[bytes], None] | None = None   # serial output; stdout by default
    nets: list = field(default_factory=list)


def stdout_console(data: bytes) -> None:
    os.write(1, data)


class Machine:
    """A guest and everything that runs it."""

    def __init__(self, config: MachineConfig):
        if config.vcpus < 1 or config.vcpus > 64:
            raise VmmError(f"--vcpus {config.vcpus}: give between 1 and 64")
        self.config = config
        self.kvm = None
        self.vm = None
        self.memory: GuestMemory | None = None
        self.vcpus = []
        self.threads = []
        self.exit_code: int | None = None
        self.error: GuestError | None = None
        self._done = threading.Event()
        self.running = False

    # -- building --------------------------------------------------------------------
    def create(self, memory: GuestMemory | None = None) -> None:
        """Open KVM, create the VM on (new or given) RAM, its vCPUs and devices."""
        from .devices.bus import Bus
        from .devices.debug_exit import DebugExit
        from .devices.serial import Serial16550
        from .kvm.system import Kvm

        cfg = self.config
        self.kvm = Kvm()
        self.memory = memory or GuestMemory(cfg.memory, hugetlb=cfg.hugetlb)
        self.vm = self.kvm.create_vm()
        self.vm.map_memory(self.memory)
        self.vm.setup_x86()
        self.vcpus = [self.vm.create_vcpu(i) for i in range(cfg.vcpus)]
        for vcpu in self.vcpus:
            vcpu.setup_cpuid()

        self.pio_bus = Bus()
        self.mmio_bus = Bus()
        console = cfg.console or stdout_console
        self.serial = Serial16550(console, lambda level: self.vm.irq_line(COM1_IRQ, level))
        self.pio_bus.insert(COM1_PORT, 8, self.serial)
        self.debug_exit = DebugExit(self.request_exit)
        self.pio_bus.insert(DEBUG_EXIT_PORT, 4, self.debug_exit)

    def boot(self) -> None:
        """Load the PVH kernel and point the boot vCPU at its 32-bit entry."""
        from .boot.pvh import load_pvh
        from .boot.regs import setup_pvh_boot

        info = load_pvh(self.config.kernel, self.memory, self.config.cmdline)
        setup_pvh_boot(self.vcpus[0], info.entry, info.start_info)
        self.boot_info = info

    # -- running -----------------------------------------------------------------------
    def start(self, paused: bool = False) -> None:
        from .cpu import VcpuThread
        self.threads = [VcpuThread(v, self.pio_bus, self.mmio_bus, self._vcpu_failed)
                        for v in self.vcpus]
        for t in self.threads:
            t.start(paused=paused)
        self.running = not paused

    def pause(self) -> None:
        for t in self.threads:
            t.pause()
        self.running = False

    def resume(self) -> None:
        for t in self.threads:
            t.resume()
        self.running = True

    def request_exit(self, code: int) -> None:
        """The guest wrote to the debug-exit port: stop with its code."""
        if self.exit_code is None:
            self.exit_code = code
        self._done.set()

    def _vcpu_failed(self, error: GuestError) -> None:
        if self.error is None and self.exit_code is None:
            self.error = error
        self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the guest exits or fails; True if it did."""
        return self._done.wait(timeout)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def stop(self) -> None:
        """Stop all vCPU threads (they leave KVM_RUN) and wait for them."""
        for t in self.threads:
            t.stop()
        for t in self.threads:
            t.join(2.0)
        self.running = False

    def close(self) -> None:
        self.stop()
        for v in self.vcpus:
            v.close()
        self.vcpus = []
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        if self.kvm is not None:
            self.kvm.close()
            self.kvm = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None
