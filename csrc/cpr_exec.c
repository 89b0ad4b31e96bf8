/*
 * cpr-exec helpers, compiled into libpyvmm_kvm.so (which vmm.kvm._kvm links).
 *
 * 1. The prebuilder.  After a cpr-exec the new image must create a KVM VM
 *    and its memory slots before the guest can run (a VM fd works only in the
 *    address space that made it).  Python needs ~10 ms to start; the slots
 *    cost ~0.35 ms per GiB here.  So the old image execs pyvmm-cpr-exec
 *    (csrc/cpr_launch.c: a small program that needs this library, and loads
 *    libpython only in its main()) or, for a Python without a shared
 *    libpython, Python with this library in LD_PRELOAD; with
 *    PYVMM_CPR_PREBUILD naming a memfd that holds a struct
 *    pyvmm_prebuild_spec.  The constructor below runs before main(), starts a
 *    thread that opens /dev/kvm, maps RAM and builds the VM (pyvmm_build_vm,
 *    csrc/build_vm.c: the slots, the irqchip, the PIT and the vCPUs, as the
 *    normal boot builds them), while the main thread goes on to Python.  When
 *    pyvmm's resume path imports vmm.kvm._kvm, the dynamic loader hands it
 *    this library already loaded, and pyvmm_prebuilt_wait() joins the thread
 *    and gives the fds to Python.  The constructor removes its variables (and
 *    LD_PRELOAD, if it was ours) from the environment, so nothing the new
 *    image starts inherits them.
 *
 * 1b. The early start.  When the old image stopped a running guest, it also
 *    writes the saved vCPU, VM and irqchip state after the spec in that memfd
 *    (struct pyvmm_early_header, csrc/cpr_exec.h).  The builder thread then
 *    restores it as Python's restore would (CPUID, the VM's state, each
 *    vCPU's state in RESTORE_ORDER, one TSC value for all vCPUs, moved on by
 *    the time since the save) and runs each vCPU on a thread of its own in the
 *    C loop of csrc/vcpu_run.c (vCPU 0 on the builder thread itself, which is
 *    on a CPU already: a new thread may wait for one on a busy host): the
 *    guest runs while Python starts.  Those
 *    threads serve only what the C loop serves (the in-kernel irqchip and
 *    timers, the UART fast path's console output); an exit that needs a
 *    Python device ends the thread with the exit left in kvm_run.  Python's
 *    resume path restores the devices, then pyvmm_early_stop() kicks and joins
 *    the threads and its own vCPU threads complete what they left, then run
 *    on (vmm/cpr/target.py).  Anything refused or failed before the first
 *    KVM_RUN leaves the VM for Python to restore as before.
 *
 * 2. The holder.  execve drops the old address space (for a guest that has
 *    touched its RAM: page tables over gigabytes) and closes the old VM's fds
 *    (destroying a KVM VM takes ~20-25 ms here), both on the critical path.
 *    pyvmm_holder_start() clones a child that shares our address space
 *    (CLONE_VM, like vfork but without waiting) and keeps only the fds it is
 *    given.  After execve the old mm and the old VM live on in the holder, which
 *    exits (and pays for both, at nice 19) once the new image closes the
 *    pipe, after the guest runs again.  Nice 19 rather than SCHED_IDLE: the
 *    teardown must yield to the guest, but not wait for an idle CPU forever.
 *
 * The holder runs on our memory without its own thread-local storage, so it
 * only makes raw system calls (errno lives in TLS) and never returns into libc.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <linux/kvm.h>
#include <linux/prctl.h>

#include "cpr_exec.h"
#include "kvm_state.h"
#include "vcpu_run.h"

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int fail(struct pyvmm_prebuilt *b, const char *step, int err)
{
    b->status = -(err ? err : EINVAL);
    snprintf(b->vm.step, sizeof(b->vm.step), "%s", step);
    return b->status;
}

/* Whether a prebuild request is safe to act on: ours, and a layout
 * pyvmm_build_vm accepts for its RAM (csrc/fuzz/fuzz_prebuild.c checks this claim). */
int pyvmm_prebuild_spec_valid(const struct pyvmm_prebuild_spec *s)
{
    if (s->magic != PYVMM_PREBUILD_MAGIC || s->version != PYVMM_PREBUILD_VERSION)
        return 0;
    return s->ram_fd >= 0 && pyvmm_vm_layout_valid(&s->layout, s->ram_size);
}

/* Open /dev/kvm, map the RAM memfd and build the VM on it with
 * pyvmm_build_vm (csrc/build_vm.c), as vmm.machine.create_kvm_parts does. */
