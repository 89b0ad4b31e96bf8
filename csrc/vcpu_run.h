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

/* The gate a vCPU thread parks at while its machine is paused, in C and without
 * the GIL: a kicked thread parks the moment KVM_RUN returns (no Python between
 * the kick and "paused"), and on resume goes straight back into the guest (no
 * Python, no GIL, between "go" and KVM_RUN: N vCPUs re-enter in parallel).  The
 * controlling thread (vmm/cpu.py, VcpuThread) sets `want` and waits in C too.
 * All fields are accessed atomically; `want`, `parked` and `entered` are also
 * futex words. */
#define PYVMM_GATE_PAUSE 1
#define PYVMM_GATE_STOP 2
#define PYVMM_GATE_RUNNING 0	/* parked: the thread is not at the gate */
#define PYVMM_GATE_PARKED 1	/* parked: it waits at the gate, its last exit completed */
#define PYVMM_GATE_GONE 2	/* parked: the thread has ended */

struct pyvmm_vcpu_gate {
    unsigned int want;          /* PYVMM_GATE_PAUSE | PYVMM_GATE_STOP, set by the controller */
    unsigned int parked;        /* PYVMM_GATE_RUNNING, _PARKED or _GONE */
    unsigned int entered;       /* bumped each time the thread leaves the gate for the guest */
    unsigned int pad;
    long long entered_ns;       /* CLOCK_MONOTONIC when it last did */
};

/* KVM_RUN until an exit the UART fast path does not take: returns the exit
 * reason, or -errno (-EINTR when kicked).  `uart` and `gate` may be NULL; with
 * a gate, a kick that asks for a pause parks the thread here (the interrupted
 * KVM_RUN left nothing half done) and, once released, it runs on; it returns
 * -EINTR when the gate says stop. */
int pyvmm_vcpu_run(int fd, struct kvm_run *run, struct pyvmm_uart_fast *uart,
                   struct pyvmm_vcpu_gate *gate);

/* The vCPU thread: wait at the gate while it says pause (parked = PARKED
 * meanwhile), then stamp the entry and return 0 to run the guest, or 1 when
 * the gate says stop.  It clears run->immediate_exit before it looks at `want`
 * for the last time, so that a pause asked while it leaves still ends the next
 * KVM_RUN at once. */
int pyvmm_gate_park(struct pyvmm_vcpu_gate *gate, struct kvm_run *run);

/* The vCPU thread, as it ends: parked = GONE (waiters wake). */
void pyvmm_gate_gone(struct pyvmm_vcpu_gate *gate);

/* The controller: set or clear `want` bits (a parked thread wakes to look). */
void pyvmm_gate_set(struct pyvmm_vcpu_gate *gate, unsigned int bits);
void pyvmm_gate_clear(struct pyvmm_vcpu_gate *gate, unsigned int bits);

/* The controller: out of KVM_RUN (immediate_exit, then the kick signal to
 * `thread`, a pthread_t); the caller makes sure the thread has not ended. */
int pyvmm_gate_kick(struct kvm_run *run, unsigned long thread, int signo);

/* The controller: until parked is no longer RUNNING (0), or -ETIMEDOUT; it spins
 * for the first 0.3 ms (a kicked vCPU parks sooner than a sleeper wakes). */
int pyvmm_gate_wait_parked(struct pyvmm_vcpu_gate *gate, int timeout_ms);

/* The controller: until `entered` differs from `since` (0), or -ETIMEDOUT. */
int pyvmm_gate_wait_entered(struct pyvmm_vcpu_gate *gate, unsigned int since,
                            int timeout_ms);

/* ioctl wrappers that return -errno, so callers never race on a global errno. */
int pyvmm_ioctl(int fd, unsigned long request, void *arg);
int pyvmm_ioctl_int(int fd, unsigned long request, unsigned long arg);

/* The kick: an empty C handler for `signo` (no SA_RESTART), so KVM_RUN returns
 * -EINTR and Python's own signal machinery is never involved on a vCPU thread
 * (the kick itself is pyvmm_gate_kick, above). */
int pyvmm_install_kick_handler(int signo);

/* Name the calling OS thread (visible in ps, top and /proc/PID/task/TID/comm). */
int pyvmm_set_thread_name(const char *name);

#endif
