"""The cpr-exec prebuilder, Python side (the C side and the why: csrc/cpr_exec.c).

The old image writes what to build (RAM layout, vCPU count) into a small memfd
and execs Python with pyvmm's KVM module in LD_PRELOAD; that module's
constructor builds the VM on a thread while Python starts.  The new image
takes the result here, or builds the VM itself if there is none.

Its KVM imports are inside the functions on purpose, as everywhere on the cpr-exec
resume path (every import there is downtime).
"""

from __future__ import annotations

import os

PREBUILD_ENV = "PYVMM_CPR_PREBUILD"          # the spec memfd's number (read by C)
PRELOAD_WAS_ENV = "PYVMM_CPR_PRELOAD_WAS"    # LD_PRELOAD before ours, put back by C


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


def exec_env(spec_fd: int) -> dict[str, str]:
    """The variables that make the exec'd Python prebuild (spec_fd must be inheritable)."""
    from ..kvm import _kvm
    env = {PREBUILD_ENV: str(spec_fd), "LD_PRELOAD": _kvm.__file__}
    if os.environ.get("LD_PRELOAD"):
        env[PRELOAD_WAS_ENV] = os.environ["LD_PRELOAD"]
        env["LD_PRELOAD"] += ":" + os.environ["LD_PRELOAD"]
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

    @property
    def ok(self) -> bool:
        return self.status == 1

    @property
    def error(self) -> str:
        return f"{self.step}: {os.strerror(-self.status)}" if self.status < 0 else ""

    def fits(self, size: int, vcpus: int) -> bool:
        return self.ok and self.ram_size == size and len(self.vcpu_fds) == vcpus

    def discard(self) -> None:
        """Close and unmap what was built (it did not fit; the VM is built again)."""
        from ..kvm.ffi import ffi, lib
        for fd in self.vcpu_fds + [self.vm_fd, self.kvm_fd]:
            if fd >= 0:
                os.close(fd)
        if self.ram_addr:
            lib.munmap(ffi.cast("void *", self.ram_addr), self.ram_size)
        self.status = 0


def take() -> Prebuilt | None:
    """Wait for the prebuilder of this image; None if nothing was asked of it."""
    from ..kvm.ffi import ffi, lib
    built = ffi.new("struct pyvmm_prebuilt *")
    lib.pyvmm_prebuilt_wait(built)
    return Prebuilt(built) if built.status else None
