"""cffi build script for the KVM binding (API mode, compiled against <linux/kvm.h>).

The cdef below names the structs and ioctl numbers pyvmm uses; in API mode cffi
checks every declared field against the real header at build time, so a wrong
layout fails the build instead of corrupting a guest.  Structs whose tail we do
not need end in `...;` and take their size from the header.
"""

import os
import sys

import cffi

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from vmm.cffi_header import cdef_from_header  # noqa: E402

ffibuilder = cffi.FFI()

IOCTLS = """
KVM_GET_API_VERSION KVM_CREATE_VM KVM_CHECK_EXTENSION KVM_GET_VCPU_MMAP_SIZE
KVM_GET_SUPPORTED_CPUID KVM_GET_MSR_INDEX_LIST KVM_CREATE_VCPU KVM_RUN
KVM_SET_USER_MEMORY_REGION KVM_SET_TSS_ADDR KVM_SET_IDENTITY_MAP_ADDR
KVM_CREATE_IRQCHIP KVM_CREATE_PIT2 KVM_GET_IRQCHIP KVM_SET_IRQCHIP KVM_IRQ_LINE
KVM_GET_PIT2 KVM_SET_PIT2 KVM_GET_CLOCK KVM_SET_CLOCK KVM_IOEVENTFD KVM_IRQFD
KVM_GET_DIRTY_LOG KVM_ENABLE_CAP KVM_SET_GSI_ROUTING KVM_SET_BOOT_CPU_ID
KVM_GET_REGS KVM_SET_REGS KVM_GET_SREGS KVM_SET_SREGS KVM_GET_FPU KVM_SET_FPU
KVM_GET_XSAVE KVM_SET_XSAVE KVM_GET_XCRS KVM_SET_XCRS KVM_GET_MSRS KVM_SET_MSRS
KVM_GET_LAPIC KVM_SET_LAPIC KVM_GET_VCPU_EVENTS KVM_SET_VCPU_EVENTS
KVM_GET_MP_STATE KVM_SET_MP_STATE KVM_GET_DEBUGREGS KVM_SET_DEBUGREGS
KVM_SET_CPUID2 KVM_GET_CPUID2 KVM_GET_TSC_KHZ KVM_SET_TSC_KHZ KVM_KVMCLOCK_CTRL
KVM_HAS_DEVICE_ATTR KVM_GET_DEVICE_ATTR KVM_SET_DEVICE_ATTR
""".split()

CONSTANTS = """
KVM_API_VERSION KVM_EXIT_UNKNOWN KVM_EXIT_EXCEPTION KVM_EXIT_IO KVM_EXIT_HYPERCALL
KVM_EXIT_DEBUG KVM_EXIT_HLT KVM_EXIT_MMIO KVM_EXIT_IRQ_WINDOW_OPEN KVM_EXIT_SHUTDOWN
KVM_EXIT_FAIL_ENTRY KVM_EXIT_INTR KVM_EXIT_INTERNAL_ERROR KVM_EXIT_SYSTEM_EVENT
KVM_EXIT_IO_IN KVM_EXIT_IO_OUT
KVM_SYSTEM_EVENT_SHUTDOWN KVM_SYSTEM_EVENT_RESET KVM_SYSTEM_EVENT_CRASH
KVM_CAP_IRQCHIP KVM_CAP_HLT KVM_CAP_USER_MEMORY KVM_CAP_SET_TSS_ADDR KVM_CAP_PIT2
KVM_CAP_EXT_CPUID KVM_CAP_IOEVENTFD KVM_CAP_IRQFD KVM_CAP_ADJUST_CLOCK KVM_CAP_XSAVE
KVM_CAP_XCRS KVM_CAP_VCPU_EVENTS KVM_CAP_DEBUGREGS KVM_CAP_MP_STATE KVM_CAP_NR_MEMSLOTS
KVM_CAP_IMMEDIATE_EXIT KVM_CAP_SET_IDENTITY_MAP_ADDR KVM_CAP_GET_TSC_KHZ KVM_CAP_TSC_CONTROL
KVM_CAP_XSAVE2 KVM_CAP_IRQ_ROUTING KVM_CAP_NR_VCPUS KVM_CAP_MAX_VCPUS KVM_CAP_KVMCLOCK_CTRL
KVM_MEM_LOG_DIRTY_PAGES KVM_MEM_READONLY
KVM_IRQCHIP_PIC_MASTER KVM_IRQCHIP_PIC_SLAVE KVM_IRQCHIP_IOAPIC
KVM_IOEVENTFD_FLAG_DATAMATCH KVM_IOEVENTFD_FLAG_PIO KVM_IOEVENTFD_FLAG_DEASSIGN
KVM_IRQFD_FLAG_DEASSIGN KVM_PIT_SPEAKER_DUMMY
KVM_MP_STATE_RUNNABLE KVM_MP_STATE_UNINITIALIZED KVM_MP_STATE_HALTED
KVM_VCPUEVENT_VALID_NMI_PENDING KVM_VCPUEVENT_VALID_SIPI_VECTOR KVM_VCPUEVENT_VALID_SHADOW
KVM_VCPUEVENT_VALID_SMM KVM_NR_INTERRUPTS KVM_APIC_REG_SIZE KVM_MAX_XCRS
KVM_CLOCK_TSC_STABLE KVM_CLOCK_REALTIME KVM_CLOCK_HOST_TSC
KVM_VCPU_TSC_CTRL KVM_VCPU_TSC_OFFSET KVM_CAP_COALESCED_MMIO KVM_CAP_COALESCED_PIO
""".split()

