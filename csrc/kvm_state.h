/* A vCPU's and a VM's kernel state, read or written in one C call each (see
 * csrc/kvm_state.c).  Compiled into vmm.kvm._kvm; vmm/kvm/_build.py reads this
 * header into the cffi cdef.  Python (vmm/kvm/vcpu.py, vmm/kvm/vm.py) fills
 * and slices these structs as bytes: each kernel struct is stored whole, so
 * the state blob keeps the kernel's exact bytes. */
#ifndef PYVMM_KVM_STATE_H
#define PYVMM_KVM_STATE_H

#include <stddef.h>
#include <stdint.h>
#include <linux/kvm.h>

/* The pieces of a vCPU's state by number (vmm/kvm/vcpu.py names them). */
#define PYVMM_VCPU_REGS 0
#define PYVMM_VCPU_XSAVE 1
#define PYVMM_VCPU_FPU 2
#define PYVMM_VCPU_XCRS 3
#define PYVMM_VCPU_SREGS 4
#define PYVMM_VCPU_MP_STATE 5
#define PYVMM_VCPU_LAPIC 6
#define PYVMM_VCPU_MSRS 7
#define PYVMM_VCPU_EVENTS 8
#define PYVMM_VCPU_DEBUGREGS 9
#define PYVMM_VCPU_NPIECES 10

/* The length of a failed step's name in these structs. */
#define PYVMM_STATE_STEP_SIZE 48

/* KVM reads or writes fewer than 256 MSRs per call (MAX_IO_MSRS in x86.c). */
#define PYVMM_VCPU_MAX_MSRS 255

/* struct kvm_msrs with room for its entries (same layout: csrc/kvm_state.c). */
struct pyvmm_msr_block {
    uint32_t nmsrs;
    uint32_t pad;
    struct kvm_msr_entry entries[PYVMM_VCPU_MAX_MSRS];
};

/* One vCPU's state.  The caller sets `order` (the pieces, in the order to
 * get or set them: restoring, vmm/kvm/vcpu.py's RESTORE_ORDER), `npieces`,
 * and `msrs.nmsrs` with the entries' indices (saving) or whole entries
 * (restoring).  On failure `step` names the ioctl or the check that failed,
 * `failed` its piece (-1 for a check) and `result` what it returned
 * (-errno, or for the MSRs how many it did). */
struct pyvmm_vcpu_state {
    uint32_t npieces;
    uint8_t order[PYVMM_VCPU_NPIECES];
    int32_t failed;
    int32_t result;
    char step[PYVMM_STATE_STEP_SIZE];
    struct kvm_regs regs;
    struct kvm_xsave xsave;
    struct kvm_fpu fpu;
    struct kvm_xcrs xcrs;
    struct kvm_sregs sregs;
    struct kvm_mp_state mp_state;
    struct kvm_lapic_state lapic;
    struct kvm_vcpu_events events;
    struct kvm_debugregs debugregs;
    struct pyvmm_msr_block msrs;
};

/* Every piece in s->order, each with its KVM_GET_* ioctl (a zeroed struct
 * first, so padding the kernel leaves alone reads as 0), or KVM_SET_*.
 * `size` is the caller's allocation, which must be sizeof(*s).  0 or -errno. */
int pyvmm_vcpu_save(int fd, struct pyvmm_vcpu_state *s, size_t size);
int pyvmm_vcpu_restore(int fd, struct pyvmm_vcpu_state *s, size_t size);

/* flags: which VM-wide pieces exist (the clock always does). */
#define PYVMM_VM_STATE_IRQCHIP 1u  /* the PIC master, PIC slave, IOAPIC (chip ids 0-2) */
#define PYVMM_VM_STATE_PIT 2u
#define PYVMM_VM_NIRQCHIPS 3

/* The VM's state: irqchips, PIT, KVM clock.  On failure `step` names the
 * ioctl or check that failed. */
struct pyvmm_vm_state {
    uint32_t flags;
    uint32_t pad;
    uint64_t clock_ns;
    char step[PYVMM_STATE_STEP_SIZE];
    struct kvm_irqchip irqchip[PYVMM_VM_NIRQCHIPS];
    struct kvm_pit_state2 pit;
};

/* Get or set the irqchips (in chip order), the PIT (each as `flags` says), then
 * the clock (a restore sets its time, with no flags).  `size` must be
 * sizeof(*s).  0 or -errno. */
int pyvmm_vm_save(int fd, struct pyvmm_vm_state *s, size_t size);
int pyvmm_vm_restore(int fd, struct pyvmm_vm_state *s, size_t size);

#endif
