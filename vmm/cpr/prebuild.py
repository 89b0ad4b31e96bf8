"""The cpr-exec prebuilder, Python side (the C side and the why: csrc/cpr_exec.c).

The old image writes what to build (RAM layout, vCPU count) into a small memfd
and execs pyvmm-cpr-exec, a small C launcher (csrc/cpr_launch.c) that loads
libpython itself, or, for a Python without a shared libpython, Python with
libpyvmm_kvm.so in LD_PRELOAD.  Either way that library's constructor builds
the VM on a thread, before libpython is loaded (launcher) or while Python
starts (LD_PRELOAD).  The new image takes the result here, or builds the VM
itself if there is none.

The early start: after its save, the old image also writes the saved vCPU, VM
and irqchip state into that memfd (write_early); the prebuilder restores it and
runs the vCPUs in C, so the guest runs while Python starts.  The new image's
resume path restores the devices, then takes the vCPUs over (Prebuilt.stop_early).

Its KVM imports are inside the functions on purpose, as everywhere on the cpr-exec
resume path (every import there is downtime).
"""

from __future__ import annotations

import os

PREBUILD_ENV = "PYVMM_CPR_PREBUILD"          # the spec memfd's number (read by C)
PRELOAD_WAS_ENV = "PYVMM_CPR_PRELOAD_WAS"    # LD_PRELOAD before ours, put back by C
LIBPYTHON_ENV = "PYVMM_CPR_LIBPYTHON"        # what the launcher loads (csrc/cpr_launch.c)
LAUNCHER_ENV = "PYVMM_CPR_LAUNCHER"          # "off": exec python with LD_PRELOAD instead
NICE_WAS_ENV = "PYVMM_CPR_NICE_WAS"          # the main thread's nice, given back to it by C


def request(memory, vcpus: int) -> int:
    """A memfd holding the prebuild spec for a VM like ours (old image, before the stop)."""
    from ..kvm.ffi import ffi, lib
    from ..kvm.vm import layout
    spec = ffi.new("struct pyvmm_prebuild_spec *")
    spec.magic = lib.PYVMM_PREBUILD_MAGIC
    spec.version = lib.PYVMM_PREBUILD_VERSION
    spec.ram_fd = memory.fd
    spec.ram_size = memory.size
    spec.layout = layout(memory, vcpus)[0]   # the layout vmm.kvm.vm.build gives C too
    fd = os.memfd_create("pyvmm-prebuild", os.MFD_CLOEXEC)
    os.write(fd, bytes(ffi.buffer(spec)))
    return fd


def write_early(spec_fd: int, machine, state: dict, uart: bool = True,
                corrupt: bool = False) -> bool:
    """After the save of a running guest: the state the prebuilder restores before
    Python starts (struct pyvmm_early_header, csrc/cpr_exec.h), after the spec.
    False (nothing written: Python restores as before) if a CPUID does not fit.
    `uart`: the new image keeps this console (the UART fast path may serve it early).
    `corrupt` (fault point early-state) writes a block the prebuilder must refuse."""
    from ..kvm.ffi import ffi, lib
    from ..kvm.vm import Vm
    cpuids = state["machine"]["cpuid"]
    room = ffi.sizeof("struct pyvmm_early_cpuid")
    if any(len(c) > room for c in cpuids):
        return False
    h = ffi.new("struct pyvmm_early_header *")
    h.magic, h.version = lib.PYVMM_EARLY_MAGIC, lib.PYVMM_EARLY_VERSION
    h.nvcpus = len(machine.vcpus)
    h.header_size = ffi.sizeof(h[0])
    h.vm_size = ffi.sizeof("struct pyvmm_vm_state")
    h.vcpu_size = ffi.sizeof("struct pyvmm_vcpu_state")
    h.cpuid_size = room
    h.save_ns, h.tsc_khz = state["time"]["host_ns"], state["time"]["tsc_khz"]
    fast = machine.uart_fast
    if uart and fast.enabled and fast.out_fd in (1, 2):   # a console the exec keeps
        h.flags = lib.PYVMM_EARLY_UART
        h.uart_fd, h.uart_base, h.uart_lsr = fast.out_fd, fast.base, fast.lsr
    parts = [bytes(ffi.buffer(h)), bytes(Vm.restore_struct(state["vm"])[1])]
    for i, (vcpu, vs) in enumerate(zip(machine.vcpus, state["vcpus"])):
        s, buf = vcpu.restore_struct(vs)
        if corrupt and i == 0:
            s.npieces = lib.PYVMM_VCPU_NPIECES + 1
        parts += [bytes(buf), cpuids[i].ljust(room, b"\0")]
    os.pwrite(spec_fd, b"".join(parts), ffi.sizeof("struct pyvmm_prebuild_spec"))
    return True


