/* C helpers for cpr-exec, compiled into vmm.kvm._kvm (see csrc/cpr_exec.c). */
#ifndef PYVMM_CPR_EXEC_H
#define PYVMM_CPR_EXEC_H

#include <stddef.h>
#include <stdint.h>
#include <linux/kvm.h>

#include "build_vm.h"
#include "vcpu_run.h"

#define PYVMM_PREBUILD_MAGIC 0x42505650u   /* "PVPB" */
#define PYVMM_PREBUILD_VERSION 2u

/* What the old image asks the new one to build before Python starts, written
 * into a memfd whose number is in PYVMM_CPR_PREBUILD: the RAM memfd and the
 * layout pyvmm_build_vm (csrc/build_vm.h) takes. */
struct pyvmm_prebuild_spec {
    uint32_t magic;
    uint32_t version;
    int32_t ram_fd;
    uint32_t pad;
    uint64_t ram_size;
    struct pyvmm_vm_layout layout;
};

/* The early start: the saved kernel state, in the memfd right after the spec
 * (written by the old image after its save, when the guest was running).  The
 * block is a header, a struct pyvmm_vm_state, then for each vCPU a struct
 * pyvmm_vcpu_state (restore order and MSRs filled as vmm/kvm/vcpu.py's
 * set_state fills it) and its CPUID.  The prebuilder restores it and runs the
 * vCPUs in C before Python starts (csrc/cpr_exec.c). */
#define PYVMM_EARLY_MAGIC 0x45505650u      /* "PVPE" */
#define PYVMM_EARLY_VERSION 1u
#define PYVMM_EARLY_MAX_CPUID 256
#define PYVMM_EARLY_UART 1u                /* flag: serve the UART fast path early */

/* struct kvm_cpuid2 with room for its entries (the same layout). */
struct pyvmm_early_cpuid {
    uint32_t nent;
    uint32_t pad;
    struct kvm_cpuid_entry2 entries[PYVMM_EARLY_MAX_CPUID];
};

struct pyvmm_early_header {
    uint32_t magic;
    uint32_t version;
    uint32_t nvcpus;
    uint32_t flags;
    uint32_t header_size;  /* the sizeofs of the four structs: a build with other */
    uint32_t vm_size;      /* kernel headers is refused, not misread */
    uint32_t vcpu_size;
    uint32_t cpuid_size;
    int64_t save_ns;       /* CLOCK_MONOTONIC at the save (the TSC moves on from it) */
    uint64_t tsc_khz;
    int32_t uart_fd;       /* the console: stdout or stderr, inherited */
    uint16_t uart_base;
    uint8_t uart_lsr;
    uint8_t pad;
};

/* Whether `len` bytes at `buf` are an early block for `nvcpus` vCPUs that the
 * prebuilder may act on (csrc/fuzz/fuzz_prebuild.c checks this claim too). */
int pyvmm_early_valid(const void *buf, size_t len, uint32_t nvcpus);

/* Write an early block (checked with pyvmm_early_valid first) into a VM that has
 * not run: its CPUID when `set_cpuid`, the VM's state, then each vCPU's, with one
 * TSC value for all of them moved on by the time since the save (the TSC entries
 * of `block` are rewritten).  The cpr-exec prebuilder's early start and
 * cpr-transfer's handoff (csrc/handoff.c) both restore this way.  0, or -errno
 * with `step` naming what failed. */
int pyvmm_early_apply(void *block, size_t len, int vm_fd, const int *vcpu_fds, uint32_t n,
                      int set_cpuid, char *step, size_t step_size);

/* Run a VM's vCPUs in the C loop (csrc/vcpu_run.c), its state written: vCPUs
 * 1..n-1 on threads of their own, all in the guest when this returns 0; then
 * the caller runs vCPU 0 on its own thread with pyvmm_early_run0().  What the
 * loop cannot serve ends a thread with the exit left in kvm_run;
 * pyvmm_early_stop() stops and joins them all.  `uart`: the console the UART
 * fast path may serve meanwhile (NULL or not enabled: none).  t_entered: when
 * the last vCPU went in (CLOCK_MONOTONIC ns).  0, or -errno with `step` naming
 * what failed (nothing runs then).  One early start per process at a time: the
 * cpr-exec prebuilder's, or cpr-transfer's (csrc/handoff.c). */