int pyvmm_prebuild_run(const struct pyvmm_prebuild_spec *s, struct pyvmm_prebuilt *b)
{
    struct stat st;
    int r;

    memset(b, 0, sizeof(*b));
    b->kvm_fd = b->vm.vm_fd = -1;
    b->t_start_ns = now_ns();
    if (!pyvmm_prebuild_spec_valid(s))
        fail(b, "check the prebuild request", EINVAL);
    else if (fstat(s->ram_fd, &st) < 0)
        fail(b, "fstat the RAM memfd", errno);
    else if ((uint64_t)st.st_size != s->ram_size)
        fail(b, "check the RAM memfd's size", EINVAL);
    else if ((b->kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC)) < 0)
        fail(b, "open /dev/kvm", errno);
    else {
        void *ram = mmap(NULL, s->ram_size, PROT_READ | PROT_WRITE, MAP_SHARED, s->ram_fd, 0);
        if (ram == MAP_FAILED) {
            fail(b, "mmap guest RAM", errno);
        } else {
            b->ram_addr = (uintptr_t)ram;
            b->ram_size = s->ram_size;
            r = pyvmm_build_vm(b->kvm_fd, b->ram_addr, b->ram_size, &s->layout, &b->vm);
            b->status = r < 0 ? r : 1;
        }
    }
    if (b->status != 1) {   /* pyvmm_build_vm closed what it made */
        if (b->kvm_fd >= 0)
            close(b->kvm_fd);
        if (b->ram_addr)
            munmap((void *)(uintptr_t)b->ram_addr, b->ram_size);
        b->kvm_fd = -1;
        b->ram_addr = 0;
    }
    b->t_done_ns = now_ns();
    return b->status;
}

static struct pyvmm_prebuild_spec g_spec;
static struct pyvmm_prebuilt g_built;
static pthread_t g_thread;
static int g_running;

/* -- the early start ---------------------------------------------------------- */

_Static_assert(sizeof(struct pyvmm_early_header) % 8 == 0, "early header alignment");
_Static_assert(sizeof(struct pyvmm_vm_state) % 8 == 0, "VM state alignment");
_Static_assert(sizeof(struct pyvmm_vcpu_state) % 8 == 0, "vCPU state alignment");
_Static_assert(sizeof(struct pyvmm_early_cpuid) % 8 == 0, "CPUID alignment");

#define MSR_IA32_TSC 0x10
#define EARLY_VCPU_SIZE (sizeof(struct pyvmm_vcpu_state) + sizeof(struct pyvmm_early_cpuid))
#define EARLY_MAX_SIZE (sizeof(struct pyvmm_early_header) + sizeof(struct pyvmm_vm_state) \
                        + PYVMM_VM_MAX_VCPUS * EARLY_VCPU_SIZE)

struct early_vcpu {
    pthread_t thread;
    int fd;
    struct kvm_run *run;
    int32_t pending;       /* the exit left for Python (0: none) */
    int32_t done;          /* early_run returned: the thread no longer touches its vCPU */
    int32_t joined;
    int64_t entered_ns;
};

static void *g_early;              /* the block read from the spec memfd (malloc'd) */
static size_t g_early_len;
static struct early_vcpu g_ev[PYVMM_VM_MAX_VCPUS];
static int g_early_n;              /* threads started */
static int g_reap;                 /* threads stopped, still to join (pyvmm_early_reap) */
static int g_prepared;             /* vCPU threads 1..n-1 made ahead, waiting (handoff) */
static size_t g_run_size;
static struct pyvmm_uart_fast g_uart;
static struct pyvmm_uart_ring g_early_ring;   /* the prebuilder's (no machine yet) */
static int g_early_ring_vm = -1, g_early_ring_offset;   /* early_ring(): for pyvmm_early_go */
static int g_early_zone = -1;                 /* pyvmm_early_uart_zone(), from the stop */
static volatile int g_vcpu0_cpu = -1;         /* the CPU vCPU 0's early thread went in on */
static uint64_t g_early_drained;
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_cond = PTHREAD_COND_INITIALIZER;
static int g_go, g_entered, g_early_stop, g_done;
static const char *g_early_read_step;   /* why the constructor could not read the block */
static int g_early_read_err;

static const struct pyvmm_vm_state *early_vm(const void *buf)
{
    return (const void *)((const char *)buf + sizeof(struct pyvmm_early_header));
}

static struct pyvmm_vcpu_state *early_vcpu_state(const void *buf, uint32_t i)
{
    return (void *)((char *)(uintptr_t)early_vm(buf) + sizeof(struct pyvmm_vm_state)
                    + i * EARLY_VCPU_SIZE);
}

static struct pyvmm_early_cpuid *early_cpuid(const void *buf, uint32_t i)
{
    return (void *)((char *)early_vcpu_state(buf, i) + sizeof(struct pyvmm_vcpu_state));
}

