"""The machine: guest RAM, a KVM VM, vCPU threads and devices, put together.

`Machine` owns everything a running guest needs and knows how to start, pause,
resume and stop it.  It is also the unit a live update saves and restores, so
each part it holds can report its state and take it back.
"""

from __future__ import annotations

import os
import time

from . import sync
from .errors import GuestError, VmmError
from .memory import MiB, GuestMemory
from .state import StateError, require

COM1_PORT, COM1_IRQ = 0x3F8, 4
MSR_IA32_TSC = 0x10
DEBUG_EXIT_PORT = 0xF4
MAX_VCPUS = 64


class MachineConfig:
    """What `pyvmm run` was asked for."""

    def __init__(self, kernel: str | None = None, memory: int = 256 * MiB, cmdline: str = "",
                 vcpus: int = 1, hugetlb: bool = False, console=None, nets=None):
        self.kernel = kernel
        self.memory = memory
        self.cmdline = cmdline
        self.vcpus = vcpus
        self.hugetlb = hugetlb
        self.console = console     # callable taking bytes: serial output; stdout by default
        self.nets = list(nets or [])


def create_kvm_parts(memory: GuestMemory, vcpus: int, cpuids: list[bytes] | None = None,
                     prebuilt=None):
    """/dev/kvm, a VM with `memory` in its slots and the in-kernel irqchip, its vCPUs.

    Both ways go through csrc/build_vm.c (vmm.kvm.vm.build): here, or, with
    `prebuilt` (vmm.cpr.prebuild.Prebuilt), in the cpr-exec prebuilder before
    Python started; then Python wraps the fds the same way.
    """
    from .kvm.system import Kvm
    from .kvm.vcpu import Vcpu
    from .kvm.vm import Vm, build
    if prebuilt is None:
        kvm = Kvm()
        vm_fd, vcpu_fds = build(kvm, memory, vcpus)
    else:
        kvm = Kvm(fd=prebuilt.kvm_fd)
        vm_fd, vcpu_fds = prebuilt.vm_fd, prebuilt.vcpu_fds
    vm = Vm(kvm, vm_fd)
    vm.adopt(memory)
    cpus = [Vcpu(vm, i, fd) for i, fd in enumerate(vcpu_fds)]
    for i, vcpu in enumerate(cpus):
        if cpuids is not None:
            vcpu.set_cpuid_bytes(cpuids[i])
        else:
            vcpu.setup_cpuid()
        vcpu.tsc_khz()   # asked now, while no thread is in KVM_RUN (the answer is cached)
    return kvm, vm, cpus


class FdConsole:
    """Serial output written straight to a file descriptor (stdout, or a file the
    runner opened): with an fd, the UART's C fast path can write it too."""

    def __init__(self, fd: int):
        self.fd = fd

    def __call__(self, data: bytes) -> None:
        while data:
            data = data[os.write(self.fd, data):]


stdout_console = FdConsole(1)


