/*
 * The vCPU thread's C side, compiled into vmm.kvm._kvm: the KVM_RUN loop with
 * the UART fast path, the kick that interrupts it, the gate a paused vCPU
 * thread waits at (without Python, without the GIL), and small wrappers that
 * return -errno.  vmm/cpu.py (VcpuThread) calls them; the contract is
 * csrc/vcpu_run.h.
 *
 * pyvmm_gate_kick and pyvmm_set_thread_name exist so that the cpr-exec
 * critical path never imports Python's signal module (and enum) to do either.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "vcpu_run.h"

int pyvmm_ioctl(int fd, unsigned long request, void *arg)
{
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

int pyvmm_ioctl_int(int fd, unsigned long request, unsigned long arg)
{
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

static void pyvmm_kick(int signo) { (void)signo; }

int pyvmm_install_kick_handler(int signo)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = pyvmm_kick;
    sigemptyset(&sa.sa_mask);
    return sigaction(signo, &sa, NULL) < 0 ? -errno : 0;
}

#define VCPU_NICE (-5)   /* (vcpu_run.h, pyvmm_vcpu_thread_nice) */

int pyvmm_vcpu_thread_nice(void)
{
    return setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), VCPU_NICE) < 0 ? -errno : 0;
}

int pyvmm_set_thread_name(const char *name)
{
    return prctl(PR_SET_NAME, (unsigned long)name, 0, 0, 0) < 0 ? -errno : 0;
}

static void coalesce(struct pyvmm_uart_fast *u);

/* 1 if the fast path took this port-IO exit, 0 to hand it to Python. */
static int uart_exit(struct kvm_run *run, struct pyvmm_uart_fast *u)
{
    unsigned char *data;

    if (!u || !u->enabled || run->io.size != 1 || run->io.count != 1)
        return 0;
    data = (unsigned char *)run + run->io.data_offset;
    if (run->io.port == u->base && run->io.direction == KVM_EXIT_IO_OUT) {
        ssize_t w;
        do
            w = write(u->out_fd, data, 1);
        while (w < 0 && errno == EINTR);
        if (w != 1)
            return 0;
        if (u->ring && !u->ring->registered)
            coalesce(u);
    } else if (run->io.port == u->base + 5 && run->io.direction == KVM_EXIT_IO_IN) {
        *data = u->lsr;
    } else {
        return 0;
    }
    u->handled++;
    return 1;
}

/* -- coalesced THR writes (vcpu_run.h) ------------------------------------------------ */
int pyvmm_uart_ring_init(struct pyvmm_uart_ring *r, int vm_fd, void *run,
                         unsigned long map_size, int page_offset)
{
    long page = sysconf(_SC_PAGESIZE);

    memset(r, 0, sizeof(*r));
    r->vm_fd = -1;
    if (page <= 0 || page_offset <= 0 || (unsigned long)(page_offset + 1) * page > map_size)
        return -EINVAL;
    r->page = (char *)run + (unsigned long)page_offset * page;
    r->max = (unsigned int)((page - sizeof(struct kvm_coalesced_mmio_ring)) /
                            sizeof(struct kvm_coalesced_mmio));
    r->vm_fd = vm_fd;
    return 0;
}

static void ring_lock(struct pyvmm_uart_ring *r)
{
    /* Held for a write() to the console, which blocks while nobody reads it (a
     * paused terminal, a full pipe): yield a while, then sleep between looks. */
    for (int spins = 0; __atomic_exchange_n(&r->lock, 1, __ATOMIC_ACQUIRE); spins++) {
        if (spins < 100) {
            sched_yield();
        } else {
            struct timespec t = {0, 100000};
            nanosleep(&t, NULL);
        }
    }
}

static void ring_unlock(struct pyvmm_uart_ring *r)
{
    __atomic_store_n(&r->lock, 0, __ATOMIC_RELEASE);
}

static int zone_ioctl(struct pyvmm_uart_fast *u, unsigned long request)
{
    struct kvm_coalesced_mmio_zone zone;

    memset(&zone, 0, sizeof(zone));
    zone.addr = u->base;
    zone.size = 1;
    zone.pio = 1;
    return ioctl(u->ring->vm_fd, request, &zone) < 0 ? -errno : 0;
}

/* The vCPU loop, serving a THR write while enabled: from now on KVM queues them.
 * (Under the lock, so Python's uncoalesce, which clears `enabled` first, wins.) */
