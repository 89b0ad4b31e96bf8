/* libFuzzer target: a migration stream's PAGE payload (csrc/migrate.c), which comes
 * from the network.  Whatever the bytes, pyvmm_mig_apply writes only inside the RAM
 * it was given (ASan's redzones around it catch anything else) and accepts a payload
 * only if it is a whole number of well-formed entries; packing the RAM back must then
 * give entries that apply again to the same RAM. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "migrate.h"

#define NPAGES 16

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	uint8_t *ram = calloc(NPAGES, PYVMM_MIG_PAGE), *copy = calloc(NPAGES, PYVMM_MIG_PAGE);
	uint8_t *out = malloc(NPAGES * PYVMM_MIG_ENTRY);
	uint64_t touched = 0, bits = (1ULL << NPAGES) - 1, cursor = 0, touched2 = 0;
	struct pyvmm_mig_counts c = { 0, 0 }, c2 = { 0, 0 };

	if (!ram || !copy || !out)
		abort();
	if (pyvmm_mig_apply(data, size, ram, NPAGES, &touched, &c) == 0) {
		if (c.zero_pages + c.normal_pages > size / 8)
			abort();
		uint64_t n = pyvmm_mig_pack(ram, NPAGES, &bits, &cursor, out,
					    NPAGES * PYVMM_MIG_ENTRY, &c2);
		if (bits || cursor != NPAGES || c2.zero_pages + c2.normal_pages != NPAGES)
			abort();
		if (pyvmm_mig_apply(out, n, copy, NPAGES, &touched2, &c2) != 0 ||
		    memcmp(ram, copy, NPAGES * PYVMM_MIG_PAGE))
			abort();
	}
	free(ram);
	free(copy);
	free(out);
	return 0;
}
