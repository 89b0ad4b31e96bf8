/* Live migration's RAM pages, packed on the source and applied on the
 * destination in C (csrc/migrate.c; compiled into vmm.kvm._kvm, whose cdef
 * reads this header).  vmm/migration/pages.py drives them; the stream format
 * is docs/MIGRATION.md's.
 *
 * A PAGE section's payload is a run of entries: a little-endian u64
 * (page number << 12 | flags), followed by the page's 4096 bytes unless
 * flags has PYVMM_MIG_ZERO (an all-zero page: nothing follows).  Page numbers
 * count 4 KiB pages from the start of the RAM memfd. */
#ifndef PYVMM_MIGRATE_H
#define PYVMM_MIGRATE_H

#include <stdint.h>

#define PYVMM_MIG_PAGE 4096
#define PYVMM_MIG_ZERO 1
#define PYVMM_MIG_ENTRY (8 + PYVMM_MIG_PAGE)	/* the most one page takes */
#define PYVMM_MIG_HEAD 16	/* a section's header: tag, CRC-32C, length (stream.py) */
#define PYVMM_MIG_PEER 2	/* pyvmm_mig_send: the peer sent something or hung up */

struct pyvmm_mig_counts {
	uint64_t zero_pages;	/* QEMU's "duplicate" */
	uint64_t normal_pages;	/* pages sent whole */
};

/* Pack the pages whose bit is set in `bits` (one bit per page of the npages
 * pages of RAM at `ram`), from page *cursor on, into out (cap bytes): each
 * page's bit is cleared as it is packed, *cursor moves past it.  Stops when
 * out cannot hold one more page or *cursor reaches npages.  Returns the bytes
 * written.  A page the guest writes meanwhile may be packed half old, half
 * new: its dirty bit (KVM's log) makes the next pass send it again. */
uint64_t pyvmm_mig_pack(const uint8_t *ram, uint64_t npages, uint64_t *bits,
			uint64_t *cursor, uint8_t *out, uint64_t cap,
			struct pyvmm_mig_counts *counts);

/* Send the pages whose bit is set as PAGE sections (the same as pyvmm_mig_pack's
 * payloads, each behind its section header with its CRC-32C) on the socket fd, until
 * no page is left (returns 0) or `budget` bytes went out (returns 1: call again).
 * One call packs, checks and sends many sections with no Python in between (cffi
 * drops the GIL for it); the caller checks for a cancel and paces between calls.
 * buf holds PYVMM_MIG_HEAD + cap bytes; *sent grows by every byte sent.  The socket
 * may be non-blocking: a full socket is waited for, at most timeout_ms at a time
 * (then -ETIMEDOUT).  Returns PYVMM_MIG_PEER when the peer sent something (a
 * FAIL: the caller reads it) or hung up, -errno when a send fails. */
int pyvmm_mig_send(const uint8_t *ram, uint64_t npages, uint64_t *bits, uint64_t *cursor,
		   int fd, uint8_t *buf, uint64_t cap, uint64_t budget, int timeout_ms,
		   struct pyvmm_mig_counts *counts, uint64_t *sent);

/* How many of the npages bits are set. */
uint64_t pyvmm_mig_count(const uint64_t *bits, uint64_t npages);

/* Allocate, in the RAM memfd fd of npages pages, every page whose bit is set (one
 * fallocate per run): the destination does it before pass 1, for the pages the
 * source holds, so that writing them is a copy and no longer an allocation too (a
 * third of the destination's work in pass 1, measured).  Returns 0 (also when the
 * file system cannot fallocate), or -errno (ENOSPC, ENOMEM: no room for the guest). */
int pyvmm_mig_prealloc(int fd, const uint64_t *bits, uint64_t npages);

/* Write a PAGE payload into the npages pages of RAM: the memfd `fd` whose
 * mapping is `ram`.  Whole pages go in with pwritev() on the memfd, runs of
 * consecutive pages in one call: the kernel allocates and fills them without a
 * page fault per page in this process's mapping.  With fd < 0 (RAM all allocated
 * and mapped beforehand: --mem-prealloc) they are copied into `ram` instead,
 * which costs less than pwritev's page cache steps (9 against 5-6.5 GB/s here).  `touched` has one bit per
 * page, set for each page written; a zero page is written (memset) only if it
 * was touched before, so the untouched pages of the fresh memfd stay holes
 * (never allocated).  Returns 0; -EINVAL if an entry is cut short, has unknown
 * flags or names a page past the end (entries before it are written); or
 * -errno if pwritev fails. */
int pyvmm_mig_apply(const uint8_t *in, uint64_t len, int fd, uint8_t *ram, uint64_t npages,
		    uint64_t *touched, struct pyvmm_mig_counts *counts);

/* CRC-32C (Castagnoli) of n bytes, continuing from crc (0 to start): the
 * stream's section checksum.  SSE4.2's crc32 instruction when the CPU has it
 * (three streams at once, several GB/s: the check must not slow a pass down), else a
 * table. */
uint32_t pyvmm_crc32c(uint32_t crc, const uint8_t *p, uint64_t n);

#endif
