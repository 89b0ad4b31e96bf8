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

static uint32_t get_u32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static int crc_hw_ok(void);
static uint32_t crc_hw(uint32_t crc, const uint8_t *p, uint64_t n);
static uint32_t crc_after_pages(uint32_t crc, uint64_t k);

/* The next pages (at most max, and PYVMM_MIG_BATCH) into one PAGE section's index
 * (n, then the entries) at idx and their bodies, back to back, at bodies.  Returns
 * n; *nbodies: how many bodies.  With braw, the raw CRC-32C register (from 0) goes
 * on over each body just copied, while the cache holds it. */
static uint64_t pack_pages(const uint8_t *ram, uint64_t npages, uint64_t *bits,
			   uint64_t *cursor, uint64_t max, uint8_t *idx, uint8_t *bodies,
			   uint64_t *nbodies, struct pyvmm_mig_counts *counts, uint32_t *braw)
{
	uint64_t pg = *cursor, n = 0, k = 0;

	if (max > PYVMM_MIG_BATCH)
		max = PYVMM_MIG_BATCH;
	while (pg < npages && n < max) {
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
			put_u64(idx + 8 + 8 * n, pg << 12 | PYVMM_MIG_ZERO);
			counts->zero_pages++;
		} else {
			put_u64(idx + 8 + 8 * n, pg << 12);
			memcpy(bodies + k * PYVMM_MIG_PAGE, page, PYVMM_MIG_PAGE);
			if (braw)
				*braw = crc_hw(*braw, bodies + k * PYVMM_MIG_PAGE, PYVMM_MIG_PAGE);
			k++;
			counts->normal_pages++;
		}
		n++;
		pg++;
	}
	put_u64(idx, n);
	*cursor = pg < npages ? pg : npages;
	*nbodies = k;
	return n;
}

/* Wait for one of `events` on fd, at most timeout_ms: the events that came (> 0),
 * -ETIMEDOUT, or -errno. */
static int wait_for(int fd, short events, int timeout_ms)
{
	struct pollfd p = { .fd = fd, .events = events };
	int r;

	do
		r = poll(&p, 1, timeout_ms);
	while (r < 0 && errno == EINTR);
	if (r < 0)
		return -errno;
	return r ? p.revents : -ETIMEDOUT;
}

/* Wait until fd is writable (1), the peer sent something or hung up (0), or not
 * within timeout_ms (-ETIMEDOUT). */
static int wait_writable(int fd, int timeout_ms)
{
	int r = wait_for(fd, POLLIN | POLLOUT, timeout_ms);

	if (r < 0)
		return r;
	return (r & (POLLIN | POLLHUP | POLLERR)) ? 0 : 1;
}

/* After a transfer of `done` bytes, the part of iov[0..*n) still to go. */
static struct iovec *advance(struct iovec *iov, int *n, size_t done)
{
	while (*n && done >= iov->iov_len) {
		done -= iov->iov_len;
		iov++;
		(*n)--;
	}
	if (*n && done) {
		iov->iov_base = (uint8_t *)iov->iov_base + done;
		iov->iov_len -= done;
	}
	return iov;
}

/* All of iov[0..n) to the socket, waiting when it is full. */
static int send_all(int fd, struct iovec *iov, int n, int timeout_ms)
{
	while (n) {
		struct msghdr msg = { .msg_iov = iov, .msg_iovlen = (size_t)n };
		ssize_t w = sendmsg(fd, &msg, MSG_NOSIGNAL);

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
		iov = advance(iov, &n, (size_t)w);
	}
	return 0;
}

int pyvmm_mig_send(const uint8_t *ram, uint64_t npages, uint64_t *bits, uint64_t *cursor,
		   int fd, uint8_t *buf, uint64_t max_pages, uint64_t budget, int timeout_ms,
		   struct pyvmm_mig_counts *counts, uint64_t *sent)
{
	uint8_t *idx = buf + PYVMM_MIG_HEAD, *bodies = idx + PYVMM_MIG_INDEX;
	uint64_t done = 0;
	int hw = crc_hw_ok();

	while (done < budget) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		uint64_t n, k, ilen, blen;
		uint32_t braw = 0, crc;
		struct iovec iov[2];
		int r;