int pyvmm_early_valid(const void *buf, size_t len, uint32_t nvcpus)
{
    const struct pyvmm_early_header *h = buf;

    if (len < sizeof(*h) || h->magic != PYVMM_EARLY_MAGIC || h->version != PYVMM_EARLY_VERSION)
        return 0;
    if (h->header_size != sizeof(*h) || h->vm_size != sizeof(struct pyvmm_vm_state) ||
        h->vcpu_size != sizeof(struct pyvmm_vcpu_state) ||
        h->cpuid_size != sizeof(struct pyvmm_early_cpuid))
        return 0;
    if (h->nvcpus != nvcpus || nvcpus < 1 || nvcpus > PYVMM_VM_MAX_VCPUS)
        return 0;
    if (len != sizeof(*h) + sizeof(struct pyvmm_vm_state) + nvcpus * EARLY_VCPU_SIZE)
        return 0;
    if (h->flags & ~PYVMM_EARLY_UART)
        return 0;
    if ((h->flags & PYVMM_EARLY_UART) && (h->uart_fd < 1 || h->uart_fd > 2 ||
                                          h->uart_base > 0xfff8))
        return 0;
    if (h->tsc_khz > 100000000u || h->save_ns < 0)   /* 100 GHz: no real TSC */
        return 0;
    if (early_vm(buf)->flags & ~(PYVMM_VM_STATE_IRQCHIP | PYVMM_VM_STATE_PIT))
        return 0;
    for (uint32_t i = 0; i < nvcpus; i++) {
        const struct pyvmm_vcpu_state *s = early_vcpu_state(buf, i);
        if (s->npieces > PYVMM_VCPU_NPIECES || s->msrs.nmsrs > PYVMM_VCPU_MAX_MSRS)
            return 0;
        for (uint32_t k = 0; k < s->npieces; k++)
            if (s->order[k] >= PYVMM_VCPU_NPIECES)
                return 0;
        if (early_cpuid(buf, i)->nent > PYVMM_EARLY_MAX_CPUID)
            return 0;
    }
    return 1;
}

static int early_fail(const char *step, int err)
{
    g_built.early = -(err ? err : EINVAL);
    snprintf(g_built.early_step, sizeof(g_built.early_step), "%s", step);
    return g_built.early;
}

static int has_msrs(const struct pyvmm_vcpu_state *s)
{
    for (uint32_t k = 0; k < s->npieces; k++)
        if (s->order[k] == PYVMM_VCPU_MSRS)
            return 1;
    return 0;
}

static struct kvm_msr_entry *tsc_entry(struct pyvmm_vcpu_state *s)
{
    if (!has_msrs(s))
        return NULL;
    for (uint32_t k = 0; k < s->msrs.nmsrs; k++)
        if (s->msrs.entries[k].index == MSR_IA32_TSC)
            return &s->msrs.entries[k];
    return NULL;
}

/* The early thread's own setup: SIGUSR1 (the kick) is the only signal it takes. */
static void early_thread_setup(struct early_vcpu *e)
{
    char name[16];
    sigset_t kick;

    sigemptyset(&kick);
    sigaddset(&kick, SIGUSR1);
    pthread_sigmask(SIG_UNBLOCK, &kick, NULL);
    snprintf(name, sizeof(name), "vcpu%d-early", (int)(e - g_ev));
    pyvmm_set_thread_name(name);
    /* The guest's vCPUs before Python's start-up, which runs beside them: ahead of it
     * where we may (CAP_SYS_NICE); the thread ends at the take-over. */
    pyvmm_vcpu_thread_nice();
}

/* Run the vCPU until the stop, or until an exit only Python serves: that one is
 * left in kvm_run (an error too: Python's own KVM_RUN meets it again and reports it). */
static void early_run(struct early_vcpu *e)
{
    int r;

    for (;;) {
        r = pyvmm_vcpu_run(e->fd, e->run, g_uart.enabled ? &g_uart : NULL, NULL);
        if (r == -EINTR || r == -EAGAIN) {
            if (__atomic_load_n(&g_early_stop, __ATOMIC_ACQUIRE))
                break;
            continue;
        }
        e->pending = r > 0 ? r : 0;
        break;
    }
    __atomic_store_n(&e->done, 1, __ATOMIC_RELEASE);
}

/* vCPUs 1..n-1 (vCPU 0 runs on the builder thread itself, already on a CPU). */
static void *early_vcpu_main(void *arg)
{
    struct early_vcpu *e = arg;
    int stop;

    early_thread_setup(e);
    pthread_mutex_lock(&g_lock);
    while (!g_go)
        pthread_cond_wait(&g_cond, &g_lock);
    stop = g_early_stop;
    if (!stop) {
        e->entered_ns = now_ns();
        g_entered++;
        pthread_cond_broadcast(&g_cond);
    }
    pthread_mutex_unlock(&g_lock);
    if (!stop)
        early_run(e);
    return NULL;
}

