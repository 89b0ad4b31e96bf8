"""/dev/kvm: the API version, capabilities, supported CPUID (VMs: vmm.kvm.vm.build)."""

from __future__ import annotations

import errno
import os

from ..errors import KvmError
from .ffi import ffi, ioctl, ioctl_int, lib

KVM_PATH = "/dev/kvm"
MAX_CPUID_ENTRIES = 256

# What pyvmm needs from KVM, checked once at start so a missing piece is a
# clear message rather than an odd failure deep inside a live update.
REQUIRED_CAPS = {
    "KVM_CAP_IRQCHIP": "an in-kernel interrupt controller",
    "KVM_CAP_USER_MEMORY": "user memory slots",
    "KVM_CAP_SET_TSS_ADDR": "KVM_SET_TSS_ADDR",
    "KVM_CAP_EXT_CPUID": "KVM_GET_SUPPORTED_CPUID",
    "KVM_CAP_IOEVENTFD": "ioeventfds",
    "KVM_CAP_IRQFD": "irqfds",
    "KVM_CAP_IMMEDIATE_EXIT": "kvm_run.immediate_exit (to pause vCPUs)",
}


class Kvm:
    """An open /dev/kvm."""

    def __init__(self, path: str = KVM_PATH, *, fd: int | None = None):
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC) if fd is None else fd
        except FileNotFoundError:
            raise KvmError(f"{path} not found: this machine has no KVM (load the kvm module, "
                           "or enable virtualization in the firmware or for this VM)") from None
        except PermissionError:
            raise KvmError(f"permission denied opening {path}: run as root or add your "
                           "user to the 'kvm' group") from None
        except OSError as e:
            raise KvmError(f"cannot open {path}: {e.strerror}") from None
        version = ioctl_int(self.fd, lib.KVM_GET_API_VERSION, what="GET_API_VERSION")
        if version != lib.KVM_API_VERSION:
            raise KvmError(f"KVM API version {version}, pyvmm needs {lib.KVM_API_VERSION}")
        for cap, what in REQUIRED_CAPS.items():
            if not self.check_extension(getattr(lib, cap)):
                raise KvmError(f"this KVM lacks {cap} ({what}), which pyvmm needs")
        self.vcpu_mmap_size = ioctl_int(self.fd, lib.KVM_GET_VCPU_MMAP_SIZE,
                                        what="GET_VCPU_MMAP_SIZE")
        self._msr_list: list[int] | None = None

    def check_extension(self, cap: int) -> int:
        r = lib.pyvmm_ioctl_int(self.fd, lib.KVM_CHECK_EXTENSION, cap)
        return max(r, 0)

    def supported_cpuid(self):
        """KVM_GET_SUPPORTED_CPUID as a `struct kvm_cpuid2 *`."""
        cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": MAX_CPUID_ENTRIES,
                                                "entries": MAX_CPUID_ENTRIES})
        cpuid.nent = MAX_CPUID_ENTRIES
        ioctl(self.fd, lib.KVM_GET_SUPPORTED_CPUID, cpuid, what="GET_SUPPORTED_CPUID")
        return cpuid

    def msr_index_list(self) -> list[int]:
        """The MSRs KVM can save and restore for a vCPU."""
        if self._msr_list is None:
            n = 1024
            lst = ffi.new("struct kvm_msr_list *", {"nmsrs": n, "indices": n})
            lst.nmsrs = n
            r = lib.pyvmm_ioctl(self.fd, lib.KVM_GET_MSR_INDEX_LIST, lst)
            if r < 0 and -r != errno.E2BIG:
                raise KvmError(f"KVM GET_MSR_INDEX_LIST failed: {os.strerror(-r)}")
            self._msr_list = [lst.indices[i] for i in range(lst.nmsrs)]
        return self._msr_list

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