static void coalesce(struct pyvmm_uart_fast *u)
{
    struct pyvmm_uart_ring *r = u->ring;

    ring_lock(r);
    if (u->enabled && !r->registered && r->vm_fd >= 0)
        r->registered = zone_ioctl(u, KVM_REGISTER_COALESCED_MMIO) == 0 ? 1 : -1;
    ring_unlock(r);   /* (-1: KVM refused it; not asked again) */
}

int pyvmm_uart_uncoalesce(struct pyvmm_uart_fast *u)
{
    struct pyvmm_uart_ring *r = u ? u->ring : NULL;
    int err = 0;

    if (!r)
        return 0;
    ring_lock(r);
    if (r->registered == 1) {
        err = zone_ioctl(u, KVM_UNREGISTER_COALESCED_MMIO);
        if (!err)
            r->registered = 0;
    }
    ring_unlock(r);
    return err;
}

int pyvmm_uart_drain(struct pyvmm_uart_fast *u)
{
    struct pyvmm_uart_ring *r = u ? u->ring : NULL;
    struct kvm_coalesced_mmio_ring *ring;
    unsigned char buf[512];
    int total = 0, err = 0;

    if (!r || !r->page)
        return 0;
    ring = r->page;
    if (__atomic_load_n(&ring->first, __ATOMIC_ACQUIRE) ==
        __atomic_load_n(&ring->last, __ATOMIC_ACQUIRE))
        return 0;
    /* One drainer at a time: bytes leave in the order KVM queued them. */
    ring_lock(r);
    for (;;) {
        unsigned int first = __atomic_load_n(&ring->first, __ATOMIC_ACQUIRE);
        unsigned int last = __atomic_load_n(&ring->last, __ATOMIC_ACQUIRE);
        unsigned int i = first;
        size_t n = 0, done = 0;

        if (first == last || first >= r->max || last >= r->max)
            break;
        while (i != last && n + 8 <= sizeof(buf)) {
            struct kvm_coalesced_mmio *e = &ring->coalesced_mmio[i];
            /* (only the THR is registered: one byte each; anything else is skipped) */
            if (e->pio == 1 && e->phys_addr == u->base && e->len == 1)
                buf[n++] = e->data[0];
            i = (i + 1) % r->max;
        }
        while (done < n) {
            ssize_t w = write(u->out_fd, buf + done, n - done);
            if (w < 0 && errno == EINTR)
                continue;
            if (w <= 0) {
                err = w < 0 ? -errno : -EIO;
                break;
            }
            done += (size_t)w;
        }
        if (err)     /* keep what did not leave (one entry per byte) */
            i = (unsigned int)((first + done) % r->max);
        __atomic_store_n(&ring->first, i, __ATOMIC_RELEASE);
        r->drained += done;
        total += (int)done;
        if (err)
            break;
    }
    ring_unlock(r);
    return err ? err : total;
}

/* -- the gate (vcpu_run.h) ------------------------------------------------------------ */
static long futex(unsigned int *word, int op, unsigned int val, const struct timespec *t)
{
    return syscall(SYS_futex, word, op, val, t, NULL, 0);
}

static void wake_all(unsigned int *word)
{
    futex(word, FUTEX_WAKE_PRIVATE, INT_MAX, NULL);
}

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Wait (futex) while *word == val, until timeout_ms (< 0: for ever) has passed
 * since `start`: 0 once it differs, -ETIMEDOUT. */
static int wait_while(unsigned int *word, unsigned int val, int timeout_ms, long long start)
{
    while (__atomic_load_n(word, __ATOMIC_SEQ_CST) == val) {
        struct timespec t, *tp = NULL;
        if (timeout_ms >= 0) {
            long long left = start + timeout_ms * 1000000LL - now_ns();
            if (left <= 0)
                return -ETIMEDOUT;
            t.tv_sec = left / 1000000000LL;
            t.tv_nsec = left % 1000000000LL;
            tp = &t;
        }
        futex(word, FUTEX_WAIT_PRIVATE, val, tp);
    }
    return 0;
}