/* Let go of the threads' mappings and the block (after a stop or a failure). */
static void early_release(void)
{
    for (int i = 0; i < PYVMM_VM_MAX_VCPUS; i++) {
        if (g_ev[i].run)
            munmap(g_ev[i].run, g_run_size);
        g_ev[i].run = NULL;
    }
    memset(&g_early_ring, 0, sizeof(g_early_ring));   /* (its page was vCPU 0's run) */
    free(g_early);
    g_early = NULL;
    g_early_len = 0;
}

int pyvmm_early_apply(void *block, size_t len, int vm_fd, const int *vcpu_fds, uint32_t n,
                      int set_cpuid, char *step, size_t step_size)
{
    const struct pyvmm_early_header *h = block;
    struct kvm_msr_entry *tsc0, *tsc;
    int r;

#define APPLY_FAIL(what, err) \
    do { snprintf(step, step_size, "%s", (what)); return -(err ? err : EINVAL); } while (0)
    if (!pyvmm_early_valid(block, len, n))
        APPLY_FAIL("check the early state", EINVAL);
    if (set_cpuid)
        for (uint32_t i = 0; i < n; i++)
            if (ioctl(vcpu_fds[i], KVM_SET_CPUID2, early_cpuid(block, i)) < 0)
                APPLY_FAIL("KVM SET_CPUID2", errno);
    struct pyvmm_vm_state *vm = (void *)(uintptr_t)early_vm(block);
    r = pyvmm_vm_restore(vm_fd, vm, sizeof(*vm));
    if (r < 0)
        APPLY_FAIL(vm->step, -r);
    /* One TSC value for every vCPU, vCPU 0's moved on by the pause, as
     * vmm.machine.Machine.restore_state writes it (KVM then syncs them). */
    tsc0 = tsc_entry(early_vcpu_state(block, 0));
    if (tsc0) {
        int64_t elapsed = now_ns() - h->save_ns;
        uint64_t value = tsc0->data + (uint64_t)((unsigned __int128)(elapsed > 0 ? elapsed : 0)
                                                 * h->tsc_khz / 1000000);
        for (uint32_t i = 0; i < n; i++)
            if ((tsc = tsc_entry(early_vcpu_state(block, i))))
                tsc->data = value;
    }
    for (uint32_t i = 0; i < n; i++) {
        struct pyvmm_vcpu_state *s = early_vcpu_state(block, i);
        r = pyvmm_vcpu_restore(vcpu_fds[i], s, sizeof(*s));
        if (r < 0)
            APPLY_FAIL(s->step, -r);
    }
    return 0;
#undef APPLY_FAIL
}

/* Let go of threads made ahead that will not run (before any go). */
void pyvmm_early_unprepare(void)
{
    if (!g_prepared)
        return;
    pthread_mutex_lock(&g_lock);
    g_early_stop = 1;
    g_go = 1;
    pthread_cond_broadcast(&g_cond);
    pthread_mutex_unlock(&g_lock);
    for (int i = 1; i <= g_prepared; i++)
        pthread_join(g_ev[i].thread, NULL);
    g_prepared = 0;
}

/* Threads for vCPUs 1..n-1, waiting for the go; how many could be made. */
static int early_make_threads(uint32_t n)
{
    int created = 0;

    pthread_mutex_lock(&g_lock);
    g_go = g_entered = g_early_stop = 0;
    pthread_mutex_unlock(&g_lock);
    for (uint32_t i = 1; i < n; i++) {
        if (pthread_create(&g_ev[i].thread, NULL, early_vcpu_main, &g_ev[i]) != 0)
            break;
        created++;
    }
    return created;
}

int pyvmm_early_prepare(uint32_t n)
{
    int created;

    pyvmm_early_reap();
    if (n < 1 || n > PYVMM_VM_MAX_VCPUS || g_early_n || g_prepared)
        return -EINVAL;
    created = early_make_threads(n);
    g_prepared = created;
    if (created < (int)n - 1) {
        pyvmm_early_unprepare();
        return -EAGAIN;
    }
    return 0;
}

