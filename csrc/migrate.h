/* Live migration's RAM pages, packed on the source and applied on the
 * destination in C (csrc/migrate.c; compiled into vmm.kvm._kvm, whose cdef
 * reads this header).  vmm/migration/pages.py drives them; the stream format
 * is docs/MIGRATION.md's.
 *
 * A PAGE section's payload: a little-endian u64 n (at most PYVMM_MIG_BATCH), n
 * entries (u64 each: page number << 12 | flags; the page numbers strictly
 * ascending), then the 4096 bytes of each entry
 * without PYVMM_MIG_ZERO (an all-zero page: no bytes), in the entries' order.
 * Page numbers count 4 KiB pages from the start of the RAM memfd.  The index
 * comes first so that the destination knows where every page goes before it
 * arrives, and receives it straight into RAM. */
#ifndef PYVMM_MIGRATE_H
#define PYVMM_MIGRATE_H

#include <stdint.h>

#define PYVMM_MIG_PAGE 4096
#define PYVMM_MIG_ZERO 1
#define PYVMM_MIG_ENTRY (8 + PYVMM_MIG_PAGE)	/* the most one page takes */
#define PYVMM_MIG_HEAD 16	/* a section's header: tag, CRC-32C, length (stream.py) */
#define PYVMM_MIG_BATCH 256	/* pages in one PAGE section, at most (~1 MiB) */
#define PYVMM_MIG_INDEX (8 + 8 * PYVMM_MIG_BATCH)	/* n and the entries, at most */
/* The buffer pyvmm_mig_send and pyvmm_mig_recv need: a header, the largest index,
 * the largest run of page bodies. */
#define PYVMM_MIG_BUF (PYVMM_MIG_HEAD + PYVMM_MIG_INDEX + PYVMM_MIG_BATCH * PYVMM_MIG_PAGE)

/* What pyvmm_mig_send and pyvmm_mig_recv return besides 0, 1 and -errno: */
#define PYVMM_MIG_PEER 2	/* send: the peer sent something or hung up */
#define PYVMM_MIG_END 3		/* recv: the peer closed the stream between two sections */
#define PYVMM_MIG_CUT 4		/* recv: ... inside a PAGE section */
#define PYVMM_MIG_CORRUPT 5	/* recv: a PAGE section names a page outside RAM or out
				 * of order, has unknown flags, or its length does not
				 * match its index */
#define PYVMM_MIG_BADCRC 6	/* recv: a PAGE section's CRC-32C does not match */
#define PYVMM_MIG_WRITE 7	/* recv: pwritev() into the RAM memfd failed (errno says why) */

struct pyvmm_mig_counts {
	uint64_t zero_pages;	/* QEMU's "duplicate" */
	uint64_t normal_pages;	/* pages sent whole */
};

/* Send the pages whose bit is set in `bits` (one bit per page of the npages pages of
 * RAM at `ram`), from page *cursor on, as PAGE sections of at most max_pages pages
 * (each behind its section header with its CRC-32C) on the socket fd: each page's
 * bit is cleared as it is packed, *cursor moves past it.  A page the guest writes
 * meanwhile may go half old, half new: its dirty bit (KVM's log) makes the next pass
 * send it again.  Sends until no page is
 * left (returns 0) or `budget` bytes went out (returns 1: call again).  The bodies
 * are copied from RAM into buf (PYVMM_MIG_BUF bytes) first: the checksum is of what
 * is sent, even if the guest writes the page meanwhile.  One call packs, checks and
 * sends many sections with no Python in between (cffi drops the GIL for it); the
 * caller checks for a cancel and paces between calls.  *sent grows by every byte
 * sent.  The socket may be non-blocking: a full socket is waited for, at most
 * timeout_ms at a time (then -ETIMEDOUT).  Returns PYVMM_MIG_PEER when the peer sent
 * something (a FAIL: the caller reads it) or hung up, -errno when a send fails. */
int pyvmm_mig_send(const uint8_t *ram, uint64_t npages, uint64_t *bits, uint64_t *cursor,
		   int fd, uint8_t *buf, uint64_t max_pages, uint64_t budget, int timeout_ms,
		   struct pyvmm_mig_counts *counts, uint64_t *sent);

/* Receive sections from the socket fd: each PAGE section is checked and its pages
 * written into the npages pages of RAM (the memfd `memfd` mapped at `ram`), one
 * section after another with no Python in between, until a section of another kind
 * comes (its PYVMM_MIG_HEAD-byte header is copied to head, its payload left unread:
 * returns 0) or about `budget` bytes came (returns 1: call again).  The index is read
 * and checked first (every page inside RAM and in order, known flags, the length
 * right), so no
 * byte from the peer lands outside RAM.  With memfd < 0 (RAM all allocated and
 * mapped beforehand: --mem-prealloc) the bodies are received straight into their
 * pages and the checksum is computed over them there: a section that fails it has
 * already been written, which is harmless, since the destination then fails and its
 * RAM is discarded.  Otherwise they are received into buf (PYVMM_MIG_BUF bytes) and
 * written with pwritev() on the memfd, runs of consecutive pages in one call: the
 * kernel fills them without a page fault per page in this process's mapping
 * (mapping a page costs 1-2.5 us here).  `touched` has one bit per page, set for each
 * page written; a zero page is written (memset) only if it was touched before, so
 * fresh RAM's untouched pages stay holes.  *received grows by every byte read.  A
 * socket that gives nothing for timeout_ms: -ETIMEDOUT; the other failures are the
 * PYVMM_MIG_ codes above or -errno. */
int pyvmm_mig_recv(int fd, int memfd, uint8_t *ram, uint64_t npages, uint64_t *touched,
		   uint8_t *buf, uint64_t budget, int timeout_ms, uint8_t *head,
		   struct pyvmm_mig_counts *counts, uint64_t *received);

/* How many of the npages bits are set. */
uint64_t pyvmm_mig_count(const uint64_t *bits, uint64_t npages);

/* Allocate, in the RAM memfd fd of npages pages, every page whose bit is set (one
 * fallocate per run): the destination does it before pass 1, for the pages the
 * source holds, so that writing them is a copy and no longer an allocation too (a
 * third of the destination's work in pass 1, measured).  Returns 0 (also when the
 * file system cannot fallocate), or -errno (ENOSPC, ENOMEM: no room for the guest). */
int pyvmm_mig_prealloc(int fd, const uint64_t *bits, uint64_t npages);

/* CRC-32C (Castagnoli) of n bytes, continuing from crc (0 to start): the
 * stream's section checksum.  SSE4.2's crc32 instruction when the CPU has it
 * (three streams at once, several GB/s: the check must not slow a pass down), else a
 * table. */
uint32_t pyvmm_crc32c(uint32_t crc, const uint8_t *p, uint64_t n);

#endif
