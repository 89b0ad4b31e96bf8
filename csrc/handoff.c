/*
 * cpr-transfer's early start: the new VMM runs the guest as soon as it has the
 * VM and vCPU state, before its device restore (vmm/cpr/handoff.py says why and
 * what it changes about failures).
 *
 * The new VMM makes a memfd, maps it and starts a thread here that sleeps on
 * the page's first word (a futex shared by both processes), having made the
 * early vCPU threads 1..n-1 it will need.  The old VMM maps the same memfd;
 * right after it has read its paused VM's state it writes it there as an early
 * block (struct pyvmm_early_header and what follows, csrc/cpr_exec.h) and wakes
 * the thread, which copies the block out of the shared page (so the peer cannot
 * change it between the check and the use), checks it, writes it into the VM
 * with pyvmm_early_apply (the cpr-exec early start's restore), claims the guest
 * in the commit page (EARLY, csrc/commit.h: only if the old VMM has not taken it
 * back) and runs the vCPUs with pyvmm_early_go, vCPU 0 on this thread.  The new
 * VMM's Python restores the devices meanwhile, then makes the claim final (NEW)
 * and takes the vCPUs over, or hands the guest back (OLD) if it fails.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "commit.h"
#include "cpr_exec.h"
#include "handoff.h"
#include "vcpu_run.h"
#include "kvm_state.h"

static long futex(uint32_t *word, int op, uint32_t val, const struct timespec *t)
{
    return syscall(SYS_futex, word, op, val, t, NULL, 0);
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

uint64_t pyvmm_handoff_size(uint32_t nvcpus)
{
    if (nvcpus < 1 || nvcpus > PYVMM_VM_MAX_VCPUS)
        return 0;
    return PYVMM_HANDOFF_BLOCK + sizeof(struct pyvmm_early_header) + sizeof(struct pyvmm_vm_state)
        + (uint64_t)nvcpus * (sizeof(struct pyvmm_vcpu_state) + sizeof(struct pyvmm_early_cpuid));
}

static void finish(struct pyvmm_handoff_waiter *w, int result, const char *step)
{
    if (result != PYVMM_HANDOFF_RUNNING)
        pyvmm_early_unprepare();   /* (threads made ahead that will not run) */
    if (step)
        snprintf(w->step, sizeof(w->step), "%s", step);
    w->t_done_ns = now_ns();
    __atomic_store_n(&w->result, result, __ATOMIC_RELEASE);
    futex((uint32_t *)&w->result, FUTEX_WAKE_PRIVATE, INT_MAX, NULL);
}

/* Each vCPU's pieces as saved, in our restore order: the same pieces or -EPROTO. */
static int in_restore_order(const struct pyvmm_handoff_waiter *w, void *block)
{
    char *vcpus = (char *)block + sizeof(struct pyvmm_early_header) + sizeof(struct pyvmm_vm_state);
    uint32_t want = 0;

    for (uint32_t k = 0; k < w->norder && k < PYVMM_VCPU_NPIECES; k++)
        want |= 1u << w->order[k];
    for (uint32_t i = 0; i < w->nvcpus; i++) {
        struct pyvmm_vcpu_state *s = (void *)(vcpus + (size_t)i * (sizeof(struct pyvmm_vcpu_state)
                                                                   + sizeof(struct pyvmm_early_cpuid)));
        uint32_t have = 0;
        for (uint32_t k = 0; k < s->npieces; k++)   /* (checked: < PYVMM_VCPU_NPIECES) */
            have |= 1u << s->order[k];
        if (have != want || s->npieces != w->norder)
            return -EPROTO;
        memcpy(s->order, w->order, sizeof(s->order));
    }
    return 0;
}

int pyvmm_handoff_check(const struct pyvmm_handoff_waiter *w, void *block, size_t len)
{
    if (!pyvmm_early_valid(block, len, w->nvcpus))
        return -EINVAL;
    return in_restore_order(w, block);
}