CDEF = """
typedef unsigned long long __u64;
typedef unsigned int __u32;
typedef unsigned short __u16;
typedef unsigned char __u8;
typedef int __s32;

struct kvm_regs {
    __u64 rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    __u64 r8, r9, r10, r11, r12, r13, r14, r15;
    __u64 rip, rflags;
};
struct kvm_segment {
    __u64 base; __u32 limit; __u16 selector; __u8 type;
    __u8 present, dpl, db, s, l, g, avl; __u8 unusable; __u8 padding;
};
struct kvm_dtable { __u64 base; __u16 limit; __u16 padding[3]; };
struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    __u64 cr0, cr2, cr3, cr4, cr8;
    __u64 efer;
    __u64 apic_base;
    __u64 interrupt_bitmap[4];
};
struct kvm_fpu {
    __u8 fpr[8][16]; __u16 fcw; __u16 fsw; __u8 ftwx; __u8 pad1;
    __u16 last_opcode; __u64 last_ip; __u64 last_dp;
    __u8 xmm[16][16]; __u32 mxcsr; __u32 pad2;
};
struct kvm_xsave { __u32 region[1024]; ...; };
struct kvm_xcr { __u32 xcr; __u32 reserved; __u64 value; };
struct kvm_xcrs { __u32 nr_xcrs; __u32 flags; struct kvm_xcr xcrs[16]; __u64 padding[16]; };
struct kvm_msr_entry { __u32 index; __u32 reserved; __u64 data; };
struct kvm_msrs { __u32 nmsrs; __u32 pad; struct kvm_msr_entry entries[]; };
struct kvm_msr_list { __u32 nmsrs; __u32 indices[]; };
struct kvm_lapic_state { char regs[1024]; };
struct kvm_vcpu_events {
    struct { __u8 injected; __u8 nr; __u8 has_error_code; __u8 pending;
             __u32 error_code; } exception;
    struct { __u8 injected; __u8 nr; __u8 soft; __u8 shadow; } interrupt;
    struct { __u8 injected; __u8 pending; __u8 masked; __u8 pad; } nmi;
    __u32 sipi_vector;
    __u32 flags;
    struct { __u8 smm; __u8 pending; __u8 smm_inside_nmi; __u8 latched_init; } smi;
    struct { __u8 pending; } triple_fault;
    __u8 reserved[26];
    __u8 exception_has_payload;
    __u64 exception_payload;
};
struct kvm_mp_state { __u32 mp_state; };
struct kvm_debugregs { __u64 db[4]; __u64 dr6; __u64 dr7; __u64 flags; __u64 reserved[9]; };
struct kvm_cpuid_entry2 {
    __u32 function; __u32 index; __u32 flags;
    __u32 eax; __u32 ebx; __u32 ecx; __u32 edx; __u32 padding[3];
};
struct kvm_cpuid2 { __u32 nent; __u32 padding; struct kvm_cpuid_entry2 entries[]; };
struct kvm_irqchip { __u32 chip_id; __u32 pad; union { char dummy[512]; } chip; ...; };
struct kvm_pit_state2 { ...; };
struct kvm_clock_data { __u64 clock; __u32 flags; __u32 pad0; __u64 realtime;
                        __u64 host_tsc; __u32 pad[4]; };
struct kvm_userspace_memory_region {
    __u32 slot; __u32 flags; __u64 guest_phys_addr; __u64 memory_size;
    __u64 userspace_addr;
};
struct kvm_irq_level { __u32 irq; __u32 level; };
struct kvm_pit_config { __u32 flags; __u32 pad[15]; };
struct kvm_irqfd { __u32 fd; __u32 gsi; __u32 flags; __u32 resamplefd; __u8 pad[16]; };
struct kvm_ioeventfd {
    __u64 datamatch; __u64 addr; __u32 len; __s32 fd; __u32 flags; __u8 pad[36];
};
struct kvm_dirty_log { __u32 slot; __u32 padding1; void *dirty_bitmap; ...; };
struct kvm_device_attr { __u32 flags; __u32 group; __u64 attr; __u64 addr; };
struct kvm_enable_cap { __u32 cap; __u32 flags; __u64 args[4]; __u8 pad[64]; };

struct kvm_run {
    __u8 request_interrupt_window;
    __u8 immediate_exit;
    __u32 exit_reason;
    __u8 ready_for_interrupt_injection;
    __u8 if_flag;
    __u16 flags;
    __u64 cr8;
    __u64 apic_base;
    union {
        struct { __u64 hardware_exit_reason; } hw;
        struct { __u64 hardware_entry_failure_reason; __u32 cpu; } fail_entry;
        struct { __u32 exception; __u32 error_code; } ex;
        struct { __u8 direction; __u8 size; __u16 port; __u32 count;
                 __u64 data_offset; } io;
        struct { __u64 phys_addr; __u8 data[8]; __u32 len; __u8 is_write; } mmio;
        struct { __u32 suberror; __u32 ndata; __u64 data[16]; } internal;
        struct { __u32 type; __u32 ndata; __u64 data[16]; } system_event;
        char padding[256];
    };
    ...;
};

void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
int munmap(void *addr, size_t length);
int madvise(void *addr, size_t length, int advice);
#define MADV_POPULATE_WRITE ...
#define PROT_READ ...
#define PROT_WRITE ...
#define MAP_SHARED ...

#define SIGUSR1 ...

"""