class Machine:
    """A guest and everything that runs it."""

    def __init__(self, config: MachineConfig):
        if config.vcpus < 1 or config.vcpus > MAX_VCPUS:
            raise VmmError(f"--vcpus {config.vcpus}: give between 1 and {MAX_VCPUS}")
        self.config = config
        self.kvm = None
        self.vm = None
        self.memory: GuestMemory | None = None
        self.vcpus = []
        self.threads = []
        self.exit_code: int | None = None
        self.error: GuestError | None = None
        self._done = sync.Event()
        self.running = False
        self.cpr_devices = []
        self.cpr_timeline = None   # set in a new VMM after a live update
        self.cpr_mode = None

    # -- building --------------------------------------------------------------------
    def create(self, memory: GuestMemory | None = None, cpuids: list[bytes] | None = None,
               restoring: bool = False, kvm_parts=None) -> None:
        """Open KVM, create the VM on (new or given) RAM, its vCPUs and devices.

        A live update passes the old process's RAM and CPUID here: everything
        in this method can run before the old VMM stops its guest.  `kvm_parts`
        is a (kvm, vm, vcpus) triple made by create_kvm_parts() on another thread.
        """
        from .devices.bus import Bus
        from .devices.debug_exit import DebugExit
        from .devices.serial import Serial16550

        cfg = self.config
        self.memory = memory or GuestMemory(cfg.memory, hugetlb=cfg.hugetlb)
        if kvm_parts is None:
            kvm_parts = create_kvm_parts(self.memory, cfg.vcpus, cpuids)
        self.kvm, self.vm, self.vcpus = kvm_parts
        if not restoring:     # (a restore takes the MSR list from the saved state)
            for vcpu in self.vcpus:
                vcpu.msr_indices()   # probe once now, not in the middle of a live update

        self.pio_bus = Bus()
        self.mmio_bus = Bus()
        console = cfg.console or stdout_console
        self.serial = Serial16550(console, lambda level: self.vm.irq_line(COM1_IRQ, level))
        self.pio_bus.insert(COM1_PORT, 8, self.serial)
        from .kvm.ffi import ffi
        self.uart_fast = ffi.NULL
        if isinstance(console, FdConsole):
            self.uart_fast = ffi.new("struct pyvmm_uart_fast *",
                                     {"base": COM1_PORT, "out_fd": console.fd})
            self.serial.attach_fast_path(self.uart_fast)
        self.debug_exit = DebugExit(self.request_exit)
        self.pio_bus.insert(DEBUG_EXIT_PORT, 4, self.debug_exit)
        self.nets = []
        self.cmdline_extra = []
        if not restoring:   # a live update rebuilds nets from the saved state and passed taps
            from .devices.net import NetDevice
            for i, spec in enumerate(cfg.nets):
                self._add_net(NetDevice.from_spec(i, spec, self.vm, self.memory))

    def _add_net(self, dev) -> None:
        self.cmdline_extra.append(dev.attach(self.mmio_bus))
        self.nets.append(dev)
        self.cpr_devices.append(dev)

    def boot(self) -> None:
        """Load the PVH kernel and point the boot vCPU at its 32-bit entry."""
        from .boot.pvh import load_pvh
        from .boot.regs import setup_pvh_boot

        cmdline = " ".join(filter(None, [self.config.cmdline] + self.cmdline_extra))
        info = load_pvh(self.config.kernel, self.memory, cmdline)
        setup_pvh_boot(self.vcpus[0], info.entry, info.start_info)
        self.boot_info = info

    # -- state -----------------------------------------------------------------------
    def shape(self) -> dict:
        """What a new VMM needs to build an identical empty machine (no device state)."""
        return {"arch": "x86_64", "vcpus": len(self.vcpus), "memory": self.memory.state(),
                "kernel": self.config.kernel, "cmdline": self.config.cmdline,
                "cpuid": [v.cpuid_bytes for v in self.vcpus], "nets": len(self.nets)}

    def save_state(self) -> dict:
        """Everything about the paused machine except guest RAM (which stays in its memfd)."""
        if self.running:
            raise VmmError("pause the machine before saving its state")
        tsc_khz = self.vcpus[0].tsc_khz()
        return {
            "machine": self.shape(),
            "vm": self.vm.get_state(),
            "vcpus": [v.get_state() for v in self.vcpus],
            "devices": {"serial": self.serial.state(), "debug_exit": self.debug_exit.state(),
                        "nets": [d.cpr_state() for d in self.nets]},
            "time": {"host_ns": time.clock_gettime_ns(time.CLOCK_MONOTONIC), "tsc_khz": tsc_khz},
        }

    def restore_state(self, state: dict, *, advance_time: bool = True) -> None:
        """Write a saved state into this (created, not started) machine.

        With advance_time the guest's TSC moves on by the host time that passed
        since the save, so the guest sees the pause as a gap in time (as after
        a real stop) instead of time standing still.
        """
        shape = require(state, "machine", dict)
        if shape.get("arch") != "x86_64":
            raise StateError(f"state is for a {shape.get('arch')!r} machine, this is x86_64")
        vcpu_states = require(state, "vcpus", list)
        if len(vcpu_states) != len(self.vcpus):
            raise StateError(f"state has {len(vcpu_states)} vCPUs, this machine "
                             f"{len(self.vcpus)}")
        mem = require(state, "machine.memory", dict)
        if mem.get("size") != self.memory.size:
            raise StateError(f"state is for {mem.get('size')} bytes of RAM, this machine has "
                             f"{self.memory.size}")
        devices = require(state, "devices", dict)
        self.serial.set_state(devices["serial"])
        self.debug_exit.set_state(devices["debug_exit"])
        self.vm.set_state(require(state, "vm", dict))
        delta_tsc = 0
        if advance_time:
            t = require(state, "time", dict)
            elapsed = time.clock_gettime_ns(time.CLOCK_MONOTONIC) - t["host_ns"]
            delta_tsc = max(elapsed, 0) * t["tsc_khz"] // 1_000_000
        from .kvm.vcpu import advance_msr
        for vcpu, vs in zip(self.vcpus, vcpu_states):
            if delta_tsc and isinstance(vs.get("msrs"), bytes):
                vs = dict(vs, msrs=advance_msr(vs["msrs"], MSR_IA32_TSC, delta_tsc))
            vcpu.set_state(vs)

    # -- live-update hooks ----------------------------------------------------------------
    # Devices that own something outside the VM (a data-path thread, a vhost fd)
    # join `self.cpr_devices`; each has cpr_quiesce/cpr_unquiesce, cpr_notify(event)
    # and cpr_fds().
    def quiesce_devices(self) -> None:
        for d in self.cpr_devices:
            d.cpr_quiesce()

    def resume_devices(self) -> None:
        for d in self.cpr_devices:
            d.cpr_unquiesce()

    def notify_devices(self, event: str) -> None:
        """The notifier chain: "setup" (release), "failed" (take back), "done"."""
        for d in self.cpr_devices:
            d.cpr_notify(event)

    def kvm_fds(self) -> list[int]:
        """The VM's and vCPUs' fds (for the cpr-exec holder)."""
        return [self.vm.fd] + [v.fd for v in self.vcpus]

    def restore_devices(self, state: dict, fds: dict[str, int]) -> None:
        """Rebuild devices on the fds the old VMM passed, from their saved state (not started)."""
        fds = dict(fds)
        nets = state["devices"].get("nets", [])
        if nets:   # (imported only when needed: this runs inside the downtime)
            from .devices.net import NetDevice
            from .net.tap import Tap
        try:
            for saved in nets:
                name = f"net{saved['index']}.tap"
                if name not in fds:
                    raise StateError(f"the old pyvmm did not pass the tap fd for {name}")
                tap = Tap.from_fd(fds.pop(name))
                dev = NetDevice(saved["index"], tap, None, saved["backend"], self.vm, self.memory)
                self._add_net(dev)
                dev.restore(saved)
        finally:
            for fd in fds.values():   # an fd nobody claimed must not linger in this process
                os.close(fd)

    def cpr_fds(self) -> dict[str, int]:
        """Every fd the new VMM needs, by name: RAM first, then all taps, then the rest."""
        fds = {"ram": self.memory.fd}
        per_device = [d.cpr_fds() for d in self.cpr_devices]
        for kind in ("tap", "vhost", ""):
            for dev_fds in per_device:
                for name, fd in dev_fds.items():
                    if (kind and name.endswith("." + kind)) or \
                            (not kind and not name.endswith((".tap", ".vhost"))):
                        fds[name] = fd
        return fds

    # -- running -----------------------------------------------------------------------
    def start(self, paused: bool = False) -> None:
        """Start the vCPU threads (or, if they were started paused, resume them)."""
        from .cpu import VcpuThread
        if self.threads:
            if not paused:
                self.resume()
            return
        self.threads = [VcpuThread(v, self.pio_bus, self.mmio_bus, self._vcpu_failed,
                                   self.uart_fast) for v in self.vcpus]
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

    def wait_entered(self, timeout: float = 1.0) -> int:
        """After resume(): when the last vCPU went back into the guest (CLOCK_MONOTONIC ns)."""
        deadline = time.monotonic() + timeout
        return max(t.wait_entered(max(deadline - time.monotonic(), 0)) for t in self.threads)

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
        for d in getattr(self, "nets", []):
            d.close()
        self.nets = []
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
