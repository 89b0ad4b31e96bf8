/* libFuzzer target: the cpr-exec prebuilder's request check (csrc/cpr_exec.c,
 * with the VM layout check of csrc/build_vm.c that the normal boot uses too).
 *
 * The request comes from a memfd the old image wrote; a corrupt one must be
 * refused before the builder maps or registers anything.  Every request the
 * check accepts must describe only page-aligned regions inside the RAM memfd,
 * with no arithmetic overflow: checked here independently, with 128-bit sums. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpr_exec.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct pyvmm_prebuild_spec s;

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