		if (poll(&p, 1, 0) == 1)	/* the peer spoke (a FAIL) or hung up */
			return PYVMM_MIG_PEER;
		n = pack_pages(ram, npages, bits, cursor, max_pages, idx, bodies, &k, counts,
			       hw ? &braw : NULL);
		if (n == 0)
			return 0;
		ilen = 8 + 8 * n;
		blen = k * PYVMM_MIG_PAGE;
		if (hw)		/* crc(index || bodies) from crc(index) and the bodies' own */
			crc = ~(crc_after_pages(crc_hw(~0u, idx, ilen), k) ^ braw);
		else
			crc = pyvmm_crc32c(pyvmm_crc32c(0, idx, ilen), bodies, blen);
		memcpy(buf, "PAGE", 4);
		put_u32(buf + 4, crc);
		put_u64(buf + 8, ilen + blen);
		iov[0] = (struct iovec){ buf, PYVMM_MIG_HEAD + ilen };
		iov[1] = (struct iovec){ bodies, blen };
		r = send_all(fd, iov, blen ? 2 : 1, timeout_ms);
		if (r)
			return r;
		done += PYVMM_MIG_HEAD + ilen + blen;
		*sent += PYVMM_MIG_HEAD + ilen + blen;
	}
	return *cursor < npages ? 1 : 0;
}

__attribute__((target("popcnt")))
static uint64_t count_hw(const uint64_t *bits, uint64_t words)
{
	uint64_t n = 0;

	for (uint64_t i = 0; i < words; i++)
		n += (uint64_t)__builtin_popcountll(bits[i]);
	return n;
}

uint64_t pyvmm_mig_count(const uint64_t *bits, uint64_t npages)
{
	uint64_t n = 0, words = (npages + 63) / 64;

	/* (called after every SEND_BUDGET of a pass: the instruction, not libgcc's loop) */
	if (__builtin_cpu_supports("popcnt"))
		return count_hw(bits, words);
	for (uint64_t i = 0; i < words; i++)
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

/* Pages per recvmsg() at most (128 KiB): the checksum then reads them while the
 * cache still holds them (over whole 1 MiB sections, the destination's CRC took
 * 190 ms of a 1 GiB migration; measured with perf, 2026-12-07).  8 pages made the
 * CRC cheaper still but the receive dearer: 2,240 against 1,990 samples of CPU
 * for the two processes over a 1 GiB migration, two runs each. */
#define RECV_CHUNK 32

/* Fill iov[0..n) from the socket, waiting for data at most timeout_ms at a time;
 * with crc, the CRC-32C goes on over the bytes as they come.  first: nothing of this
 * section was read yet (a close here ends the stream). */
static int recv_all(int fd, struct iovec *iov, int n, int timeout_ms, int first,
		    uint64_t *received, uint32_t *crc)
{
	while (n) {
		struct msghdr msg = { .msg_iov = iov,
				      .msg_iovlen = (size_t)(n < RECV_CHUNK ? n : RECV_CHUNK) };
		ssize_t r = recvmsg(fd, &msg, 0);

		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			int w = wait_for(fd, POLLIN, timeout_ms);

			if (w < 0)
				return w;
			continue;
		}
		if (r < 0)
			return -errno;
		if (r == 0)
			return first ? PYVMM_MIG_END : PYVMM_MIG_CUT;
		first = 0;
		*received += (uint64_t)r;
		if (crc)
			for (size_t left = (size_t)r, i = 0; left; i++) {
				size_t part = left < iov[i].iov_len ? left : iov[i].iov_len;

				*crc = pyvmm_crc32c(*crc, iov[i].iov_base, part);
				left -= part;
			}
		iov = advance(iov, &n, (size_t)r);
	}
	return 0;
}

static int recv_into(int fd, uint8_t *p, uint64_t len, int timeout_ms, int first,
		     uint64_t *received)
{
	struct iovec iov = { p, len };

	return len ? recv_all(fd, &iov, 1, timeout_ms, first, received, NULL) : 0;
}

/* pwritev() the n pages at iov (page `first` on) into the memfd, all of them. */
static int write_run(int memfd, struct iovec *iov, int n, uint64_t first)
{
	off_t off = (off_t)(first * PYVMM_MIG_PAGE);

	while (n) {
		ssize_t w = pwritev(memfd, iov, n, off);

		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return w < 0 ? -errno : -EIO;
		off += w;
		iov = advance(iov, &n, (size_t)w);
	}
	return 0;
}

/* The bodies, received into buf, into the memfd: runs of consecutive pages in one
 * pwritev each. */
static int write_bodies(int memfd, const uint8_t *idx, uint64_t n, uint8_t *bodies)
{
	struct iovec iov[64];
	uint64_t first = 0;
	int run = 0, r;

	for (uint64_t i = 0; i < n; i++) {
		uint64_t entry = get_u64(idx + 8 + 8 * i), pg = entry >> 12;

		if (entry & PYVMM_MIG_ZERO)
			continue;
		if (run && (run == 64 || pg != first + (uint64_t)run)) {
			r = write_run(memfd, iov, run, first);
			if (r)
				return r;
			run = 0;
		}
		if (!run)
			first = pg;
		iov[run++] = (struct iovec){ bodies, PYVMM_MIG_PAGE };
		bodies += PYVMM_MIG_PAGE;
	}
	return run ? write_run(memfd, iov, run, first) : 0;
}

/* One PAGE section's payload of len bytes (its header read: crc is its checksum).
 * The bodies go straight to their pages (memfd < 0) or into buf, page after page. */