int pyvmm_early_go(int kvm_fd, const int *vcpu_fds, uint32_t n,
                   const struct pyvmm_uart_fast *uart, char *step, size_t step_size,
                   int64_t *t_entered)
{
    int r, created = 0;

#define GO_FAIL(what, err) \
    do { pyvmm_early_unprepare(); snprintf(step, step_size, "%s", (what)); \
         return -(err ? err : EINVAL); } while (0)
    pyvmm_early_reap();
    if (n < 1 || n > PYVMM_VM_MAX_VCPUS || g_early_n || (g_prepared && g_prepared != (int)n - 1))
        GO_FAIL("start the early vCPUs", EINVAL);
    r = ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (r <= 0)
        GO_FAIL("KVM GET_VCPU_MMAP_SIZE", r < 0 ? errno : EINVAL);
    g_run_size = (size_t)r;
    for (uint32_t i = 0; i < n; i++) {
        void *run = mmap(NULL, g_run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu_fds[i], 0);
        if (run == MAP_FAILED) {
            r = errno;
            early_release();
            GO_FAIL("mmap kvm_run", r);
        }
        g_ev[i].run = run;
        g_ev[i].fd = vcpu_fds[i];
        g_ev[i].pending = 0;
        g_ev[i].done = g_ev[i].joined = 0;
        g_ev[i].entered_ns = 0;
    }
    memset(&g_uart, 0, sizeof(g_uart));
    g_early_zone = -1;
    g_early_drained = 0;
    if (uart && uart->enabled)
        g_uart = *uart;
    if (g_uart.ring == &g_early_ring &&   /* (the prebuilder's: on vCPU 0's run page) */
        pyvmm_uart_ring_init(&g_early_ring, g_early_ring_vm, g_ev[0].run, g_run_size,
                             g_early_ring_offset) < 0)
        g_uart.ring = NULL;
    /* (uart->ring: cpr-transfer's handoff passes the new machine's coalesced ring, which
     * its Python vCPU threads drain on after the take-over; the prebuilder has no
     * machine and passes none: its threads use a ring of their own, early_ring) */
    if ((r = pyvmm_install_kick_handler(SIGUSR1)) < 0) {
        early_release();
        GO_FAIL("install the kick handler", -r);
    }
    /* vCPU 0 on this thread (pyvmm_early_run0, after the caller hands its result
     * over), the others on threads of their own, all or none: none has entered the
     * guest before all exist.  Threads made ahead (pyvmm_early_prepare, before the
     * stop) only wait to be woken: a thread made now would wait for a CPU behind
     * the vCPUs already running (the scheduler places a new thread last), ~3 ms
     * per vCPU with a busy guest here. */
    g_ev[0].thread = pthread_self();
    if (g_prepared) {
        created = g_prepared;
        g_prepared = 0;
    } else {
        created = early_make_threads(n);
    }
    pthread_mutex_lock(&g_lock);
    g_early_stop = created < (int)n - 1;
    g_go = 1;
    pthread_cond_broadcast(&g_cond);
    while (!g_early_stop && g_entered < created)
        pthread_cond_wait(&g_cond, &g_lock);
    pthread_mutex_unlock(&g_lock);
    if (created < (int)n - 1) {
        for (int i = 1; i <= created; i++)
            pthread_join(g_ev[i].thread, NULL);
        early_release();
        GO_FAIL("start the early vCPU threads", EAGAIN);
    }
    g_early_n = (int)n;
    early_thread_setup(&g_ev[0]);
    g_vcpu0_cpu = sched_getcpu();
    g_ev[0].entered_ns = now_ns();   /* the last to go in: pyvmm_early_run0 */
    *t_entered = 0;
    for (uint32_t i = 0; i < n; i++)
        if (g_ev[i].entered_ns > *t_entered)
            *t_entered = g_ev[i].entered_ns;
    return 0;
#undef GO_FAIL
}

void pyvmm_early_run0(void)
{
    if (g_early_n && pthread_equal(g_ev[0].thread, pthread_self()))
        early_run(&g_ev[0]);
}

/* The prebuilder's coalesced ring for the console's THR writes, as the machine's
 * (vmm/machine.py, _uart_ring), or NULL where KVM has none (each byte then exits).
 * pyvmm_early_go points it at the ring page of vCPU 0's kvm_run, which it maps
 * anyway.  Registered at the guest's first THR write, as the machine's; the
 * take-over hands the registration to the machine's ring (pyvmm_early_uart_zone). */
static struct pyvmm_uart_ring *early_ring(int kvm_fd, int vm_fd)
{
    int offset = ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_COALESCED_MMIO);

    if (ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_COALESCED_PIO) <= 0 || offset <= 0)
        return NULL;
    g_early_ring_vm = vm_fd;
    g_early_ring_offset = offset;
    return &g_early_ring;
}

