/* Building a KVM VM, the one way pyvmm does it (see csrc/build_vm.c).  Compiled
 * into vmm.kvm._kvm; vmm/kvm/_build.py reads this header into the cffi cdef. */
#ifndef PYVMM_BUILD_VM_H
#define PYVMM_BUILD_VM_H

#include <stdint.h>

#define PYVMM_VM_MAX_REGIONS 8
#define PYVMM_VM_MAX_VCPUS 64
#define PYVMM_VM_PIT 1u            /* layout flag: create the in-kernel PIT too */

/* Two pages KVM needs for real-mode emulation on Intel; inside the MMIO hole. */
#define PYVMM_TSS_ADDR 0xfffbd000u
#define PYVMM_IDENTITY_MAP_ADDR 0xfffbc000u

/* One RAM region: a memory slot (its index is the slot number). */
struct pyvmm_vm_region {
    uint64_t gpa;
    uint64_t size;
    uint64_t offset;   /* in guest RAM (the memfd, and its mapping) */
};

/* What to build: RAM regions (vmm.memory.layout), vCPUs, flags. */
struct pyvmm_vm_layout {
    uint32_t nregions;
    uint32_t nvcpus;
    uint32_t flags;
    uint32_t pad;
    struct pyvmm_vm_region regions[PYVMM_VM_MAX_REGIONS];
};

/* What was built, or the step that failed. */
struct pyvmm_vm_fds {
    int32_t vm_fd;
    int32_t nvcpus;
    int32_t vcpu_fds[PYVMM_VM_MAX_VCPUS];
    char step[48];     /* the failed step, for the message: "KVM CREATE_VM", ... */
};

/* Whether a layout is safe to act on for `ram_size` bytes of RAM: every region
 * inside it, page-aligned, no overflow (csrc/fuzz/fuzz_prebuild.c checks this). */
int pyvmm_vm_layout_valid(const struct pyvmm_vm_layout *layout, uint64_t ram_size);

/* Create a VM on `kvm_fd` (an open /dev/kvm) with guest RAM mapped at
 * `ram_addr` (`ram_size` bytes): memory slots, TSS and identity-map pages, the
 * irqchip, the PIT, the vCPUs.  0, or -errno with out->step set and nothing
 * left open. */
int pyvmm_build_vm(int kvm_fd, uint64_t ram_addr, uint64_t ram_size,
                   const struct pyvmm_vm_layout *layout, struct pyvmm_vm_fds *out);

#endif
