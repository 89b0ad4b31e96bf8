/* libFuzzer target: the cpr-exec prebuilder's request check (csrc/cpr_exec.c,
 * with the VM layout check of csrc/build_vm.c that the normal boot uses too),
 * and its check of the early state that follows the request, which
 * cpr-transfer's handoff thread also makes (csrc/handoff.c) before it puts each
 * vCPU's pieces in its restore order.
 *
 * The request comes from a memfd the old image wrote; a corrupt one must be
 * refused before the builder maps or registers anything.  Every request the
 * check accepts must describe only page-aligned regions inside the RAM memfd,
 * with no arithmetic overflow: checked here independently, with 128-bit sums.
 * Every early state it accepts must hold exactly its vCPUs' structs, each with
 * counts inside their arrays (pyvmm_vcpu_restore and KVM_SET_CPUID2 index by them). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpr_exec.h"
#include "handoff.h"
#include "kvm_state.h"

#define VCPU_SIZE (sizeof(struct pyvmm_vcpu_state) + sizeof(struct pyvmm_early_cpuid))

/* A valid early block for nv vCPUs with fuzz bytes laid over one of its parts
 * (selected by sel), its length claimed short when sel says so. */
static void fuzz_early(const uint8_t *data, size_t size, uint8_t sel)
{
    uint32_t nv = 1 + (sel & 1);
    size_t len = sizeof(struct pyvmm_early_header) + sizeof(struct pyvmm_vm_state)
                 + nv * VCPU_SIZE;
    size_t at[4] = {0, sizeof(struct pyvmm_early_header),
                    sizeof(struct pyvmm_early_header) + sizeof(struct pyvmm_vm_state),
                    sizeof(struct pyvmm_early_header) + sizeof(struct pyvmm_vm_state)
                    + offsetof(struct pyvmm_vcpu_state, msrs)};
    size_t off = at[(sel >> 1) & 3];
    char *b = calloc(1, len);
    struct pyvmm_early_header *h = (void *)b;

    h->magic = PYVMM_EARLY_MAGIC;
    h->version = PYVMM_EARLY_VERSION;
    h->nvcpus = nv;
    h->header_size = sizeof(*h);
    h->vm_size = sizeof(struct pyvmm_vm_state);
    h->vcpu_size = sizeof(struct pyvmm_vcpu_state);
    h->cpuid_size = sizeof(struct pyvmm_early_cpuid);
    memcpy(b + off, data, size < len - off ? size : len - off);
    if (sel & 8) {   /* keep the header's identity half of the time */
        h->magic = PYVMM_EARLY_MAGIC;
        h->version = PYVMM_EARLY_VERSION;
    }
    size_t claimed = (sel & 16) ? len - (sel >> 5) : len;
    if (pyvmm_early_valid(b, claimed, nv)) {
        if (claimed != len || h->nvcpus != nv || h->header_size != sizeof(*h))
            abort();
        if ((h->flags & PYVMM_EARLY_UART) && (h->uart_fd < 1 || h->uart_fd > 2))
            abort();
        for (uint32_t i = 0; i < nv; i++) {
            const char *v = b + at[2] + i * VCPU_SIZE;
            const struct pyvmm_vcpu_state *s = (const void *)v;
            const struct pyvmm_early_cpuid *c = (const void *)(v + sizeof(*s));
            if (s->npieces > PYVMM_VCPU_NPIECES || s->msrs.nmsrs > PYVMM_VCPU_MAX_MSRS ||
                c->nent > PYVMM_EARLY_MAX_CPUID)
                abort();
            for (uint32_t k = 0; k < s->npieces; k++)
                if (s->order[k] >= PYVMM_VCPU_NPIECES)
                    abort();
        }
    }
    /* The handoff's check: a new VMM whose vCPUs have every piece but the FPU (as
     * with XSAVE), in restore order.  What it accepts holds exactly those pieces,
     * each once, in that order. */
    static const uint8_t order[] = {PYVMM_VCPU_REGS, PYVMM_VCPU_XSAVE, PYVMM_VCPU_XCRS,
                                    PYVMM_VCPU_SREGS, PYVMM_VCPU_MP_STATE, PYVMM_VCPU_LAPIC,
                                    PYVMM_VCPU_MSRS, PYVMM_VCPU_EVENTS, PYVMM_VCPU_DEBUGREGS};
    struct pyvmm_handoff_waiter w;
    memset(&w, 0, sizeof(w));
    w.nvcpus = nv;
    memcpy(w.order, order, sizeof(order));
    w.norder = sizeof(order);
    if (sel & 64) {   /* a block the old VMM saved in its own order, half of the time */
        for (uint32_t i = 0; i < nv; i++) {
            struct pyvmm_vcpu_state *s = (void *)(b + at[2] + i * VCPU_SIZE);
            s->npieces = sizeof(order);
            for (uint32_t k = 0; k < sizeof(order); k++)
                s->order[k] = order[sizeof(order) - 1 - k];
        }
    }
    if (pyvmm_handoff_check(&w, b, claimed) == 0) {
        if (!pyvmm_early_valid(b, claimed, nv))
            abort();
        for (uint32_t i = 0; i < nv; i++) {
            const struct pyvmm_vcpu_state *s = (const void *)(b + at[2] + i * VCPU_SIZE);
            if (s->npieces != sizeof(order) || memcmp(s->order, order, sizeof(order)))
                abort();
        }
    }
    free(b);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct pyvmm_prebuild_spec s;

    if (size >= 2 && (data[0] & 2)) {   /* half of the inputs: the early state */
        fuzz_early(data + 2, size - 2, data[1]);
        return 0;
    }

    memset(&s, 0, sizeof(s));
    memcpy(&s, data, size < sizeof(s) ? size : sizeof(s));
    if (size && (data[0] & 1)) {   /* reach past the magic check half of the time */
        s.magic = PYVMM_PREBUILD_MAGIC;
        s.version = PYVMM_PREBUILD_VERSION;
    }
    if (!pyvmm_prebuild_spec_valid(&s))
        return 0;
    const struct pyvmm_vm_layout *l = &s.layout;
    if (l->nregions < 1 || l->nregions > PYVMM_VM_MAX_REGIONS)
        abort();
    if (l->nvcpus < 1 || l->nvcpus > PYVMM_VM_MAX_VCPUS || s.ram_fd < 0)
        abort();
    if (s.ram_size == 0 || s.ram_size % 4096)
        abort();
    for (uint32_t i = 0; i < l->nregions; i++) {
        const struct pyvmm_vm_region *r = &l->regions[i];
        if (r->size == 0 || r->gpa % 4096 || r->size % 4096 || r->offset % 4096)
            abort();
        if ((unsigned __int128)r->offset + r->size > s.ram_size)
            abort();
        if ((unsigned __int128)r->gpa + r->size > UINT64_MAX)
            abort();
    }
    return 0;
}