/* Restore the early block into the VM just built and run its vCPUs. */
static int early_start(void)
{
    const struct pyvmm_early_header *h = g_early;
    struct pyvmm_uart_fast uart;
    uint32_t n = (uint32_t)g_built.vm.nvcpus;
    int r;

    r = pyvmm_early_apply(g_early, g_early_len, g_built.vm.vm_fd, g_built.vm.vcpu_fds, n, 1,
                          g_built.early_step, sizeof(g_built.early_step));
    if (r < 0) {
        g_built.early = r;
        return r;
    }
    memset(&uart, 0, sizeof(uart));
    if (h->flags & PYVMM_EARLY_UART) {
        uart.out_fd = h->uart_fd;
        uart.base = h->uart_base;
        uart.lsr = h->uart_lsr;
        uart.enabled = 1;
        uart.ring = early_ring(g_built.kvm_fd, g_built.vm.vm_fd);
    }
    r = pyvmm_early_go(g_built.kvm_fd, g_built.vm.vcpu_fds, n, &uart, g_built.early_step,
                       sizeof(g_built.early_step), &g_built.t_early_ns);
    if (r < 0) {
        g_built.early = r;
        return r;
    }
    g_built.early = 1;
    g_built.tsc_khz = h->tsc_khz;
    return 1;
}

int pyvmm_early_stop(int32_t *pending, int64_t *entered_ns, int n)
{
    int count = g_early_n;
    int64_t until;

    if (!count)
        return 0;
    __atomic_store_n(&g_early_stop, 1, __ATOMIC_RELEASE);
    for (int i = 0; i < count; i++)
        g_ev[i].run->immediate_exit = 1;
    for (int i = 0; i < count; i++)
        pthread_kill(g_ev[i].thread, SIGUSR1);   /* (ESRCH: it ended on an exit for Python) */
    /* This is a pause of the guest (the take-over): wait for each thread to have left
     * its vCPU (`done`, ~15-40 us after the kick here) by polling, with sched_yield,
     * not in pthread_join, which returns ~60-100 us later (the thread's exit, then a
     * sleeping waiter's wake-up).  pyvmm_early_reap() joins them, after the guest
     * runs again. */
    until = now_ns() + 20000000LL;
    for (int i = 0; i < count; i++)
        while (!__atomic_load_n(&g_ev[i].done, __ATOMIC_ACQUIRE)) {
            if (now_ns() > until) {   /* (a starved thread: sleep for it after all) */
                pthread_join(g_ev[i].thread, NULL);
                g_ev[i].joined = 1;
                break;
            }
            sched_yield();
        }
    for (int i = 0; i < count; i++)
        g_ev[i].run->immediate_exit = 0;   /* as Python's threads expect to find it */
    if (g_uart.ring == &g_early_ring) {   /* (each thread drained it as it left) */
        g_early_zone = g_early_ring.registered == 1;
        g_early_drained = g_early_ring.drained;
    } else {
        g_early_zone = -1;
    }
    for (int i = 0; i < count && i < n; i++) {
        pending[i] = g_ev[i].pending;
        entered_ns[i] = g_ev[i].entered_ns;
    }
    g_early_n = 0;
    g_reap = count;
    return count;
}

int pyvmm_early_uart_zone(uint64_t *drained)
{
    *drained = g_early_drained;
    return g_early_zone;
}

void pyvmm_early_reap(void)
{
    if (!g_reap)
        return;
    for (int i = 0; i < g_reap; i++)
        if (!g_ev[i].joined)
            pthread_join(g_ev[i].thread, NULL);
    g_reap = 0;
    early_release();
}

static void *prebuild_thread(void *arg)
{
    (void)arg;
    pyvmm_prebuild_run(&g_spec, &g_built);
    if (g_early_read_err)
        early_fail(g_early_read_step, g_early_read_err);
    if (g_early) {
        if (g_built.status == 1)
            early_start();
        if (g_built.early != 1)
            early_release();
    }
    int run0 = g_built.early == 1;   /* (g_built is Python's once g_done is set) */
    pthread_mutex_lock(&g_lock);
    g_done = 1;
    pthread_cond_broadcast(&g_cond);
    pthread_mutex_unlock(&g_lock);
    if (run0)   /* this thread is vCPU 0's early thread now, joined by pyvmm_early_stop */
        pyvmm_early_run0();
    return NULL;
}

/* With an early block, Python's start waits until the builder has the guest
 * running (or gave up): the build waits on kernel threads (kthreadd for the PIT's
 * worker, workqueues for SRCU), and a kernel thread woken onto the CPU where
 * Python's start runs at the same priority waited there for a scheduler tick
 * (~4 ms, HZ=250) in a quarter of the updates traced here, the other CPU idle.
 * Python's start is not downtime once the guest runs; the build is.  Bounded, so
 * a stuck build only delays Python, which then joins the builder as before. */
