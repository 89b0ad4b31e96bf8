/* cpr-transfer's handoff of the VM and vCPU state (csrc/handoff.c; compiled
 * into vmm.kvm._kvm, whose cdef reads this header).  vmm/cpr/handoff.py says
 * why it exists and who does what when. */
#ifndef PYVMM_HANDOFF_H
#define PYVMM_HANDOFF_H

#include <stddef.h>
#include <stdint.h>

#include "build_vm.h"
#include "kvm_state.h"
#include "vcpu_run.h"

#define PYVMM_HANDOFF_WAITING 0u     /* posted: nothing yet */
#define PYVMM_HANDOFF_POSTED 1u      /* posted: the old VMM wrote the block */
#define PYVMM_HANDOFF_CANCELLED 2u   /* posted: the new VMM stopped waiting */
#define PYVMM_HANDOFF_RUNNING 2      /* result: written, and the guest runs (early start) */
#define PYVMM_HANDOFF_BLOCK 4096     /* where the early block starts in the memfd */

/* The start of the memfd both VMMs map; the block (csrc/cpr_exec.h's early
 * block, its CPUIDs left empty) follows at PYVMM_HANDOFF_BLOCK.  The old VMM
 * copies its vCPU states there as pyvmm_vcpu_save left them, in the order it
 * read the pieces; the thread puts them in `order` before it writes them.
 * Either side can write all of it: the new VMM copies the block before it
 * checks it. */
struct pyvmm_handoff_page {
    uint32_t posted;      /* a futex word shared by both processes */
    uint32_t pad;
    uint64_t length;      /* the block's length, written before POSTED */
};

/* The new VMM's waiter, in its own memory (never the shared page's): the
 * thread, what it writes into, and its outcome. */
struct pyvmm_handoff_waiter {
    uint64_t thread;      /* pthread_t */
    void *page;           /* the mapping of the memfd */
    uint64_t size;        /* its size */
    int32_t vm_fd;
    uint32_t nvcpus;
    int32_t vcpu_fds[PYVMM_VM_MAX_VCPUS];
    uint8_t order[PYVMM_VCPU_NPIECES];   /* the restore order of our vCPUs' pieces */
    uint8_t norder;
    uint8_t pad[5];
    int32_t started;
    int32_t early;        /* run the guest once written, if the commit word lets us */
    int32_t kvm_fd;       /* (for the early start: the size of kvm_run) */
    int32_t pad2;
    void *commit;         /* the commit word (csrc/commit.h), for the early start */
    struct pyvmm_uart_fast uart;   /* our console, for the UART fast path meanwhile */
    int32_t cancel;       /* set by pyvmm_handoff_stop: whatever the shared word says */
    int32_t result;       /* a futex word: 0 not yet, 1 written, 2 written and running
                           * (PYVMM_HANDOFF_RUNNING), < 0 -errno of `step` */
    int64_t t_woke_ns;    /* CLOCK_MONOTONIC when the thread saw the block posted */
    int64_t t_done_ns;    /* CLOCK_MONOTONIC when the state was written (running: when
                           * the last vCPU went into the guest) */
    char step[48];
};

/* The memfd's size for `nvcpus` vCPUs (0 if there cannot be that many). */
uint64_t pyvmm_handoff_size(uint32_t nvcpus);

/* New VMM, before "prepared": start the thread that waits for the block and
 * writes it into the VM (w->page, size, vm_fd, nvcpus, vcpu_fds set).  0 or
 * -errno. */
int pyvmm_handoff_start(struct pyvmm_handoff_waiter *w);

/* The thread's check of a block it copied out (len bytes): pyvmm_early_valid for
 * w->nvcpus, then each vCPU's pieces put in w->order (the same set of pieces, or
 * -EPROTO; -EINVAL when not valid).  csrc/fuzz/fuzz_prebuild.c drives it. */
int pyvmm_handoff_check(const struct pyvmm_handoff_waiter *w, void *block, size_t len);

/* Old VMM, the block written after the page's header: tell the waiter.
 * Returns when (CLOCK_MONOTONIC ns): the moment the thread may start. */
int64_t pyvmm_handoff_post(void *page, uint64_t length);

/* New VMM: wait until the thread has finished (its result: 1 written, or
 * -errno), or -ETIMEDOUT after timeout_ms. */
int pyvmm_handoff_wait(struct pyvmm_handoff_waiter *w, int timeout_ms);

/* New VMM: cancel the wait if nothing was posted, then join the thread (one
 * that is writing finishes first; one that runs the guest early is stopped
 * first, as pyvmm_early_stop does).  Safe to call twice. */
void pyvmm_handoff_stop(struct pyvmm_handoff_waiter *w);

#endif
