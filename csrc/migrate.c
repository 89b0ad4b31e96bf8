/* Live migration's page packing and applying: see migrate.h. */
#include <errno.h>
#include <string.h>

#include "migrate.h"

static int page_is_zero(const uint8_t *p)
{
	const uint64_t *w = (const uint64_t *)p;
	uint64_t acc = 0;

	for (int i = 0; i < PYVMM_MIG_PAGE / 8; i += 8) {
		acc |= w[i] | w[i + 1] | w[i + 2] | w[i + 3] |
		       w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7];
		if (acc)
			return 0;
	}
	return 1;
}

static void put_u64(uint8_t *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t get_u64(const uint8_t *p)
{
	uint64_t v = 0;

	for (int i = 7; i >= 0; i--)
		v = (v << 8) | p[i];
	return v;
}

uint64_t pyvmm_mig_pack(const uint8_t *ram, uint64_t npages, uint64_t *bits,
			uint64_t *cursor, uint8_t *out, uint64_t cap,
			struct pyvmm_mig_counts *counts)
{
	uint64_t pg = *cursor, used = 0;

	while (pg < npages && cap - used >= PYVMM_MIG_ENTRY) {
		uint64_t word = bits[pg / 64] >> (pg % 64);
		const uint8_t *page;

		if (!word) {		/* nothing more in this word */
			pg = (pg / 64 + 1) * 64;
			continue;
		}
		pg += (uint64_t)__builtin_ctzll(word);
		if (pg >= npages)
			break;
		bits[pg / 64] &= ~(1ULL << (pg % 64));
		page = ram + pg * PYVMM_MIG_PAGE;
		if (page_is_zero(page)) {
			put_u64(out + used, pg << 12 | PYVMM_MIG_ZERO);
			used += 8;
			counts->zero_pages++;
		} else {
			put_u64(out + used, pg << 12);
			memcpy(out + used + 8, page, PYVMM_MIG_PAGE);
			used += PYVMM_MIG_ENTRY;
			counts->normal_pages++;
		}
		pg++;
	}
	*cursor = pg < npages ? pg : npages;
	return used;
}

int pyvmm_mig_apply(const uint8_t *in, uint64_t len, uint8_t *ram, uint64_t npages,
		    uint64_t *touched, struct pyvmm_mig_counts *counts)
{
	uint64_t pos = 0;

	while (pos < len) {
		uint64_t entry, pg, flags;

		if (len - pos < 8)
			return -EINVAL;
		entry = get_u64(in + pos);
		pg = entry >> 12;
		flags = entry & 0xfff;
		pos += 8;
		if (pg >= npages || (flags & ~(uint64_t)PYVMM_MIG_ZERO))
			return -EINVAL;
		if (flags & PYVMM_MIG_ZERO) {
			if (touched[pg / 64] & (1ULL << (pg % 64)))
				memset(ram + pg * PYVMM_MIG_PAGE, 0, PYVMM_MIG_PAGE);
			counts->zero_pages++;
			continue;
		}
		if (len - pos < PYVMM_MIG_PAGE)
			return -EINVAL;
		touched[pg / 64] |= 1ULL << (pg % 64);
		memcpy(ram + pg * PYVMM_MIG_PAGE, in + pos, PYVMM_MIG_PAGE);
		pos += PYVMM_MIG_PAGE;
		counts->normal_pages++;
	}
	return 0;
}
