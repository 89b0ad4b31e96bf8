/*
 * The vCPU thread's C side, compiled into vmm.kvm._kvm: the KVM_RUN loop with
 * the UART fast path, the kick that interrupts it, and small wrappers that
 * return -errno.  vmm/cpu.py (VcpuThread) calls them; the contract is
 * csrc/vcpu_run.h.
 *
 * pyvmm_kick_thread and pyvmm_set_thread_name exist so that the cpr-exec
 * critical path never imports Python's signal module (and enum) to do either.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
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

int pyvmm_kick_thread(unsigned long thread, int signo)
{
    return -pthread_kill((pthread_t)thread, signo);
}

int pyvmm_set_thread_name(const char *name)
{
    return prctl(PR_SET_NAME, (unsigned long)name, 0, 0, 0) < 0 ? -errno : 0;
}

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
    } else if (run->io.port == u->base + 5 && run->io.direction == KVM_EXIT_IO_IN) {
        *data = u->lsr;
    } else {
        return 0;
    }
    u->handled++;
    return 1;
}

int pyvmm_vcpu_run(int fd, struct kvm_run *run, struct pyvmm_uart_fast *uart)
{
    for (;;) {
        if (ioctl(fd, KVM_RUN, 0) < 0)
            return -errno;
        if (run->exit_reason != KVM_EXIT_IO || !uart_exit(run, uart))
            return (int)run->exit_reason;
    }
}