static void *waiter_main(void *arg)
{
    struct pyvmm_handoff_waiter *w = arg;
    struct pyvmm_handoff_page *page = w->page;
    uint32_t posted;
    uint64_t length;
    void *copy;
    int r;

    pyvmm_set_thread_name("cpr-handoff");
    pyvmm_vcpu_thread_nice();   /* it will be vCPU 0's thread; its wake-up is downtime */
    /* The early start's vCPU threads 1..n-1 now, before the stop (see pyvmm_early_go);
     * if that fails they are made at the go. */
    if (w->early && w->commit && w->nvcpus > 1)
        pyvmm_early_prepare(w->nvcpus);
    /* A shared futex (no _PRIVATE: the old VMM wakes it), with a timeout so that a
     * peer writing WAITING back cannot keep the thread from seeing `cancel`. */
    const struct timespec recheck = {0, 100 * 1000000L};
    for (;;) {
        posted = __atomic_load_n(&page->posted, __ATOMIC_ACQUIRE);
        if (posted != PYVMM_HANDOFF_WAITING || __atomic_load_n(&w->cancel, __ATOMIC_ACQUIRE))
            break;
        futex(&page->posted, FUTEX_WAIT, PYVMM_HANDOFF_WAITING, &recheck);
    }
    if (posted != PYVMM_HANDOFF_POSTED || __atomic_load_n(&w->cancel, __ATOMIC_ACQUIRE)) {
        finish(w, -ECANCELED, "wait for the handed-over state");
        return NULL;
    }
    w->t_woke_ns = now_ns();
    length = __atomic_load_n(&page->length, __ATOMIC_ACQUIRE);
    if (length > w->size - PYVMM_HANDOFF_BLOCK) {
        finish(w, -EINVAL, "check the handed-over state");
        return NULL;
    }
    copy = malloc(length ? length : 1);
    if (!copy) {
        finish(w, -ENOMEM, "copy the handed-over state");
        return NULL;
    }
    memcpy(copy, (char *)w->page + PYVMM_HANDOFF_BLOCK, length);
    r = pyvmm_handoff_check(w, copy, length);
    if (r < 0) {
        free(copy);
        finish(w, r, "check the handed-over state");
        return NULL;
    }
    r = pyvmm_early_apply(copy, length, w->vm_fd, w->vcpu_fds, w->nvcpus, 0,
                          w->step, sizeof(w->step));
    if (r < 0 || !w->early || !w->commit || __atomic_load_n(&w->cancel, __ATOMIC_ACQUIRE)) {
        free(copy);
        finish(w, r < 0 ? r : 1, NULL);
        return NULL;
    }
    const struct pyvmm_early_header *h = copy;
    struct pyvmm_uart_fast uart = w->uart;
    int64_t entered = 0;
    if (!(h->flags & PYVMM_EARLY_UART) || w->uart.out_fd < 0)
        uart.enabled = 0;        /* the old VMM's fast path was off, or we have no console fd */
    else {
        uart.base = h->uart_base;   /* (the old VMM's UART, as saved; our own console fd) */
        uart.lsr = h->uart_lsr;
        uart.enabled = 1;
    }
    free(copy);
    /* The early start: the guest is ours from here (EARLY), unless the old VMM took it
     * back first (a cancel, downtime-limit): then only the state is written. */
    if (pyvmm_commit_claim(w->commit, PYVMM_COMMIT_EARLY) != PYVMM_COMMIT_EARLY) {
        finish(w, 1, NULL);
        return NULL;
    }
    r = pyvmm_early_go(w->kvm_fd, w->vcpu_fds, w->nvcpus, &uart, w->step, sizeof(w->step),
                       &entered);
    if (r < 0) {   /* nothing ran: the word goes back to OPEN, the state stays written */
        pyvmm_commit_move(w->commit, PYVMM_COMMIT_EARLY, PYVMM_COMMIT_OPEN);
        finish(w, 1, NULL);
        return NULL;
    }
    w->t_done_ns = entered;
    __atomic_store_n(&w->result, PYVMM_HANDOFF_RUNNING, __ATOMIC_RELEASE);
    futex((uint32_t *)&w->result, FUTEX_WAKE_PRIVATE, INT_MAX, NULL);
    pyvmm_early_run0();   /* this thread is vCPU 0's now, joined by pyvmm_early_stop */
    return NULL;
}

