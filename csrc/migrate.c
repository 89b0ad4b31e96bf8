/* Live migration's page packing and applying: see migrate.h. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <string.h>
#include <sys/socket.h>
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

static void put_u32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
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

/* Wait until fd is writable (1), the peer sent something or hung up (0), or not
 * within timeout_ms (-ETIMEDOUT). */
static int wait_writable(int fd, int timeout_ms)
{
	struct pollfd p = { .fd = fd, .events = POLLIN | POLLOUT };
	int r;

	do
		r = poll(&p, 1, timeout_ms);
	while (r < 0 && errno == EINTR);
	if (r < 0)
		return -errno;
	if (r == 0)
		return -ETIMEDOUT;
	if (p.revents & (POLLIN | POLLHUP | POLLERR))
		return 0;
	return 1;
}

/* All of buf[0..len) to the socket, waiting when it is full. */
static int send_all(int fd, const uint8_t *buf, uint64_t len, int timeout_ms)
{
	while (len) {
		ssize_t w = send(fd, buf, len, MSG_NOSIGNAL);

		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			int r = wait_writable(fd, timeout_ms);

			if (r < 0)
				return r;
			if (r == 0) {	/* the peer spoke (a FAIL) or hung up: let it be read */
				struct pollfd p = { .fd = fd, .events = POLLOUT };

				if (poll(&p, 1, 0) == 1 && (p.revents & POLLOUT))
					continue;	/* (still writable: data to read later) */
				return PYVMM_MIG_PEER;
			}
			continue;
		}
		if (w <= 0)
			return w < 0 ? -errno : -EIO;
		buf += w;
		len -= (uint64_t)w;
	}
	return 0;
}

int pyvmm_mig_send(const uint8_t *ram, uint64_t npages, uint64_t *bits, uint64_t *cursor,
		   int fd, uint8_t *buf, uint64_t cap, uint64_t budget, int timeout_ms,
		   struct pyvmm_mig_counts *counts, uint64_t *sent)
{
	uint64_t done = 0;

	while (done < budget) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		uint64_t n;
		int r;

		if (poll(&p, 1, 0) == 1)	/* the peer spoke (a FAIL) or hung up */
			return PYVMM_MIG_PEER;
		n = pyvmm_mig_pack(ram, npages, bits, cursor, buf + PYVMM_MIG_HEAD, cap,
				   counts);
		if (n == 0)
			return 0;
		memcpy(buf, "PAGE", 4);
		put_u32(buf + 4, pyvmm_crc32c(0, buf + PYVMM_MIG_HEAD, n));
		put_u64(buf + 8, n);
		r = send_all(fd, buf, PYVMM_MIG_HEAD + n, timeout_ms);
		if (r)
			return r;
		done += PYVMM_MIG_HEAD + n;
		*sent += PYVMM_MIG_HEAD + n;
	}
	return *cursor < npages ? 1 : 0;
}

uint64_t pyvmm_mig_count(const uint64_t *bits, uint64_t npages)
{
	uint64_t n = 0;

	for (uint64_t i = 0; i < (npages + 63) / 64; i++)
		n += (uint64_t)__builtin_popcountll(bits[i]);
	return n;
}

int pyvmm_mig_prealloc(int fd, const uint64_t *bits, uint64_t npages)
{
	uint64_t pg = 0;

	while (pg < npages) {
		uint64_t first;

		while (pg < npages && !(bits[pg / 64] & (1ULL << (pg % 64))))
			pg++;
		first = pg;
		while (pg < npages && (bits[pg / 64] & (1ULL << (pg % 64))))
			pg++;
		if (pg > first && fallocate(fd, 0, (off_t)(first * PYVMM_MIG_PAGE),
					    (off_t)((pg - first) * PYVMM_MIG_PAGE)) < 0) {
			if (errno == EOPNOTSUPP)
				return 0;	/* (then pages are allocated as they come) */
			return -errno;
		}
	}
	return 0;
}

#define APPLY_IOV 64

/* Write the run of pages in iov (page `first` on), all of it: with pwritev on the
 * memfd, or (fd < 0: RAM allocated beforehand) copied into the mapping. */
