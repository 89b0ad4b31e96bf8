/* libFuzzer target: a migration stream's PAGE payload (csrc/migrate.c), which comes
 * from the network.  Whatever the bytes, pyvmm_mig_apply writes only inside the RAM
 * memfd it was given (the file never grows past it), and accepts a payload only if it
 * is a whole number of well-formed entries; packing that RAM back must then give
 * entries that apply again to the same RAM.  The section checksum, CRC-32C, is
 * checked against a bit-by-bit one (its three-stream form at every length and
 * alignment the input gives).  The first 8 bytes, as HELO's "populated" bitmap, go to
 * pyvmm_mig_prealloc, which must allocate inside the RAM only.  Applied with fd -1
 * (copied into the mapping, as with preallocated RAM), the payload must give the same
 * answer and the same RAM as with pwritev. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "migrate.h"

#define NPAGES 16
#define SIZE (NPAGES * PYVMM_MIG_PAGE)

static uint8_t *new_ram(int *fd)
{
	uint8_t *ram;

	*fd = memfd_create("fuzz-ram", MFD_CLOEXEC);
	if (*fd < 0 || ftruncate(*fd, SIZE) < 0)
		abort();
	ram = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, *fd, 0);
	if (ram == MAP_FAILED)
		abort();
	return ram;
}

static void free_ram(uint8_t *ram, int fd)
{
	struct stat st;

	if (fstat(fd, &st) < 0 || st.st_size != SIZE)
		abort();		/* written past the end of RAM */
	munmap(ram, SIZE);
	close(fd);
}

static uint32_t crc32c_bitwise(const uint8_t *p, size_t n)
{
	uint32_t crc = ~0u;

	while (n--) {
		crc ^= *p++;
		for (int k = 0; k < 8; k++)
			crc = crc & 1 ? (crc >> 1) ^ 0x82F63B78u : crc >> 1;
	}
	return ~crc;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	int fd, fd2, fd3;
	uint8_t *ram = new_ram(&fd), *copy = new_ram(&fd2), *mapped = new_ram(&fd3);
	uint8_t *out = malloc(NPAGES * PYVMM_MIG_ENTRY);
	uint64_t touched = 0, bits = (1ULL << NPAGES) - 1, cursor = 0, touched2 = 0;
	uint64_t touched3 = 0;
	struct pyvmm_mig_counts c = { 0, 0 }, c2 = { 0, 0 }, c3 = { 0, 0 };
	int r;

	if (!out)
		abort();
	if (pyvmm_crc32c(0, data, size) != crc32c_bitwise(data, size))
		abort();
	if (size >= 8) {
		uint64_t populated;

		memcpy(&populated, data, 8);
		populated |= ~0ULL << NPAGES;	/* bits past the RAM must be ignored */
		if (pyvmm_mig_prealloc(fd2, &populated, NPAGES) != 0)
			abort();
	}
	r = pyvmm_mig_apply(data, size, fd, ram, NPAGES, &touched, &c);
	if (pyvmm_mig_apply(data, size, -1, mapped, NPAGES, &touched3, &c3) != r ||
	    touched3 != touched || memcmp(ram, mapped, SIZE) ||
	    c3.zero_pages != c.zero_pages || c3.normal_pages != c.normal_pages)
		abort();
	if (r == 0) {
		if (c.zero_pages + c.normal_pages > size / 8)
			abort();
		uint64_t n = pyvmm_mig_pack(ram, NPAGES, &bits, &cursor, out,
					    NPAGES * PYVMM_MIG_ENTRY, &c2);
		if (bits || cursor != NPAGES || c2.zero_pages + c2.normal_pages != NPAGES)
			abort();
		if (pyvmm_mig_apply(out, n, fd2, copy, NPAGES, &touched2, &c2) != 0 ||
		    memcmp(ram, copy, SIZE))
			abort();
	}
	free_ram(ram, fd);
	free_ram(copy, fd2);
	free_ram(mapped, fd3);
	free(out);
	return 0;
}
