/* The vCPU thread's C side, compiled into vmm.kvm._kvm (see csrc/vcpu_run.c).
 * This header is the contract: vmm/kvm/_build.py reads its declarations into
 * the cffi cdef (vmm/cffi_header.py), so nothing here is declared twice. */
#ifndef PYVMM_VCPU_RUN_H
#define PYVMM_VCPU_RUN_H

#include <stdint.h>
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

/* The gate a parked vCPU thread waits at, without the GIL (vmm/cpu.py, VcpuThread).
 * A resume wakes every vCPU thread; each one waking in Python had to take the
 * GIL in turn before it could go back into KVM_RUN (~40 us a vCPU on an idle
 * host, milliseconds for 4-8 vCPUs on a loaded one).  At the gate the thread
 * waits on a futex and goes straight from the wake-up into KVM_RUN, all in C.
 * Python closes `open` (under the thread's lock) before the thread parks, and
 * sets it to PYVMM_GATE_RUN or PYVMM_GATE_STOP, then rings `bell`: the futex
 * word every gate of a machine shares, so that one FUTEX_WAKE wakes all its
 * vCPU threads at once (woken one by one, the first vCPU back in the guest
 * could preempt the thread still waking the others, for milliseconds on a
 * loaded host).  `entered` (a futex word too) is set to 1, and `entered_ns`
 * (CLOCK_MONOTONIC) written, when the thread passes an open gate on its way
 * into KVM_RUN. */
struct pyvmm_vcpu_gate {
    uint32_t open;
    uint32_t entered;
    int64_t entered_ns;
    uint32_t *bell;
};
#define PYVMM_GATE_CLOSED 0
#define PYVMM_GATE_RUN 1
#define PYVMM_GATE_STOP 2

/* Wait until the gate opens (a kick meanwhile is ignored); for RUN, stamp
 * `entered`, then pyvmm_vcpu_run (its result); for STOP, -ECANCELED without
 * entering the guest. */
int pyvmm_vcpu_gate_run(struct pyvmm_vcpu_gate *g, int fd, struct kvm_run *run,
                        struct pyvmm_uart_fast *uart);

/* Wake every thread waiting on `bell` (each looks at its own gate). */
void pyvmm_vcpu_gate_ring(uint32_t *bell);

/* Wait up to timeout_ns until `entered` is set; returns entered_ns (then > 0),
 * or 0 on timeout. */
int64_t pyvmm_vcpu_gate_wait_entered(struct pyvmm_vcpu_gate *g, int64_t timeout_ns);

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
