/*
 * cpr-transfer's point of no return as one compare-and-swap.  Both VMMs map
 * the same small memfd page (the old VMM makes it and sends it with its RAM,
 * before the stop); its first word says who holds the guest.  The new VMM
 * claims it the moment its restore is done and runs the guest; the old VMM
 * claims it only to roll back (a cancel, the pause past downtime-limit, the new
 * VMM refusing or gone).  Whoever's swap lands first decides; the other reads
 * the outcome in the same word.  No message round trip sits between "restored"
 * and the guest running, and no run of both VMMs on the same RAM is possible.
 */
#include "commit.h"

uint32_t pyvmm_commit_claim(void *word, uint32_t who)
{
    uint32_t expected = PYVMM_COMMIT_OPEN;

    if (__atomic_compare_exchange_n((uint32_t *)word, &expected, who, 0,
                                    __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
        return who;
    return expected;
}

uint32_t pyvmm_commit_move(void *word, uint32_t from, uint32_t to)
{
    uint32_t expected = from;

    if (__atomic_compare_exchange_n((uint32_t *)word, &expected, to, 0,
                                    __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
        return to;
    return expected;
}

uint32_t pyvmm_commit_read(void *word)
{
    return __atomic_load_n((uint32_t *)word, __ATOMIC_SEQ_CST);
}