int pyvmm_gate_park(struct pyvmm_vcpu_gate *g, struct kvm_run *run)
{
    for (;;) {
        unsigned int want = __atomic_load_n(&g->want, __ATOMIC_SEQ_CST);
        if (want & PYVMM_GATE_STOP)
            return 1;
        if (want & PYVMM_GATE_PAUSE) {
            if (__atomic_load_n(&g->parked, __ATOMIC_SEQ_CST) != PYVMM_GATE_PARKED) {
                __atomic_store_n(&g->parked, PYVMM_GATE_PARKED, __ATOMIC_SEQ_CST);
                wake_all(&g->parked);
            }
            futex(&g->want, FUTEX_WAIT_PRIVATE, want, NULL);
            continue;
        }
        /* Leaving: immediate_exit off first, then `want` once more.  A pause asked
         * after that look sets immediate_exit after our clear (kick), so the next
         * KVM_RUN returns at once instead of running the guest on. */
        __atomic_store_n(&run->immediate_exit, 0, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&g->want, __ATOMIC_SEQ_CST))
            continue;
        __atomic_store_n(&g->parked, PYVMM_GATE_RUNNING, __ATOMIC_SEQ_CST);
        __atomic_store_n(&g->entered_ns, now_ns(), __ATOMIC_SEQ_CST);
        __atomic_add_fetch(&g->entered, 1, __ATOMIC_SEQ_CST);
        wake_all(&g->entered);
        return 0;
    }
}

void pyvmm_gate_gone(struct pyvmm_vcpu_gate *g)
{
    __atomic_store_n(&g->parked, PYVMM_GATE_GONE, __ATOMIC_SEQ_CST);
    wake_all(&g->parked);
}

void pyvmm_gate_set(struct pyvmm_vcpu_gate *g, unsigned int bits)
{
    __atomic_or_fetch(&g->want, bits, __ATOMIC_SEQ_CST);
    wake_all(&g->want);
}

void pyvmm_gate_clear(struct pyvmm_vcpu_gate *g, unsigned int bits)
{
    __atomic_and_fetch(&g->want, ~bits, __ATOMIC_SEQ_CST);
    wake_all(&g->want);
}

int pyvmm_gate_kick(struct kvm_run *run, unsigned long thread, int signo)
{
    __atomic_store_n(&run->immediate_exit, 1, __ATOMIC_SEQ_CST);
    return -pthread_kill((pthread_t)thread, signo);
}

/* How long a pause polls before it sleeps: a kicked vCPU parks within ~0.1 ms
 * here, and the futex wake-up of a sleeping waiter costs ~60 us more on this
 * host (one vCPU's pause, bench/vcpu_costs.py: 156 -> 55 us median).  It polls
 * with sched_yield, not a busy loop: with more vCPU threads than CPUs, the ones
 * still to park need the CPU the waiter is on. */
#define PARK_POLL_NS 300000LL

int pyvmm_gate_wait_parked(struct pyvmm_vcpu_gate *g, int timeout_ms)
{
    long long start = now_ns();

    while (__atomic_load_n(&g->parked, __ATOMIC_ACQUIRE) == PYVMM_GATE_RUNNING) {
        if (now_ns() - start > PARK_POLL_NS)
            return wait_while(&g->parked, PYVMM_GATE_RUNNING, timeout_ms, start);
        sched_yield();
    }
    return 0;
}

int pyvmm_gate_wait_entered(struct pyvmm_vcpu_gate *g, unsigned int since, int timeout_ms)
{
    return wait_while(&g->entered, since, timeout_ms, now_ns());
}

int pyvmm_vcpu_run(int fd, struct kvm_run *run, struct pyvmm_uart_fast *uart,
                   struct pyvmm_vcpu_gate *gate)
{
    for (;;) {
        int r = ioctl(fd, KVM_RUN, 0), e = errno;

        /* What the guest queued in the coalesced ring leaves first, before this exit is
         * served and before a pause parks the thread (so a live update's stop finds the
         * ring empty).  A failed write leaves the bytes queued: Python's next drain
         * reports it. */
        if (uart && uart->ring)
            pyvmm_uart_drain(uart);
        if (r < 0) {
            /* A kick for a pause: KVM completes pending IO before it looks at
             * signals, so nothing is half done; park, and run on when released. */
            if (gate && (e == EINTR || e == EAGAIN) &&
                __atomic_load_n(&gate->want, __ATOMIC_SEQ_CST) == PYVMM_GATE_PAUSE &&
                pyvmm_gate_park(gate, run) == 0)
                continue;
            return -e;
        }
        if (run->exit_reason != KVM_EXIT_IO || !uart_exit(run, uart))
            return (int)run->exit_reason;
    }
}
