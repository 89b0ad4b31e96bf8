/* Live migration's page packing and applying: see migrate.h. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

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

#define APPLY_IOV 64

/* pwritev the run of pages in iov (page `first` on), all of it. */
static int flush_run(int fd, struct iovec *iov, int n, uint64_t first)
{
	off_t off = (off_t)(first * PYVMM_MIG_PAGE);
	uint64_t left = (uint64_t)n * PYVMM_MIG_PAGE;

	while (left) {
		ssize_t w = pwritev(fd, iov, n, off);

		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return w < 0 ? -errno : -EIO;
		left -= (uint64_t)w;
		off += w;
		while (n && (size_t)w >= iov->iov_len) {	/* a short write: go on after it */
			w -= (ssize_t)iov->iov_len;
			iov++;
			n--;
		}
		if (n && w) {
			iov->iov_base = (uint8_t *)iov->iov_base + w;
			iov->iov_len -= (size_t)w;
		}
	}
	return 0;
}

int pyvmm_mig_apply(const uint8_t *in, uint64_t len, int fd, uint8_t *ram, uint64_t npages,
		    uint64_t *touched, struct pyvmm_mig_counts *counts)
{
	struct iovec iov[APPLY_IOV];
	uint64_t pos = 0, first = 0;
	int n = 0, r;

	while (pos < len) {
		uint64_t entry, pg, flags;

		if (len - pos < 8)
			goto bad;
		entry = get_u64(in + pos);
		pg = entry >> 12;
		flags = entry & 0xfff;
		if (pg >= npages || (flags & ~(uint64_t)PYVMM_MIG_ZERO))
			goto bad;
		if (!(flags & PYVMM_MIG_ZERO) && len - pos - 8 < PYVMM_MIG_PAGE)
			goto bad;
		pos += 8;
		/* a page that does not extend the run (or a zero page) ends it */
		if (n && (n == APPLY_IOV || pg != first + (uint64_t)n || (flags & PYVMM_MIG_ZERO))) {
			r = flush_run(fd, iov, n, first);
			if (r)
				return r;
			n = 0;
		}
		if (flags & PYVMM_MIG_ZERO) {
			if (touched[pg / 64] & (1ULL << (pg % 64)))
				memset(ram + pg * PYVMM_MIG_PAGE, 0, PYVMM_MIG_PAGE);
			counts->zero_pages++;
			continue;
		}
		if (!n)
			first = pg;
		iov[n].iov_base = (void *)(in + pos);
		iov[n].iov_len = PYVMM_MIG_PAGE;
		n++;
		pos += PYVMM_MIG_PAGE;
		touched[pg / 64] |= 1ULL << (pg % 64);
		counts->normal_pages++;
	}
	return n ? flush_run(fd, iov, n, first) : 0;
bad:
	r = n ? flush_run(fd, iov, n, first) : 0;
	return r ? r : -EINVAL;
}

/* CRC-32C: the reflected polynomial 0x82F63B78, a byte at a time from a table... */
static uint32_t crc_table[256];

static void crc_init(void)
{
	for (uint32_t i = 0; i < 256; i++) {
		uint32_t c = i;

		for (int k = 0; k < 8; k++)
			c = c & 1 ? (c >> 1) ^ 0x82F63B78u : c >> 1;
		crc_table[i] = c;
	}
}

static uint32_t crc_sw(uint32_t crc, const uint8_t *p, uint64_t n)
{
	static pthread_once_t once = PTHREAD_ONCE_INIT;

	pthread_once(&once, crc_init);
	while (n--)
		crc = crc_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
	return crc;
}

/* ... or 8 bytes per instruction with SSE4.2 */
__attribute__((target("sse4.2")))
static uint32_t crc_hw(uint32_t crc, const uint8_t *p, uint64_t n)
{
	uint64_t c = crc;

	for (; n >= 8; n -= 8, p += 8) {
		uint64_t w;

		memcpy(&w, p, 8);
		c = __builtin_ia32_crc32di(c, w);
	}
	crc = (uint32_t)c;
	while (n--)
		crc = __builtin_ia32_crc32qi(crc, *p++);
	return crc;
}

uint32_t pyvmm_crc32c(uint32_t crc, const uint8_t *p, uint64_t n)
{
	crc = ~crc;
	crc = __builtin_cpu_supports("sse4.2") ? crc_hw(crc, p, n) : crc_sw(crc, p, n);
	return ~crc;
}
