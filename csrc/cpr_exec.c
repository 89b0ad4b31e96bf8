/*
 * cpr-exec helpers, compiled into vmm.kvm._kvm.
 *
 * 1. The prebuilder.  After a cpr-exec the new image must create a KVM VM
 *    and its memory slots before the guest can run (a VM fd works only in the
 *    address space that made it).  Python needs ~10 ms to start; the slots
 *    cost ~0.35 ms per GiB here.  So the old image execs Python with this
 *    module in LD_PRELOAD and PYVMM_CPR_PREBUILD naming a memfd that holds a
 *    struct pyvmm_prebuild_spec.  The constructor below runs before Python's
 *    main(), starts a thread that opens /dev/kvm, maps RAM and builds the VM
 *    (pyvmm_build_vm, csrc/build_vm.c: the slots, the irqchip, the PIT and the
 *    vCPUs, as the normal boot builds them), while the main thread starts
 *    Python.  When pyvmm's resume path imports this module, the dynamic
 *    loader hands back the object already loaded, and pyvmm_prebuilt_wait()
 *    joins the thread and gives the fds to Python.  The constructor removes
 *    both variables from the environment, so nothing the new image starts
 *    inherits them.
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

static void *prebuild_thread(void *arg)
{
    (void)arg;
    pyvmm_prebuild_run(&g_spec, &g_built);
    return NULL;
}

/* Runs when the dynamic loader maps this module: before Python's main() when it
 * is in LD_PRELOAD, at import time otherwise (then the variable is not set). */
__attribute__((constructor)) static void pyvmm_prebuild_start(void)
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
    w = getenv("PYVMM_CPR_PRELOAD_WAS");
    if (w)
        snprintf(was, sizeof(was), "%s", w);
    unsetenv("PYVMM_CPR_PREBUILD");
    unsetenv("PYVMM_CPR_PRELOAD_WAS");
    if (w)
        setenv("LD_PRELOAD", was, 1);
    else
        unsetenv("LD_PRELOAD");

    errno = 0;
    fd = strtol(buf, &end, 10);
    if (errno || *end || end == buf || fd < 0 || fd > 1 << 20) {
        fail(&g_built, "read PYVMM_CPR_PREBUILD", EINVAL);
        return;
    }
    ssize_t n = pread((int)fd, &g_spec, sizeof(g_spec), 0);
    int err = errno;
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
}

/* Wait for the builder and take its result (once: later calls return 0). */
int pyvmm_prebuilt_wait(struct pyvmm_prebuilt *out)
{
    if (g_running) {
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
