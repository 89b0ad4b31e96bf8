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
    struct pyvmm_uart_ring *ring; /* THR writes KVM queued without an exit, or NULL */
};

/* Coalesced PIO for the THR (KVM_CAP_COALESCED_PIO): while the fast path is on,
 * KVM appends each byte the guest writes to THR to the VM's coalesced ring (a
 * page of every vCPU's kvm_run mapping) and goes back into the guest at once,
 * with no exit to this process; the bytes are written out, in order, the next
 * time any vCPU loop returns from KVM_RUN (the guest's next LSR poll, at the
 * latest when its console write waits for the transmitter to empty) or before
 * Python touches the UART.  The zone is registered by the vCPU loop itself, at
 * the first THR write it serves while `enabled` (~15 us), and only once
 * vmm/devices/serial.py has given the machine's ring to `uart` (when the
 * machine's own vCPU threads run; cpr-transfer's early-start threads get the new
 * machine's ring from the handoff and drain it too; the cpr-exec prebuilder's
 * threads, which run before there is a machine, use a ring of their own on the
 * same page and hand their registration over, csrc/cpr_exec.c);
 * Python unregisters it when `enabled` goes off (DLAB, loopback, THR
 * interrupts: KVM then waits for an SRCU grace period, ~8 ms here, so a guest
 * that sets its UART up before it prints never pays it). */
struct pyvmm_uart_ring {
    void *page;                   /* struct kvm_coalesced_mmio_ring, in a vCPU's mmap */
    unsigned int max;             /* its entries (KVM_COALESCED_MMIO_MAX) */
    int lock;                     /* held while bytes leave the ring, or the zone changes */
    int registered;               /* the THR port is a coalesced zone now */
    int vm_fd;                    /* the VM the zone is registered with */
    unsigned long long drained;   /* bytes written from the ring (tests count them) */
};

/* Point `ring` at VM `vm_fd`'s coalesced ring: page `page_offset` (what
 * KVM_CHECK_EXTENSION(KVM_CAP_COALESCED_MMIO) returns) of a vCPU's kvm_run
 * mapping `run`, `map_size` bytes long.  0, or -EINVAL if it lies outside. */
int pyvmm_uart_ring_init(struct pyvmm_uart_ring *ring, int vm_fd, void *run,
                         unsigned long map_size, int page_offset);

/* Unregister the THR's coalesced zone if it is registered (Python, as `enabled`
 * goes off, after clearing it): 0, or -errno. */
int pyvmm_uart_uncoalesce(struct pyvmm_uart_fast *uart);

/* Write out what the ring holds, in order, to uart->out_fd: the bytes written, or
 * -errno (what was not written stays queued). */
int pyvmm_uart_drain(struct pyvmm_uart_fast *uart);

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

/* Run the calling vCPU thread ahead of the VMM's other threads (nice -5, where
 * allowed: CAP_SYS_NICE; 0 or -errno).  On two CPUs the VMMs' own Python work
 * around a live update (the new VMM's restore and take-over, the old one's
 * wind-down, a QMP client) otherwise takes the CPU from a vCPU that wants it:
 * 2.5-4.7 ms stalls of a 1 ms heartbeat right after cpr-transfers, gone at -5.
 * The early-start threads (csrc/cpr_exec.c) run at the same level. */
int pyvmm_vcpu_thread_nice(void);

/* Name the calling OS thread (visible in ps, top and /proc/PID/task/TID/comm). */
int pyvmm_set_thread_name(const char *name);

#endif