static int recv_page_section(int fd, int memfd, uint8_t *ram, uint64_t npages,
			     uint64_t *touched, uint8_t *buf, uint64_t len, uint32_t crc,
			     int timeout_ms, struct pyvmm_mig_counts *counts,
			     uint64_t *received)
{
	uint8_t *idx = buf, *bodies = buf + PYVMM_MIG_INDEX;
	struct iovec iov[PYVMM_MIG_BATCH];
	uint64_t n, k = 0;
	uint32_t c;
	int r;

	if (len < 8 || len > PYVMM_MIG_INDEX + PYVMM_MIG_BATCH * PYVMM_MIG_PAGE)
		return PYVMM_MIG_CORRUPT;
	r = recv_into(fd, idx, 8, timeout_ms, 0, received);
	if (r)
		return r;
	n = get_u64(idx);
	if (n > PYVMM_MIG_BATCH || 8 + 8 * n > len)
		return PYVMM_MIG_CORRUPT;
	r = recv_into(fd, idx + 8, 8 * n, timeout_ms, 0, received);
	if (r)
		return r;
	for (uint64_t i = 0, next = 0; i < n; i++) {
		uint64_t entry = get_u64(idx + 8 + 8 * i), pg = entry >> 12;

		/* (ascending, as packed: a page named twice would be received twice into
		 * one place, and checksummed as it was left, not as it came) */
		if (pg >= npages || pg < next || (entry & 0xfff & ~(uint64_t)PYVMM_MIG_ZERO))
			return PYVMM_MIG_CORRUPT;
		next = pg + 1;
		if (!(entry & PYVMM_MIG_ZERO)) {
			iov[k].iov_base = memfd < 0 ? ram + pg * PYVMM_MIG_PAGE
						    : bodies + k * PYVMM_MIG_PAGE;
			iov[k].iov_len = PYVMM_MIG_PAGE;
			k++;
		}
	}
	if (len != 8 + 8 * n + k * PYVMM_MIG_PAGE)
		return PYVMM_MIG_CORRUPT;
	c = pyvmm_crc32c(0, idx, 8 + 8 * n);
	r = recv_all(fd, iov, (int)k, timeout_ms, 0, received, &c);
	if (r)
		return r;
	if (c != crc)
		return PYVMM_MIG_BADCRC;
	if (memfd >= 0) {
		r = write_bodies(memfd, idx, n, bodies);
		if (r) {
			errno = -r;	/* (cffi's ffi.errno hands it to Python) */
			return PYVMM_MIG_WRITE;
		}
	}
	for (uint64_t i = 0; i < n; i++) {
		uint64_t entry = get_u64(idx + 8 + 8 * i), pg = entry >> 12;

		if (entry & PYVMM_MIG_ZERO) {
			if (touched[pg / 64] & (1ULL << (pg % 64)))
				memset(ram + pg * PYVMM_MIG_PAGE, 0, PYVMM_MIG_PAGE);
			counts->zero_pages++;
		} else {
			touched[pg / 64] |= 1ULL << (pg % 64);
			counts->normal_pages++;
		}
	}
	return 0;
}

int pyvmm_mig_recv(int fd, int memfd, uint8_t *ram, uint64_t npages, uint64_t *touched,
		   uint8_t *buf, uint64_t budget, int timeout_ms, uint8_t *head,
		   struct pyvmm_mig_counts *counts, uint64_t *received)
{
	uint64_t start = *received;

	while (*received - start < budget) {
		int r = recv_into(fd, head, PYVMM_MIG_HEAD, timeout_ms, 1, received);

		if (r)
			return r;
		if (memcmp(head, "PAGE", 4))
			return 0;
		r = recv_page_section(fd, memfd, ram, npages, touched, buf, get_u64(head + 8),
				      get_u32(head + 4), timeout_ms, counts, received);
		if (r)
			return r;
	}
	return 1;
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

static uint32_t crc_long[4][256], crc_short[4][256], crc_page[4][256];

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
	crc_zeros_table(crc_page, PYVMM_MIG_PAGE);
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

static int crc_hw_ok(void)
{
	return __builtin_cpu_supports("sse4.2");
}

/* The raw register after k pages more: crc(A || B) = zeros_|B|(crc(A)) ^ crc_from_0(B),
 * the sender's way to join the index's CRC and the bodies' (crc_hw has run once). */
static uint32_t crc_after_pages(uint32_t crc, uint64_t k)
{
	while (k--)
		crc = crc_shift(crc_page, crc);
	return crc;
}

uint32_t pyvmm_crc32c(uint32_t crc, const uint8_t *p, uint64_t n)
{
	crc = ~crc;
	crc = crc_hw_ok() ? crc_hw(crc, p, n) : crc_sw(crc, p, n);
	return ~crc;
}