int pyvmm_handoff_start(struct pyvmm_handoff_waiter *w)
{
    pthread_t t;
    int r;

    if (w->started || w->nvcpus < 1 || w->nvcpus > PYVMM_VM_MAX_VCPUS ||
        w->size < pyvmm_handoff_size(w->nvcpus) || w->norder > PYVMM_VCPU_NPIECES)
        return -EINVAL;
    sigset_t all, old;

    w->result = 0;
    w->cancel = 0;
    /* It never handles a signal (Python's handlers expect Python's threads); its early
     * vCPU threads, which inherit this mask, unblock only the kick. */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    r = pthread_create(&t, NULL, waiter_main, w);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (r != 0)
        return -r;
    w->thread = (uint64_t)t;
    w->started = 1;
    return 0;
}

int64_t pyvmm_handoff_post(void *page, uint64_t length)
{
    struct pyvmm_handoff_page *p = page;
    int64_t t = now_ns();

    __atomic_store_n(&p->length, length, __ATOMIC_RELEASE);
    __atomic_store_n(&p->posted, PYVMM_HANDOFF_POSTED, __ATOMIC_RELEASE);
    futex(&p->posted, FUTEX_WAKE, INT_MAX, NULL);
    return t;
}

int pyvmm_handoff_wait(struct pyvmm_handoff_waiter *w, int timeout_ms)
{
    int64_t end = now_ns() + (int64_t)timeout_ms * 1000000LL;
    int32_t r;

    if (!w->started)
        return -ESRCH;
    while ((r = __atomic_load_n(&w->result, __ATOMIC_ACQUIRE)) == 0) {
        int64_t left = end - now_ns();
        struct timespec t;
        if (left <= 0)
            return -ETIMEDOUT;
        t.tv_sec = left / 1000000000LL;
        t.tv_nsec = left % 1000000000LL;
        futex((uint32_t *)&w->result, FUTEX_WAIT_PRIVATE, 0, &t);
    }
    return r;
}

void pyvmm_handoff_stop(struct pyvmm_handoff_waiter *w)
{
    struct pyvmm_handoff_page *p = w->page;
    uint32_t waiting = PYVMM_HANDOFF_WAITING;
    int32_t r;

    if (!w->started)
        return;
    __atomic_store_n(&w->cancel, 1, __ATOMIC_RELEASE);
    if (__atomic_compare_exchange_n(&p->posted, &waiting, PYVMM_HANDOFF_CANCELLED, 0,
                                    __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
        futex(&p->posted, FUTEX_WAKE, INT_MAX, NULL);
    /* Its outcome first (it comes: the thread only checks and writes, ~0.2 ms): one
     * that runs the guest does not return until pyvmm_early_stop stops it. */
    while ((r = __atomic_load_n(&w->result, __ATOMIC_ACQUIRE)) == 0)
        futex((uint32_t *)&w->result, FUTEX_WAIT_PRIVATE, 0, NULL);
    if (r == PYVMM_HANDOFF_RUNNING) {
        int32_t pending[PYVMM_VM_MAX_VCPUS];
        int64_t entered[PYVMM_VM_MAX_VCPUS];
        /* (this thread too; nothing to do if Python's take-over did) */
        pyvmm_early_stop(pending, entered, PYVMM_VM_MAX_VCPUS);
        pyvmm_early_reap();
    } else {
        pthread_join((pthread_t)w->thread, NULL);
    }
    w->started = 0;
}
