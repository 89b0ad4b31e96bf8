/* libFuzzer target: a migration stream's PAGE section (csrc/migrate.c), which comes
 * from the network.  The input is one PAGE payload, put behind a section header with
 * its right CRC-32C (and, from its last byte, sometimes a wrong one) on a socket pair,
 * then read by pyvmm_mig_recv twice: into a RAM memfd through pwritev, and straight
 * into preallocated RAM.  Whatever the bytes, both write only inside the RAM (the
 * file never grows past it) and give the same answer and the same RAM; a payload is
 * taken only if it is a well-formed index with the bodies it names.  Sending that RAM
 * back with pyvmm_mig_send (every page, the cursor at the end) and receiving it again
 * must give the same RAM.
 * The section checksum, CRC-32C, is checked against a bit-by-bit one (its
 * three-stream form at every length and alignment the input gives).  The first 8
 * bytes, as HELO's "populated" bitmap, go to pyvmm_mig_prealloc, which must allocate
 * inside the RAM only. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
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

static void put_le(uint8_t *p, uint64_t v, int n)
{
	for (int i = 0; i < n; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

/* head + payload on a socket pair (the write side closed), read by pyvmm_mig_recv. */
static int receive(const uint8_t *payload, size_t size, uint32_t crc, int memfd,
		   uint8_t *ram, uint64_t *touched, struct pyvmm_mig_counts *c)
{
	static uint8_t buf[PYVMM_MIG_BUF];
	uint8_t head[PYVMM_MIG_HEAD], next[PYVMM_MIG_HEAD];
	uint64_t got = 0;
	int sv[2], r;

	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0)
		abort();
	memcpy(head, "PAGE", 4);
	put_le(head + 4, crc, 4);
	put_le(head + 8, size, 8);
	if (write(sv[0], head, sizeof(head)) != (ssize_t)sizeof(head) ||
	    (size && write(sv[0], payload, size) != (ssize_t)size))
		abort();
	close(sv[0]);
	r = pyvmm_mig_recv(sv[1], memfd, ram, NPAGES, touched, buf, UINT64_MAX, 1000, next,
			   c, &got);
	close(sv[1]);
	if (got > sizeof(head) + size)
		abort();
	return r;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	int fd, fd2, fd3, r;
	uint8_t *ram = new_ram(&fd), *copy = new_ram(&fd2), *mapped = new_ram(&fd3);
	uint64_t touched = 0, bits = (1ULL << NPAGES) - 1, cursor = 0, touched2 = 0;
	uint64_t touched3 = 0;
	struct pyvmm_mig_counts c = { 0, 0 }, c2 = { 0, 0 }, c3 = { 0, 0 };
	uint32_t crc;

	if (size > 64 * 1024)	/* (what a socket pair holds without a reader) */
		goto done;
	crc = pyvmm_crc32c(0, data, size);
	if (crc != crc32c_bitwise(data, size))
		abort();
	if (size && data[size - 1] == 0xa5)
		crc ^= 1;	/* sometimes a wrong checksum */
	if (size >= 8) {
		uint64_t populated;

		memcpy(&populated, data, 8);
		populated |= ~0ULL << NPAGES;	/* bits past the RAM must be ignored */
		if (pyvmm_mig_prealloc(fd2, &populated, NPAGES) != 0)
			abort();
	}
	r = receive(data, size, crc, fd, ram, &touched, &c);
	if (receive(data, size, crc, -1, mapped, &touched3, &c3) != r ||
	    touched3 != touched || memcmp(ram, mapped, SIZE) ||
	    c3.zero_pages != c.zero_pages || c3.normal_pages != c.normal_pages)
		abort();
	if (r != PYVMM_MIG_END && r != PYVMM_MIG_CUT && r != PYVMM_MIG_CORRUPT &&
	    r != PYVMM_MIG_BADCRC)
		abort();
	if (r == PYVMM_MIG_END) {	/* taken: send it all back, and take it again */
		static uint8_t sendbuf[PYVMM_MIG_BUF];
		int sv[2];
		uint64_t sent = 0, got = 0;
		uint8_t next[PYVMM_MIG_HEAD];
		static uint8_t rbuf[PYVMM_MIG_BUF];

		if (c.zero_pages + c.normal_pages > size / 8)
			abort();
		if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0)
			abort();
		if (pyvmm_mig_send(ram, NPAGES, &bits, &cursor, sv[0], sendbuf, PYVMM_MIG_BATCH,
				   UINT64_MAX, 1000, &c2, &sent) != 0 || bits || cursor != NPAGES)
			abort();
		close(sv[0]);
		if (pyvmm_mig_recv(sv[1], fd2, copy, NPAGES, &touched2, rbuf, UINT64_MAX, 1000,
				   next, &c2, &got) != PYVMM_MIG_END || got != sent ||
		    memcmp(ram, copy, SIZE))
			abort();
		close(sv[1]);
	}
done:
	free_ram(ram, fd);
	free_ram(copy, fd2);
	free_ram(mapped, fd3);
	return 0;
}