CDEF += "".join(f"#define {name} ...\n" for name in IOCTLS + CONSTANTS)
# The C parts of this module, declared by their headers (the contract, one copy):
# csrc/vcpu_run.c, the vCPU run loop with the UART fast path and the kick;
# csrc/build_vm.c, the one way a VM is built (normal boot and cpr-exec prebuilder);
# csrc/cpr_exec.c, the cpr-exec prebuilder and holder;
# csrc/kvm_state.c, a vCPU's and the VM's state in one call each;
# csrc/migrate.c, live migration's RAM pages sent and received;
# csrc/commit.c, cpr-transfer's point of no return in a shared word;
# csrc/handoff.c, cpr-transfer's VM and vCPU state written in the new VMM ahead of the rest.
for header in ("vcpu_run.h", "build_vm.h", "cpr_exec.h", "kvm_state.h", "migrate.h",
               "commit.h", "handoff.h"):
    CDEF += cdef_from_header(os.path.join(ROOT, "csrc", header))

ffibuilder.cdef(CDEF)

# The C itself is a plain shared library, libpyvmm_kvm.so beside the module (setup.py
# builds it first, from these sources with these flags; the module links it with
# $ORIGIN as its run path): it has no Python in it, so cpr-exec's launcher
# (csrc/cpr_launch.c) can load it, start the prebuilder and run the guest before
# libpython is even mapped.  Both share one copy of its state.
LIBRARY = "pyvmm_kvm"
LIBRARY_SOURCES = ["csrc/vcpu_run.c", "csrc/build_vm.c", "csrc/cpr_exec.c", "csrc/kvm_state.c",
                   "csrc/migrate.c", "csrc/commit.c", "csrc/handoff.c"]
LAUNCHER = "pyvmm-cpr-exec"
LAUNCHER_SOURCES = ["csrc/cpr_launch.c"]
CFLAGS = ["-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter",
          "-Wno-missing-field-initializers", "-std=gnu11"]

ffibuilder.set_source(
    "vmm.kvm._kvm",
    r"""
#include <signal.h>
#include <sys/mman.h>
#include <linux/kvm.h>
#include "build_vm.h"
#include "commit.h"
#include "handoff.h"
#include "cpr_exec.h"
#include "kvm_state.h"
#include "migrate.h"
#include "vcpu_run.h"
""",
    include_dirs=["csrc"],
    libraries=[LIBRARY, "pthread"],
    extra_link_args=["-Wl,-rpath,$ORIGIN"],
    extra_compile_args=CFLAGS,
)
