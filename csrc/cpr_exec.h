/* C helpers for cpr-exec, compiled into vmm.kvm._kvm (see csrc/cpr_exec.c). */
#ifndef PYVMM_CPR_EXEC_H
#define PYVMM_CPR_EXEC_H

#include <stdint.h>

#include "build_vm.h"

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
};

int pyvmm_prebuild_spec_valid(const struct pyvmm_prebuild_spec *spec);
int pyvmm_prebuilt_wait(struct pyvmm_prebuilt *out);
int pyvmm_prebuild_run(const struct pyvmm_prebuild_spec *spec, struct pyvmm_prebuilt *out);

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
