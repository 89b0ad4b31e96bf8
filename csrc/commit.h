/* cpr-transfer's point of no return, decided in one word of a page both VMMs
 * map (csrc/commit.c; compiled into vmm.kvm._kvm, whose cdef reads this
 * header).  vmm/cpr/commit.py says why it exists and who claims when. */
#ifndef PYVMM_COMMIT_H
#define PYVMM_COMMIT_H

#include <stdint.h>

#define PYVMM_COMMIT_OPEN 0	/* nobody has decided: the guest is stopped */
#define PYVMM_COMMIT_NEW 1	/* the new VMM took the guest: it runs it */
#define PYVMM_COMMIT_OLD 2	/* the old VMM took it back: it resumes it */

/* Claim the guest for `who` (PYVMM_COMMIT_NEW or _OLD) if nobody has yet, in
 * one atomic compare-and-swap.  Returns who holds it afterwards: `who` when
 * this call won, the other side (or whatever else the word holds) when not. */
uint32_t pyvmm_commit_claim(void *word, uint32_t who);

/* Who holds the guest now (PYVMM_COMMIT_OPEN: nobody yet). */
uint32_t pyvmm_commit_read(void *word);

#endif
