/*
 * Building a KVM VM: the one place pyvmm does it.  Both callers need exactly
 * this, so both call it: the normal boot and a cpr-transfer target through
 * vmm.machine.create_kvm_parts (cffi, with /dev/kvm opened and checked by
 * Python), and the cpr-exec prebuilder (csrc/cpr_exec.c) on its thread before
 * Python's main() even runs.  Python then wraps the fds (vmm.kvm.vm.Vm.adopt,
 * vmm.kvm.vcpu.Vcpu) and does the rest: CPUID, kvm_run mappings, state.
 *
 * The order is today's and KVM's: memory slots first; the identity-map page
 * and the irqchip before any vCPU (KVM refuses both once a vCPU exists, and
 * each vCPU gets its in-kernel LAPIC when it is created); the irqchip before
 * the PIT (KVM_CREATE_PIT2 needs the in-kernel PIC).  Slots are made without
 * flags (dirty logging is switched on later, per slot, if ever).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <linux/kvm.h>

#include "build_vm.h"

#define PAGE 4096u

int pyvmm_vm_layout_valid(const struct pyvmm_vm_layout *l, uint64_t ram_size)
{
    if (ram_size == 0 || ram_size % PAGE)
        return 0;
    if (l->nregions < 1 || l->nregions > PYVMM_VM_MAX_REGIONS)
        return 0;
    if (l->nvcpus < 1 || l->nvcpus > PYVMM_VM_MAX_VCPUS)
        return 0;
    for (uint32_t i = 0; i < l->nregions; i++) {
        const struct pyvmm_vm_region *r = &l->regions[i];
        if (r->size == 0 || (r->gpa | r->size | r->offset) % PAGE)
            return 0;
        if (r->offset > ram_size || r->size > ram_size - r->offset)
            return 0;
        if (r->gpa + r->size < r->gpa)
            return 0;
    }
    return 1;
}

static int failed(struct pyvmm_vm_fds *out, const char *step, int err)
{
    for (int i = 0; i < out->nvcpus; i++)
        close(out->vcpu_fds[i]);
    if (out->vm_fd >= 0)
        close(out->vm_fd);
    out->nvcpus = 0;
    out->vm_fd = -1;
    snprintf(out->step, sizeof(out->step), "%s", step);
    return -(err ? err : EINVAL);
}

int pyvmm_build_vm(int kvm_fd, uint64_t ram_addr, uint64_t ram_size,
                   const struct pyvmm_vm_layout *l, struct pyvmm_vm_fds *out)
{
    int r;

    memset(out, 0, sizeof(*out));
    out->vm_fd = -1;
    if (!pyvmm_vm_layout_valid(l, ram_size))
        return failed(out, "check the VM layout", EINVAL);
    out->vm_fd = ioctl(kvm_fd, KVM_CREATE_VM, 0);
    if (out->vm_fd < 0)
        return failed(out, "KVM CREATE_VM", errno);
    for (uint32_t i = 0; i < l->nregions; i++) {
        struct kvm_userspace_memory_region region = {
            .slot = i,
            .flags = 0,
            .guest_phys_addr = l->regions[i].gpa,
            .memory_size = l->regions[i].size,
            .userspace_addr = ram_addr + l->regions[i].offset,
        };
        if (ioctl(out->vm_fd, KVM_SET_USER_MEMORY_REGION, &region) < 0)
            return failed(out, "KVM SET_USER_MEMORY_REGION", errno);
    }
    if (ioctl(out->vm_fd, KVM_SET_TSS_ADDR, (unsigned long)PYVMM_TSS_ADDR) < 0)
        return failed(out, "KVM SET_TSS_ADDR", errno);
    uint64_t ident = PYVMM_IDENTITY_MAP_ADDR;
    if (ioctl(out->vm_fd, KVM_SET_IDENTITY_MAP_ADDR, &ident) < 0)
        return failed(out, "KVM SET_IDENTITY_MAP_ADDR", errno);
    if (ioctl(out->vm_fd, KVM_CREATE_IRQCHIP, 0) < 0)
        return failed(out, "KVM CREATE_IRQCHIP", errno);
    if (l->flags & PYVMM_VM_PIT) {
        struct kvm_pit_config pit = { .flags = KVM_PIT_SPEAKER_DUMMY };
        if (ioctl(out->vm_fd, KVM_CREATE_PIT2, &pit) < 0)
            return failed(out, "KVM CREATE_PIT2", errno);
    }
    for (uint32_t i = 0; i < l->nvcpus; i++) {
        r = ioctl(out->vm_fd, KVM_CREATE_VCPU, (unsigned long)i);
        if (r < 0)
            return failed(out, "KVM CREATE_VCPU", errno);
        out->vcpu_fds[out->nvcpus++] = r;
    }
    return 0;
}