def _library() -> str:
    """libpyvmm_kvm.so: the KVM module's C, which the module links from its own directory."""
    from ..kvm import _kvm
    return os.path.join(os.path.dirname(_kvm.__file__), "libpyvmm_kvm.so")


def launcher() -> tuple[str, str] | None:
    """(pyvmm-cpr-exec, the libpython it is to load), or None when this interpreter
    does not run from a shared libpython (a static python, as Debian's: then
    LD_PRELOAD), the launcher was not built, or PYVMM_CPR_LAUNCHER=off asks for
    LD_PRELOAD (to compare the two).  Only for exec'ing this very interpreter."""
    if os.environ.get(LAUNCHER_ENV) == "off":
        return None
    path = os.path.join(os.path.dirname(_library()), "pyvmm-cpr-exec")
    libpython = _loaded_libpython()
    if libpython is None or not os.access(path, os.X_OK):
        return None
    return path, libpython


def _loaded_libpython() -> str | None:
    """The libpython this process runs from, as mapped (/proc/self/maps), or None.
    Not sysconfig's LIBDIR/INSTSONAME alone: Debian's python3.11 names
    libpython3.11.so.1.0 there, which may be installed, yet its binary has the
    interpreter linked in and never loads it."""
    import sysconfig
    soname = sysconfig.get_config_var("INSTSONAME")
    if not soname or ".so" not in soname:
        return None
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and os.path.basename(fields[5].rstrip("\n")) == soname:
                return fields[5].rstrip("\n")
    return None


def exec_env(spec_fd: int, libpython: str | None) -> dict[str, str]:
    """The variables that make the exec'd image prebuild (spec_fd must be inheritable):
    for the launcher, the libpython it loads; else our library in LD_PRELOAD."""
    env = {PREBUILD_ENV: str(spec_fd)}
    if libpython:
        env[LIBPYTHON_ENV] = libpython
        return env
    env["LD_PRELOAD"] = _library()
    env[PRELOAD_WAS_ENV] = os.environ.get("LD_PRELOAD", "")
    if env[PRELOAD_WAS_ENV]:
        env["LD_PRELOAD"] += ":" + env[PRELOAD_WAS_ENV]
    return env


