"""The machine: guest RAM, a KVM VM, vCPU threads and devices, put together.

`Machine` owns everything a running guest needs and knows how to start, pause,
resume and stop it.  It is also the unit a live update saves and restores, so
each part it holds can report its state and take it back.

The KVM, device, boot and vCPU modules are imported inside the methods on purpose:
a cpr-exec's new image imports this module on its resume path (every import
there is downtime) and needs only some of them (never the PVH loader).
"""

from __future__ import annotations

import os
import time

from . import sync
from .errors import GuestError, VmmError
from .memory import MiB, GuestMemory
from .state import StateError, require


class MachineConfig:
    """What `pyvmm run` was asked for."""

    def __init__(self, kernel: str | None = None, memory: int = 256 * MiB, cmdline: str = "",
                 vcpus: int = 1, hugetlb: bool = False, console=None, nets=None, devices=None,
                 prealloc: bool = False):
        self.kernel = kernel
        self.memory = memory
        self.cmdline = cmdline
        self.vcpus = vcpus
        self.hugetlb = hugetlb
        self.prealloc = prealloc   # --mem-prealloc: all of RAM allocated before the boot
        self.console = console     # callable taking bytes: serial output; stdout by default
        self.nets = list(nets or [])          # --net specs
        self.devices = list(devices or [])    # --device specs: "KIND[,OPTS]"

    def device_specs(self) -> list[tuple[str, str]]:
        """(kind, spec) of every device the machine has: the defaults, --device, --net."""
        from .devices import DEFAULT_DEVICES
        extra = [tuple(spec.split(",", 1)) if "," in spec else (spec, "")
                 for spec in self.devices]
        return list(DEFAULT_DEVICES) + extra + [("net", spec) for spec in self.nets]


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
    early = prebuilt is not None and prebuilt.early == 1
    for i, vcpu in enumerate(cpus):
        if early:
            # The prebuilder set CPUID and runs these vCPUs already: no vCPU ioctl here
            # (it would wait for their KVM_RUN); CPUID and TSC kHz are the saved ones.
            vcpu.cpuid_bytes = cpuids[i]
            vcpu._tsc_khz = prebuilt.tsc_khz
            continue
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
        from .kvm.vm import MAX_VCPUS
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
        self.devices = []          # every device, in the order they were added
        self.cmdline_extra = []

    # -- building --------------------------------------------------------------------
    def create(self, memory: GuestMemory | None = None, cpuids: list[bytes] | None = None,
               restoring: bool = False, kvm_parts=None) -> None:
        """Open KVM, create the VM on (new or given) RAM, its vCPUs and devices.

        A live update passes the old process's RAM and CPUID here: everything
        in this method can run before the old VMM stops its guest.  `kvm_parts`
        is a (kvm, vm, vcpus) triple made by create_kvm_parts() on another thread.
        """
        from .devices.bus import Bus
        from .devices import DeviceContext
        from .kvm.ffi import ffi

        cfg = self.config
        if memory is None:
            memory = GuestMemory(cfg.memory, hugetlb=cfg.hugetlb)
            if cfg.prealloc:
                try:
                    memory.prealloc()
                except BaseException:
                    memory.close()
                    raise
        self.memory = memory
        if kvm_parts is None:
            kvm_parts = create_kvm_parts(self.memory, cfg.vcpus, cpuids)
        self.kvm, self.vm, self.vcpus = kvm_parts
        if not restoring:     # (a restore takes the MSR list from the saved state)
            for vcpu in self.vcpus:
                vcpu.msr_indices()   # probe once now, not in the middle of a live update

        self.pio_bus = Bus()
        self.mmio_bus = Bus()
        # The vCPU loop's UART fast path, off until the serial device turns it on.
        self.uart_fast = ffi.new("struct pyvmm_uart_fast *", {"out_fd": -1})
        self.uart_ring = self._uart_ring()
        self.ctx = DeviceContext(self.vm, self.memory, self.pio_bus, self.mmio_bus,
                                 cfg.console or stdout_console, self.request_exit,
                                 self.uart_fast)
        if not restoring:   # a live update rebuilds devices from the saved state and fds
            from .devices import device_class
            counts: dict[str, int] = {}
            for kind, spec in cfg.device_specs():
                index = counts[kind] = counts.get(kind, -1) + 1
                self._add(device_class(kind).create(self.ctx, index, spec))

    def _add(self, dev) -> None:
        if any(d.id == dev.id for d in self.devices):
            raise VmmError(f"two devices named {dev.id}")
        snippet = dev.attach(self.ctx)
        if snippet:
            self.cmdline_extra.append(snippet)
        self.devices.append(dev)

    def device(self, id: str):
        """The device named `id` ("serial", "net0"...), or None."""
        return next((d for d in self.devices if d.id == id), None)

    def boot(self) -> None:
        """Write the ACPI tables (the MADT lists every vCPU), load the PVH kernel and
        point the boot vCPU at its 32-bit entry.  The other vCPUs wait for the guest
        to start them (INIT-SIPI-SIPI: KVM keeps an AP in KVM_RUN until then)."""
        from .boot import acpi
        from .boot.pvh import load_pvh
        from .boot.regs import setup_pvh_boot

        cmdline = " ".join(filter(None, [self.config.cmdline] + self.cmdline_extra))
        rsdp = acpi.write(self.memory, len(self.vcpus))
        info = load_pvh(self.config.kernel, self.memory, cmdline, rsdp=rsdp)
        setup_pvh_boot(self.vcpus[0], info.entry, info.start_info)

    # -- state -----------------------------------------------------------------------
    def shape(self) -> dict:
        """What a new VMM needs to build an identical empty machine (no device state)."""
        return {"arch": "x86_64", "vcpus": len(self.vcpus), "memory": self.memory.state(),
                "kernel": self.config.kernel, "cmdline": self.config.cmdline,
                "cpuid": [v.cpuid_bytes for v in self.vcpus],
                "devices": sorted({d.KIND for d in self.devices})}

    def save_state(self) -> dict:
        """Everything about the paused machine except guest RAM (which stays in its memfd)."""
        return self.add_device_state(self.save_kernel_state())

    def save_kernel_state(self) -> dict:
        """The paused machine's VM and vCPU state, and when it was read: what the guest
        needs to run again (cpr-transfer's early start hands it over before the rest)."""
        if self.running:
            raise VmmError("pause the machine before saving its state")
        tsc_khz = self.vcpus[0].tsc_khz()
        return {
            "vm": self.vm.get_state(),
            "vcpus": [v.get_state() for v in self.vcpus],
            "time": {"host_ns": time.clock_gettime_ns(time.CLOCK_MONOTONIC), "tsc_khz": tsc_khz},
        }

    def add_device_state(self, kernel: dict) -> dict:
        """save_kernel_state()'s state, made whole: the machine's shape and its devices'."""
        return {"machine": self.shape(), "vm": kernel["vm"], "vcpus": kernel["vcpus"],
                "devices": self.save_devices(), "time": kernel["time"]}

    def restore_state(self, state: dict, *, advance_time: bool = True) -> None:
        """Write a saved state into this (created, not started) machine.

        With advance_time the guest's TSC moves on by the host time that passed
        since the save, so the guest sees the pause as a gap in time (as after
        a real stop) instead of time standing still.  All vCPUs get one TSC value
        (see below), so the guest's cross-CPU clock stays monotonic.
        """
        vcpu_states = self.check_fits(state)
        self.vm.set_state(require(state, "vm", dict))
        delta_tsc = 0
        if advance_time:
            t = require(state, "time", dict)
            elapsed = time.clock_gettime_ns(time.CLOCK_MONOTONIC) - t["host_ns"]
            delta_tsc = max(elapsed, 0) * t["tsc_khz"] // 1_000_000
        from .kvm.vcpu import MSR_IA32_TSC, msr_offset, set_msr
        # One clock: every vCPU's TSC is written with the same value, vCPU 0's (the vCPUs
        # were saved one after the other, their TSCs read microseconds apart).  KVM takes
        # host writes of one value within a second of each other as a TSC sync and gives
        # every vCPU the same offset, so the guest's TSCs stay exactly in step.
        saved = vcpu_states[0].get("msrs")
        at = msr_offset(saved, MSR_IA32_TSC) if isinstance(saved, bytes) else None
        tsc = None if at is None else int.from_bytes(saved[at + 8:at + 16], "little")
        for vcpu, vs in zip(self.vcpus, vcpu_states):
            if tsc is not None and isinstance(vs.get("msrs"), bytes):
                vs = dict(vs, msrs=set_msr(vs["msrs"], MSR_IA32_TSC, tsc + delta_tsc, at))
            vcpu.set_state(vs)

    def check_fits(self, state: dict) -> list:
        """StateError unless `state` is for a machine like this one (architecture,
        vCPU count, RAM size); its vCPU states."""
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
        return vcpu_states

    def adopt_state(self, state: dict) -> None:
        """After C restored the vCPU and VM state (the cpr-exec prebuilder,
        csrc/cpr_exec.c, or cpr-transfer's handoff, csrc/handoff.c): what
        restore_state() would learn besides writing it."""
        for vcpu, vs in zip(self.vcpus, state["vcpus"]):
            vcpu.adopt_state(vs, written_elsewhere=True)

    def take_over_early(self, prebuilt) -> tuple[int, int, int | None]:
        """Stop the prebuilder's vCPU threads; each of ours completes first the exit its
        early thread left for Python, if any (so none is lost or run twice).  Returns
        when the last early thread went into the guest (CLOCK_MONOTONIC ns), how many
        exits were handed over, and how many console bytes the cpr-exec prebuilder's
        threads wrote from their own coalesced ring (None: they had none): the THR's
        zone they registered is ours now (csrc/cpr_exec.c, pyvmm_early_uart_zone),
        not registered twice."""
        from .kvm.ffi import ffi, lib
        pending, entered = prebuilt.stop_early()
        for thread, reason in zip(self.threads, pending):
            thread.pending_exit = reason
        drained = ffi.new("uint64_t *")
        zone = lib.pyvmm_early_uart_zone(drained)
        if zone == 1 and self.uart_ring is not None:
            self.uart_ring.registered = 1
        return entered, sum(1 for reason in pending if reason), \
            (drained[0] if zone >= 0 else None)

    # -- devices: one list, walked for every step of a live update --------------------------
    def save_devices(self) -> dict:
        """state["devices"]: each device's entry (vmm/devices/__init__.py), by id."""
        from .devices import entry
        return {d.id: entry(d) for d in self.devices}

    def restore_devices(self, state: dict, fds: dict[str, int]) -> None:
        """Build the saved devices on the fds the old VMM passed (not started: resume_devices).
        Only the modules of the kinds the state names are imported (this is downtime)."""
        from .devices import device_class
        fds = dict(fds)
        try:
            for id, saved in state["devices"].items():
                cls = device_class(saved["kind"])
                mine = {}
                for name in saved["fds"]:
                    if f"{id}.{name}" not in fds:
                        raise StateError(f"the old pyvmm did not pass the fd {id}.{name}")
                    mine[name] = fds.pop(f"{id}.{name}")
                tree = cls.State.upgrade(saved["version"], saved["state"])
                self._add(cls.restore(self.ctx, cls.State.from_tree(tree), mine))
        finally:
            for fd in fds.values():   # an fd nobody claimed must not linger in this process
                os.close(fd)

    def warm_up_restore(self, kinds) -> None:
        """Run the device save/restore path once, before a live update's stop, on
        throwaway devices of these kinds: a first run in a fresh process is the slow
        one (State classes, their schema maps, the models' code paths), and in the
        new VMM the real one runs inside the downtime.  Kinds that pass fds (a net
        device's tap) only import what they need (Device.warm_up): creating one
        would open what it owns.  The throwaways sit on buses of their own, never
        the machine's."""
        from .devices import Device, DeviceContext, device_class, entry
        from .devices.bus import Bus
        from .kvm.ffi import ffi
        ctx = DeviceContext(self.vm, self.memory, Bus(), Bus(), lambda data: None,
                            lambda code: None, ffi.NULL)
        for kind in kinds:
            cls = device_class(kind)
            if cls.fds is not Device.fds:
                cls.warm_up()
                continue
            tree = entry(cls.create(ctx, 0, ""))["state"]
            cls.State.check(tree, "warm-up")
            cls.restore(ctx, cls.State.from_tree(tree), {}).close()

    def quiesce_devices(self) -> None:
        for d in self.devices:
            d.quiesce()

    def resume_devices(self) -> None:
        for d in self.devices:
            d.resume()

    def roll_back(self, *, was_running: bool, released: bool, mmio_writes=()) -> bool:
        """After a live update or a migration failed with the guest stopped: the devices
        taken back (if the update had released them: the "failed" notifier) and running
        again, then the vCPUs if the guest ran before the stop (a paused guest stays
        paused); whether they were resumed (the caller emits RESUME).  `mmio_writes`:
        writes a vCPU made elsewhere that KVM retired but no device saw (a cpr-transfer
        guest handed back after its early start), given to the devices first."""
        if released:
            self.notify_devices("failed")
        self.resume_devices()
        for addr, data in mmio_writes:
            self.mmio_bus.write(addr, data)
        if was_running:
            self.resume()
        return was_running

    def log_dirty_devices(self, log) -> None:
        """Live migration: every device logs the guest RAM it writes in `log` (None: stop)."""
        for d in self.devices:
            d.log_dirty(log)

    def notify_devices(self, event: str) -> None:
        """The notifier chain: "setup" (release), "failed" (take back), "done"."""
        for d in self.devices:
            d.notify(event)

    def kvm_fds(self) -> list[int]:
        """The VM's and vCPUs' fds (for the cpr-exec holder)."""
        return [self.vm.fd] + [v.fd for v in self.vcpus]

    def cpr_fds(self) -> dict[str, int]:
        """Every fd the new VMM needs, by name ("<device id>.<name>"): RAM first, then
        each device's, in device order."""
        fds = {"ram": self.memory.fd}
        for d in self.devices:
            fds.update((f"{d.id}.{name}", fd) for name, fd in d.fds().items())
        return fds

    def _uart_ring(self):
        """The VM's coalesced-PIO ring for the UART's THR writes (a `struct
        pyvmm_uart_ring`, csrc/vcpu_run.h), or None where KVM has none."""
        from .kvm.ffi import ffi, lib
        kvm = self.kvm
        if not self.vcpus or kvm.check_extension(lib.KVM_CAP_COALESCED_PIO) <= 0:
            return None
        ring = ffi.new("struct pyvmm_uart_ring *")
        if lib.pyvmm_uart_ring_init(ring, self.vm.fd, self.vcpus[0].run, kvm.vcpu_mmap_size,
                                    kvm.check_extension(lib.KVM_CAP_COALESCED_MMIO)) < 0:
            return None
        return ring

    def _coalesce_console(self) -> None:
        """Our vCPU threads run the guest: THR writes may go to the coalesced ring."""
        serial = self.device("serial")
        if self.uart_ring is not None and serial is not None:
            serial.uart.coalesce(self.uart_ring)   # (once: it keeps a ring it has)

    # -- running -----------------------------------------------------------------------
    def start(self, paused: bool = False) -> None:
        """Start the vCPU threads, once: running, or parked (paused=True: a new VMM's
        empty machine, run later by resume())."""
        from .cpu import VcpuThread
        self.threads = [VcpuThread(v, self.pio_bus, self.mmio_bus, self._vcpu_failed,
                                   self.uart_fast) for v in self.vcpus]
        if not paused:
            self._coalesce_console()
        for t in self.threads:
            t.start(paused=paused)
        self.running = not paused

    def pause(self) -> None:
        """Every vCPU out of the guest, each with its last exit completed (none is left
        half-way through one): all are kicked at once, then waited for."""
        for t in self.threads:
            t.request_pause()
        for t in self.threads:
            t.wait_paused()
        self.running = False

    def resume(self) -> None:
        self._coalesce_console()
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
        for d in self.devices:
            d.close()
        self.devices = []
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