static void wait_for_the_guest(void)
{
    struct timespec until;

    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_nsec += 200 * 1000000L;   /* the build and restore take ~1 ms */
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&g_lock);
    while (!g_done)
        if (pthread_cond_timedwait(&g_cond, &g_lock, &until) != 0)
            break;
    pthread_mutex_unlock(&g_lock);
}

static void prebuild_start(void);

/* Python's start, woken by the builder (now vCPU 0's early thread), would land on
 * that thread's CPU (this kernel wakes a thread onto the waker's CPU) and share it
 * with the guest until the next load balance, a tick later: in traced cpr-execs
 * the guest's tick after the switch then took ~5 ms more than the downtime, the
 * other CPU idle.  A moment's affinity without that CPU moves it off (the
 * kernel migrates a thread whose CPU leaves its mask); the old mask goes back
 * at once and leaves it where it is. */
static void move_off_vcpu0(void)
{
    cpu_set_t all, other;
    int cpu = g_vcpu0_cpu;

    if (cpu < 0 || cpu >= CPU_SETSIZE || sched_getaffinity(0, sizeof(all), &all) < 0 ||
        !CPU_ISSET(cpu, &all) || CPU_COUNT(&all) < 2)
        return;
    other = all;
    CPU_CLR(cpu, &other);
    if (sched_setaffinity(0, sizeof(other), &other) == 0)
        sched_setaffinity(0, sizeof(all), &all);
}

/* Runs when the dynamic loader maps this library: before main() in the launcher
 * or in LD_PRELOAD, at import time otherwise (then the variables are not set).
 * The old image raised the exec'ing thread to the vCPU threads' nice for the exec
 * (vmm/cpr/source.py) and names the nice it had before: this thread and the builder
 * it starts run ahead of whatever the exec wakes (the QMP client whose connection
 * the exec closed took the CPU from the new image for ~2 ms in traced updates, the
 * other CPU idle).  Python's main thread gets its old nice back here, once the
 * guest runs (or the build gave up); the builder keeps the vCPU threads' nice. */
__attribute__((constructor)) static void pyvmm_prebuild_start(void)
{
    const char *v = getenv("PYVMM_CPR_NICE_WAS");
    char *end;
    long was;

    if (!v) {
        prebuild_start();
        return;
    }
    errno = 0;
    was = strtol(v, &end, 10);
    int ok = !errno && !*end && end != v && was >= -20 && was <= 19;
    unsetenv("PYVMM_CPR_NICE_WAS");
    prebuild_start();
    if (ok)
        setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), (int)was);
}

static void prebuild_start(void)
{
    char buf[32], was[4096];
    const char *v = getenv("PYVMM_CPR_PREBUILD");
    const char *w;
    char *end;
    long fd;
    sigset_t all, old;

    if (!v)
        return;
    g_built.kvm_fd = g_built.vm.vm_fd = -1;   /* a failure below must not name fd 0 */
    snprintf(buf, sizeof(buf), "%s", v);
    /* Set (empty if there was none) when the old image put us in LD_PRELOAD; not
     * set when it exec'd the launcher (csrc/cpr_launch.c), which leaves LD_PRELOAD be. */
    w = getenv("PYVMM_CPR_PRELOAD_WAS");
    if (w)
        snprintf(was, sizeof(was), "%s", w);
    unsetenv("PYVMM_CPR_PREBUILD");
    unsetenv("PYVMM_CPR_PRELOAD_WAS");
    if (w && *was)
        setenv("LD_PRELOAD", was, 1);
    else if (w)
        unsetenv("LD_PRELOAD");

    errno = 0;
    fd = strtol(buf, &end, 10);
    if (errno || *end || end == buf || fd < 0 || fd > 1 << 20) {
        fail(&g_built, "read PYVMM_CPR_PREBUILD", EINVAL);
        return;
    }
    ssize_t n = pread((int)fd, &g_spec, sizeof(g_spec), 0);
    int err = errno;
    struct stat st;
    if (n == (ssize_t)sizeof(g_spec) && fstat((int)fd, &st) == 0 &&
        (size_t)st.st_size > sizeof(g_spec)) {   /* an early block follows the spec */
        size_t len = (size_t)st.st_size - sizeof(g_spec);
        g_early_read_step = "read the early state";
        if (len > EARLY_MAX_SIZE) {
            g_early_read_step = "check the early state's size";
            g_early_read_err = EFBIG;
        } else if ((g_early = malloc(len)) == NULL) {
            g_early_read_err = ENOMEM;
        } else if (pread((int)fd, g_early, len, sizeof(g_spec)) == (ssize_t)len) {
            g_early_len = len;
        } else {
            free(g_early);
            g_early = NULL;
            g_early_read_err = EIO;
        }
    }
    close((int)fd);
    if (n != (ssize_t)sizeof(g_spec)) {
        fail(&g_built, "read the prebuild request", n < 0 ? err : EINVAL);
        return;
    }
    /* The builder never handles a signal: Python's handlers expect its own threads. */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    if (pthread_create(&g_thread, NULL, prebuild_thread, NULL) == 0)
        g_running = 1;
    else
        fail(&g_built, "start the builder thread", EAGAIN);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (g_running && g_early) {
        wait_for_the_guest();
        move_off_vcpu0();
    }
}

