/*
 * A vCPU's and a VM's kernel state in one C call each.  A live update's save
 * and restore are nine ioctls per vCPU and five for the VM, inside the
 * downtime; made one by one from Python, each also cost a cffi allocation, an
 * attribute walk and a copy (~25 us of a vCPU's ~95 us save or restore on the
 * development host).  Here the ioctls run back to back on one caller-allocated
 * struct (csrc/kvm_state.h) and Python only copies bytes in and slices them out.
 *
 * What is done, and in which order, stays Python's: a restore sets the pieces
 * in the order it is given, vmm/kvm/vcpu.py's RESTORE_ORDER, whose reasons are
 * written down there (tests/test_vcpu_state.py checks the one KVM really
 * enforces).  A save gets each piece into a zeroed struct, as the Python code
 * it replaces did, so a saved piece is byte for byte what that code saved.
 *
 * Every count that sizes an access is checked before any ioctl: the caller's
 * allocation against the struct, the pieces against the order array, the MSRs
 * against their room.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

#include "kvm_state.h"

/* The ioctls take a struct kvm_msrs *: the block must be one. */
_Static_assert(offsetof(struct pyvmm_msr_block, entries) == offsetof(struct kvm_msrs, entries),
               "struct pyvmm_msr_block is not laid out as struct kvm_msrs");

struct piece {
    size_t offset;
    size_t size;
    unsigned long get, set;
    const char *get_name, *set_name;
};