static int flush_run(int fd, uint8_t *ram, struct iovec *iov, int n, uint64_t first)
{
	off_t off = (off_t)(first * PYVMM_MIG_PAGE);
	uint64_t left = (uint64_t)n * PYVMM_MIG_PAGE;

	if (fd < 0) {
		for (int i = 0; i < n; i++)
			memcpy(ram + (first + (uint64_t)i) * PYVMM_MIG_PAGE, iov[i].iov_base,
			       PYVMM_MIG_PAGE);
		return 0;
	}

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
			r = flush_run(fd, ram, iov, n, first);
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
	return n ? flush_run(fd, ram, iov, n, first) : 0;
bad:
	r = n ? flush_run(fd, ram, iov, n, first) : 0;
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

/* ... or with SSE4.2's crc32 instruction, 8 bytes at a time on three independent
 * streams (its latency is 3 cycles, its throughput 1 a cycle: one chain would run at a
 * third of the speed), the three CRCs joined by "append n zero bytes" operators.  On a
 * raw (not inverted) CRC register, crc(A || B) = zeros_|B|(crc(A)) ^ crc_from_0(B), and
 * zeros_n is linear over GF(2): a table per byte of the register, built once by running
 * the instruction itself over n zero bytes from each of the 32 one-bit registers. */
#define CRC_LONG 8192
#define CRC_SHORT 256

static uint32_t crc_long[4][256], crc_short[4][256];

__attribute__((target("sse4.2")))
static uint32_t crc_serial(uint32_t crc, const uint8_t *p, uint64_t n)
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

__attribute__((target("sse4.2")))
static uint32_t crc_zeros_of(uint32_t crc, uint64_t n)
{
	uint64_t c = crc;

	for (; n; n -= 8)
		c = __builtin_ia32_crc32di(c, 0);
	return (uint32_t)c;
}

static void crc_zeros_table(uint32_t table[4][256], uint64_t n)
{
	uint32_t op[32];

	for (int i = 0; i < 32; i++)
		op[i] = crc_zeros_of(1u << i, n);
	for (uint32_t v = 0; v < 256; v++)
		for (int k = 0; k < 4; k++) {
			uint32_t r = 0;

			for (int i = 0; i < 8; i++)
				if (v & (1u << i))
					r ^= op[8 * k + i];
			table[k][v] = r;
		}
}

static void crc_hw_init(void)
{
	crc_zeros_table(crc_long, CRC_LONG);
	crc_zeros_table(crc_short, CRC_SHORT);
}

static uint32_t crc_shift(uint32_t table[4][256], uint32_t crc)
{
	return table[0][crc & 0xff] ^ table[1][(crc >> 8) & 0xff] ^
	       table[2][(crc >> 16) & 0xff] ^ table[3][crc >> 24];
}

__attribute__((target("sse4.2")))
static uint32_t crc_3way(uint32_t crc, const uint8_t *p, uint64_t *n, uint64_t block,
			 uint32_t table[4][256])
{
	while (*n >= 3 * block) {
		uint64_t c0 = crc, c1 = 0, c2 = 0;

		for (const uint8_t *end = p + block; p < end; p += 8) {
			uint64_t w0, w1, w2;

			memcpy(&w0, p, 8);
			memcpy(&w1, p + block, 8);
			memcpy(&w2, p + 2 * block, 8);
			c0 = __builtin_ia32_crc32di(c0, w0);
			c1 = __builtin_ia32_crc32di(c1, w1);
			c2 = __builtin_ia32_crc32di(c2, w2);
		}
		crc = crc_shift(table, (uint32_t)c0) ^ (uint32_t)c1;
		crc = crc_shift(table, crc) ^ (uint32_t)c2;
		p += 2 * block;
		*n -= 3 * block;
	}
	return crc;
}

__attribute__((target("sse4.2")))
static uint32_t crc_hw(uint32_t crc, const uint8_t *p, uint64_t n)
{
	static pthread_once_t once = PTHREAD_ONCE_INIT;
	uint64_t left = n;

	pthread_once(&once, crc_hw_init);
	crc = crc_3way(crc, p, &left, CRC_LONG, crc_long);
	p += n - left;
	n = left;
	crc = crc_3way(crc, p, &left, CRC_SHORT, crc_short);
	p += n - left;
	return crc_serial(crc, p, left);
}

uint32_t pyvmm_crc32c(uint32_t crc, const uint8_t *p, uint64_t n)
{
	crc = ~crc;
	crc = __builtin_cpu_supports("sse4.2") ? crc_hw(crc, p, n) : crc_sw(crc, p, n);
	return ~crc;
}