class Prebuilt:
    """What the prebuilder made: fds to adopt, or why it made nothing."""

    def __init__(self, built):
        from ..kvm.ffi import ffi
        self.status = built.status
        self.step = ffi.string(built.vm.step).decode(errors="replace")
        self.kvm_fd, self.vm_fd = built.kvm_fd, built.vm.vm_fd
        self.vcpu_fds = [built.vm.vcpu_fds[i] for i in range(built.vm.nvcpus)]
        self.ram_addr, self.ram_size = built.ram_addr, built.ram_size
        self.t_start_ns, self.t_done_ns = built.t_start_ns, built.t_done_ns
        self.early = built.early       # 1: the guest runs on the prebuilder's vCPU threads
        self.early_step = ffi.string(built.early_step).decode(errors="replace")
        self.t_early_ns, self.tsc_khz = built.t_early_ns, built.tsc_khz

    @property
    def ok(self) -> bool:
        return self.status == 1

    @property
    def error(self) -> str:
        return f"{self.step}: {os.strerror(-self.status)}" if self.status < 0 else ""

    @property
    def early_error(self) -> str:
        return f"{self.early_step}: {os.strerror(-self.early)}" if self.early < 0 else ""

    def stop_early(self) -> tuple[list[int], int]:
        """Stop and join the prebuilder's vCPU threads: the exit each left in kvm_run
        for Python (0: none), and when the last of them went into the guest."""
        from ..kvm.ffi import ffi, lib
        n = len(self.vcpu_fds)
        pending, entered = ffi.new("int32_t[]", n), ffi.new("int64_t[]", n)
        lib.pyvmm_early_stop(pending, entered, n)
        self.early = 0
        return list(pending), max(entered)

    def capture_early(self, state: dict) -> dict:
        """`state` with the vCPU and VM state as they are now, the early vCPUs stopped:
        for the fallback re-exec when the restore failed after the early start (the
        guest ran here since the save; the saved vCPU state under today's RAM would
        turn it back in time).  An exit an early thread left for a Python device is
        not completed (the device was never restored here): KVM retires a port I/O
        instruction or an MMIO read only when it completes, so the next image runs
        that instruction again and its device sees the access once; an MMIO write
        KVM has retired already, so the next image replays it to its device before
        the vCPUs run (state["cpr"]["mmio_writes"], target.resume_guest)."""
        import time
        from ..kvm.ffi import lib
        from ..kvm.system import Kvm
        from ..kvm.vcpu import Vcpu
        from ..kvm.vm import Vm
        pending, _ = self.stop_early()
        lib.pyvmm_early_reap()
        vm = Vm(Kvm(fd=self.kvm_fd), self.vm_fd)
        vm.has_irqchip = vm.has_pit = True   # pyvmm_build_vm makes both
        vcpus = [Vcpu(vm, i, fd) for i, fd in enumerate(self.vcpu_fds)]
        state["vcpus"], writes = read_stopped(vcpus, pending, state["vcpus"])
        state["vm"] = vm.get_state()
        state["time"] = dict(state["time"], host_ns=time.clock_gettime_ns(time.CLOCK_MONOTONIC))
        state["cpr"]["mmio_writes"] = writes
        return state

    def fits(self, size: int, vcpus: int) -> bool:
        return self.ok and self.ram_size == size and len(self.vcpu_fds) == vcpus

    def discard(self) -> None:
        """Close and unmap what was built (it did not fit; the VM is built again)."""
        from ..kvm.ffi import ffi, lib
        if self.early == 1:
            self.stop_early()
            lib.pyvmm_early_reap()
        for fd in self.vcpu_fds + [self.vm_fd, self.kvm_fd]:
            if fd >= 0:
                os.close(fd)
        if self.ram_addr:
            lib.munmap(ffi.cast("void *", self.ram_addr), self.ram_size)
        self.status = 0


def read_stopped(vcpus, pending, saved=None) -> tuple[list, list]:
    """The state of vCPUs whose early threads were stopped (pyvmm_early_stop's
    `pending`: the exit each left for Python), and the MMIO writes among those exits:
    KVM retired them already, so whoever runs the guest next replays them to its
    devices.  `saved`: the vCPU states written at the start (their MSR list is the one
    to read).  The cpr-exec fallback and cpr-transfer's hand-back both read so."""
    from ..kvm.ffi import ffi, lib
    states, writes = [], []
    for i, vcpu in enumerate(vcpus):
        m = vcpu.run.mmio
        if pending[i] == lib.KVM_EXIT_MMIO and m.is_write:
            writes.append([m.phys_addr, bytes(ffi.buffer(m.data, m.len))])
        if saved is not None:
            vcpu.adopt_state(saved[i])
        states.append(vcpu.get_state())
    return states, writes


def take() -> Prebuilt | None:
    """Wait for the prebuilder of this image; None if nothing was asked of it."""
    from ..kvm.ffi import ffi, lib
    built = ffi.new("struct pyvmm_prebuilt *")
    lib.pyvmm_prebuilt_wait(built)
    return Prebuilt(built) if built.status else None