#define PIECE(id, field, IOCTL)                                                    \
    [id] = { offsetof(struct pyvmm_vcpu_state, field),                            \
             sizeof(((struct pyvmm_vcpu_state *)0)->field),                       \
             KVM_GET_##IOCTL, KVM_SET_##IOCTL, "KVM GET_" #IOCTL, "KVM SET_" #IOCTL }

static const struct piece pieces[PYVMM_VCPU_NPIECES] = {
    PIECE(PYVMM_VCPU_REGS, regs, REGS),
    PIECE(PYVMM_VCPU_XSAVE, xsave, XSAVE),
    PIECE(PYVMM_VCPU_FPU, fpu, FPU),
    PIECE(PYVMM_VCPU_XCRS, xcrs, XCRS),
    PIECE(PYVMM_VCPU_SREGS, sregs, SREGS),
    PIECE(PYVMM_VCPU_MP_STATE, mp_state, MP_STATE),
    PIECE(PYVMM_VCPU_LAPIC, lapic, LAPIC),
    PIECE(PYVMM_VCPU_MSRS, msrs, MSRS),
    PIECE(PYVMM_VCPU_EVENTS, events, VCPU_EVENTS),
    PIECE(PYVMM_VCPU_DEBUGREGS, debugregs, DEBUGREGS),
};

static int do_ioctl(int fd, unsigned long request, void *arg)
{
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

/* A refused request: nothing was done.  The step is written only when the
 * allocation holds it. */
static int refused(char *step, int room, const char *why, int err)
{
    if (room)
        snprintf(step, PYVMM_STATE_STEP_SIZE, "%s", why);
    return -err;
}

static int check_vcpu(struct pyvmm_vcpu_state *s, size_t size)
{
    int room = size >= offsetof(struct pyvmm_vcpu_state, step) + sizeof(s->step);

    if (size != sizeof(*s))
        return refused(s->step, room, "check the vCPU state's size", EINVAL);
    s->failed = -1;
    s->result = 0;
    s->step[0] = 0;
    if (s->npieces > PYVMM_VCPU_NPIECES)
        return refused(s->step, room, "check the vCPU state's piece count", E2BIG);
    for (uint32_t i = 0; i < s->npieces; i++) {
        if (s->order[i] >= PYVMM_VCPU_NPIECES)
            return refused(s->step, room, "check the vCPU state's pieces", EINVAL);
        if (s->order[i] == PYVMM_VCPU_MSRS && s->msrs.nmsrs > PYVMM_VCPU_MAX_MSRS)
            return refused(s->step, room, "check the vCPU state's MSR count", E2BIG);
    }
    return 0;
}

/* One piece's ioctl; MSRs count as done only when KVM did all of them. */
static int vcpu_step(int fd, struct pyvmm_vcpu_state *s, int id, int restoring)
{
    const struct piece *p = &pieces[id];
    void *arg = (char *)s + p->offset;
    int r;

    if (id == PYVMM_VCPU_MSRS) {
        if (!restoring)
            for (uint32_t i = 0; i < s->msrs.nmsrs; i++)
                s->msrs.entries[i].reserved = 0, s->msrs.entries[i].data = 0;
        r = do_ioctl(fd, restoring ? p->set : p->get, arg);
        if (r == (int)s->msrs.nmsrs)
            return 0;
    } else {
        if (!restoring)
            memset(arg, 0, p->size);
        r = do_ioctl(fd, restoring ? p->set : p->get, arg);
        if (r >= 0)
            return 0;
    }
    s->failed = id;
    s->result = r;
    snprintf(s->step, sizeof(s->step), "%s", restoring ? p->set_name : p->get_name);
    return r < 0 ? r : -EIO;
}

static int vcpu_all(int fd, struct pyvmm_vcpu_state *s, size_t size, int restoring)
{
    int r = check_vcpu(s, size);

    for (uint32_t i = 0; r == 0 && i < s->npieces; i++)
        r = vcpu_step(fd, s, s->order[i], restoring);
    return r;
}

int pyvmm_vcpu_save(int fd, struct pyvmm_vcpu_state *s, size_t size)
{
    return vcpu_all(fd, s, size, 0);
}

int pyvmm_vcpu_restore(int fd, struct pyvmm_vcpu_state *s, size_t size)
{
    return vcpu_all(fd, s, size, 1);
}

static int check_vm(struct pyvmm_vm_state *s, size_t size)
{
    int room = size >= offsetof(struct pyvmm_vm_state, step) + sizeof(s->step);

    if (size != sizeof(*s))
        return refused(s->step, room, "check the VM state's size", EINVAL);
    s->step[0] = 0;
    if (s->flags & ~(PYVMM_VM_STATE_IRQCHIP | PYVMM_VM_STATE_PIT))
        return refused(s->step, room, "check the VM state's flags", EINVAL);
    return 0;
}

/* KVM_GET_<NAME> or KVM_SET_<NAME> on the VM; a failure is named in s->step. */
#define VM_IOCTL(NAME, arg)                                                         \
    do {                                                                            \
        int r_ = do_ioctl(fd, restoring ? KVM_SET_##NAME : KVM_GET_##NAME, arg);    \
        if (r_ < 0) {                                                               \
            snprintf(s->step, sizeof(s->step), "%s",                                \
                     restoring ? "KVM SET_" #NAME : "KVM GET_" #NAME);              \
            return r_;                                                              \
        }                                                                           \
    } while (0)

static int vm_all(int fd, struct pyvmm_vm_state *s, size_t size, int restoring)
{
    struct kvm_clock_data clock;
    int r = check_vm(s, size);

    if (r)
        return r;
    memset(&clock, 0, sizeof(clock));      /* a restore sets the time, no flags */
    if (restoring)
        clock.clock = s->clock_ns;
    if (s->flags & PYVMM_VM_STATE_IRQCHIP) {
        for (uint32_t i = 0; i < PYVMM_VM_NIRQCHIPS; i++) {
            if (!restoring) {
                memset(&s->irqchip[i], 0, sizeof(s->irqchip[i]));
                s->irqchip[i].chip_id = i;
            }
            VM_IOCTL(IRQCHIP, &s->irqchip[i]);
        }
    }
    if (s->flags & PYVMM_VM_STATE_PIT) {
        if (!restoring)
            memset(&s->pit, 0, sizeof(s->pit));
        VM_IOCTL(PIT2, &s->pit);
    }
    VM_IOCTL(CLOCK, &clock);
    s->clock_ns = clock.clock;
    return 0;
}

int pyvmm_vm_save(int fd, struct pyvmm_vm_state *s, size_t size)
{
    return vm_all(fd, s, size, 0);
}

int pyvmm_vm_restore(int fd, struct pyvmm_vm_state *s, size_t size)
{
    return vm_all(fd, s, size, 1);
}