/* Wait for the builder and take its result (once: later calls return 0). */
int pyvmm_prebuilt_wait(struct pyvmm_prebuilt *out)
{
    if (g_running) {
        pthread_mutex_lock(&g_lock);
        while (!g_done)
            pthread_cond_wait(&g_cond, &g_lock);
        pthread_mutex_unlock(&g_lock);
        if (g_built.early != 1)   /* else it runs vCPU 0 until pyvmm_early_stop joins it */
            pthread_join(g_thread, NULL);
        g_running = 0;
    }
    *out = g_built;
    memset(&g_built, 0, sizeof(g_built));
    return out->status;
}

/* -- the holder ------------------------------------------------------------- */

#define HOLDER_STACK (64 * 1024)
#define HOLDER_MAX_FDS (PYVMM_VM_MAX_VCPUS + 8)

struct holder_arg {
    int rfd;
    int nkeep;
    int keep[HOLDER_MAX_FDS + 1];   /* ascending, rfd included */
};

static long raw_syscall3(long n, long a, long b, long c)
{
    long ret;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c)
                     : "rcx", "r11", "memory");
    return ret;
}

static int holder_main(void *p)
{
    struct holder_arg *a = p;
    static const char name[16] = "pyvmm-holder";
    char c;
    unsigned int next = 0;
    long r;

    raw_syscall3(SYS_prctl, PR_SET_NAME, (long)name, 0);
    for (int i = 0; i < a->nkeep; i++) {   /* keep only our fds and the pipe */
        unsigned int k = (unsigned int)a->keep[i];
        if (k > next)
            raw_syscall3(SYS_close_range, next, k - 1, 0);
        next = k + 1;
    }
    raw_syscall3(SYS_close_range, next, ~0u, 0);
    raw_syscall3(SYS_setpriority, PRIO_PROCESS, 0, 19);
    for (;;) {
        r = raw_syscall3(SYS_read, a->rfd, (long)&c, 1);
        if (r == -EINTR || r > 0)
            continue;
        break;   /* EOF: the new image (or this process's death) lets us go */
    }
    raw_syscall3(SYS_exit, 0, 0, 0);
    return 0;
}

static int cmp_int(const void *x, const void *y)
{
    int a = *(const int *)x, b = *(const int *)y;
    return (a > b) - (a < b);
}

int pyvmm_holder_start(const int *fds, int nfds, struct pyvmm_holder *out)
{
    int p[2], pid, err;
    sigset_t all, old;

    memset(out, 0, sizeof(*out));
    out->pid = -1;
    out->wfd = -1;
    if (nfds < 0 || nfds > HOLDER_MAX_FDS)
        return -EINVAL;
    for (int i = 0; i < nfds; i++)
        if (fds[i] < 0)
            return -EBADF;
    if (pipe2(p, O_CLOEXEC) < 0)
        return -errno;
    void *stack = mmap(NULL, HOLDER_STACK, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (stack == MAP_FAILED) {
        err = errno;
        close(p[0]);
        close(p[1]);
        return -err;
    }
    struct holder_arg *a = stack;   /* at the bottom; the stack grows down from the top */
    a->rfd = p[0];
    a->nkeep = nfds + 1;
    memcpy(a->keep, fds, (size_t)nfds * sizeof(int));
    a->keep[nfds] = p[0];
    qsort(a->keep, (size_t)a->nkeep, sizeof(int), cmp_int);

    /* Born with every signal blocked: a handler of ours must never run on its stack. */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    pid = clone(holder_main, (char *)stack + HOLDER_STACK, CLONE_VM | SIGCHLD, a);
    err = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    close(p[0]);
    if (pid < 0) {
        close(p[1]);
        munmap(stack, HOLDER_STACK);
        return -err;
    }
    out->pid = pid;
    out->wfd = p[1];
    out->stack = (uintptr_t)stack;
    out->stack_size = HOLDER_STACK;
    return pid;
}

/* Free the holder's stack once it has exited (it was never exec'd away from us). */
void pyvmm_holder_free(struct pyvmm_holder *h)
{
    if (h->stack) {
        munmap((void *)(uintptr_t)h->stack, h->stack_size);
        h->stack = 0;
    }
}