int pyvmm_early_go(int kvm_fd, const int *vcpu_fds, uint32_t n,
                   const struct pyvmm_uart_fast *uart, char *step, size_t step_size,
                   int64_t *t_entered);

/* Make vCPU threads 1..n-1 ahead, waiting for pyvmm_early_go() (cpr-transfer's
 * handoff does it before the stop); pyvmm_early_unprepare() lets them go unused.
 * 0 or -errno (then none is left). */
int pyvmm_early_prepare(uint32_t n);
void pyvmm_early_unprepare(void);

/* vCPU 0's early run, on the thread that called pyvmm_early_go(); returns when
 * pyvmm_early_stop() stops it (or at an exit for Python). */
void pyvmm_early_run0(void);

/* What the builder made: fds the Python side adopts, or why it gave up
 * (vm.step names the failed step). */
struct pyvmm_prebuilt {
    int32_t status;        /* 0: nothing was asked; 1: built; < 0: -errno of the failed step */
    int32_t kvm_fd;
    uint64_t ram_addr;
    uint64_t ram_size;
    int64_t t_start_ns;    /* CLOCK_MONOTONIC: when the builder started and finished */
    int64_t t_done_ns;
    struct pyvmm_vm_fds vm;
    int32_t early;         /* 0: no early state; 1: restored, vCPUs running; < 0: -errno */
    int32_t early_pad;
    int64_t t_early_ns;    /* when the last early vCPU thread went into the guest */
    uint64_t tsc_khz;      /* the saved guest TSC frequency (Python asks no vCPU ioctl) */
    char early_step[48];   /* the early step that failed or refused */
};

int pyvmm_prebuild_spec_valid(const struct pyvmm_prebuild_spec *spec);
int pyvmm_prebuilt_wait(struct pyvmm_prebuilt *out);
int pyvmm_prebuild_run(const struct pyvmm_prebuild_spec *spec, struct pyvmm_prebuilt *out);

/* Stop the early vCPU threads (immediate_exit and a kick), wait until each has
 * left its vCPU (pyvmm_early_reap() joins them later).  For
 * each vCPU, pending[i] is the exit reason its thread left in kvm_run for
 * Python to complete (0: none) and entered_ns[i] when it went into the guest.
 * Returns how many threads there were (0: no early start). */
int pyvmm_early_stop(int32_t *pending, int64_t *entered_ns, int n);

/* Join the threads pyvmm_early_stop() stopped and release what they used (it
 * leaves that for after the guest runs again: it is not part of the pause).
 * Safe to call any time, and twice. */
void pyvmm_early_reap(void);

/* After pyvmm_early_stop(): whether the cpr-exec prebuilder's threads left the
 * UART's THR registered as a coalesced zone on their own ring (1; 0: they had
 * the ring but registered nothing, the machine's ring then registers it when its
 * vCPU threads first need it; -1: they had no ring of their own), and how many
 * console bytes left through that ring. */
int pyvmm_early_uart_zone(uint64_t *drained);

/* The holder: a child that shares our address space (CLONE_VM) and holds the
 * old VM's fds, so that neither the old page tables nor the old KVM VM are
 * torn down inside execve.  It exits when the pipe it reads is closed. */
struct pyvmm_holder {
    int32_t pid;
    int32_t wfd;           /* close it (or exit) to let the holder go */
    uint64_t stack;        /* the child's stack, freed by pyvmm_holder_free */
    uint64_t stack_size;
};

int pyvmm_holder_start(const int *fds, int nfds, struct pyvmm_holder *out);
void pyvmm_holder_free(struct pyvmm_holder *h);

#endif
