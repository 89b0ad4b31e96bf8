/* The vCPU thread's C side, compiled into vmm.kvm._kvm (see csrc/vcpu_run.c).
 * This header is the contract: vmm/kvm/_build.py reads its declarations into
 * the cffi cdef (vmm/cffi_header.py), so nothing here is declared twice. */
#ifndef PYVMM_VCPU_RUN_H
#define PYVMM_VCPU_RUN_H

#include <linux/kvm.h>

/* The 16550A UART's two hot registers, handled without Python (and without the
 * GIL): a console byte costs two VM exits (poll LSR, write THR), each of which
 * would otherwise go through the Python loop.  vmm/devices/serial.py
 * (Serial16550._publish) sets `enabled` only while the model says the
 * registers have no side effect: DLAB clear, no loopback, no THR-empty
 * interrupt, no error bits in LSR, output to a file descriptor.  Everything
 * else returns to Python, as does a write that fails (Python redoes it and
 * reports the error). */
struct pyvmm_uart_fast {
    volatile int enabled;
    int out_fd;
    unsigned short base;
    volatile unsigned char lsr;
    unsigned long long handled;   /* exits taken here (tests count them) */
};

/* KVM_RUN until an exit the UART fast path does not take: returns the exit
 * reason, or -errno (-EINTR when kicked).  `uart` may be NULL. */
int pyvmm_vcpu_run(int fd, struct kvm_run *run, struct pyvmm_uart_fast *uart);

/* ioctl wrappers that return -errno, so callers never race on a global errno. */
int pyvmm_ioctl(int fd, unsigned long request, void *arg);
int pyvmm_ioctl_int(int fd, unsigned long request, unsigned long arg);

/* The kick: an empty C handler for `signo` (no SA_RESTART), so KVM_RUN returns
 * -EINTR and Python's own signal machinery is never involved on a vCPU thread;
 * pyvmm_kick_thread is pthread_kill (`thread` is threading.get_ident()). */
int pyvmm_install_kick_handler(int signo);
int pyvmm_kick_thread(unsigned long thread, int signo);

/* Name the calling OS thread (visible in ps, top and /proc/PID/task/TID/comm). */
int pyvmm_set_thread_name(const char *name);

#endif
