/* cpr-transfer's point of no return, decided in one word of a page both VMMs
 * map (csrc/commit.c; compiled into vmm.kvm._kvm, whose cdef reads this
 * header).  vmm/cpr/commit.py says why it exists and who claims when. */
#ifndef PYVMM_COMMIT_H
#define PYVMM_COMMIT_H

#include <stdint.h>

#define PYVMM_COMMIT_OPEN 0	/* nobody has decided: the guest is stopped */
#define PYVMM_COMMIT_NEW 1	/* the new VMM took the guest: it runs it */
#define PYVMM_COMMIT_OLD 2	/* the old VMM took it back: it resumes it */
#define PYVMM_COMMIT_EARLY 3	/* the new VMM runs it before its restore is done (the
				 * early start, csrc/handoff.c): it moves the word on to
				 * NEW, or hands the guest back and moves it to OLD */

/* Claim the guest for `who` (PYVMM_COMMIT_NEW or _OLD) if nobody has yet, in
 * one atomic compare-and-swap.  Returns who holds it afterwards: `who` when
 * this call won, the other side (or whatever else the word holds) when not. */
uint32_t pyvmm_commit_claim(void *word, uint32_t who);

/* Move the word from `from` to `to` if it still holds `from` (the new VMM,
 * EARLY to NEW or to OLD).  Returns what it holds afterwards. */
uint32_t pyvmm_commit_move(void *word, uint32_t from, uint32_t to);

/* Who holds the guest now (PYVMM_COMMIT_OPEN: nobody yet). */
uint32_t pyvmm_commit_read(void *word);

#endif
