/*
 * pyvmm-cpr-exec: what a cpr-exec execs when this Python keeps its interpreter
 * in a shared libpython (vmm/cpr/prebuild.py decides; argv is the resume
 * command's, unchanged).
 *
 * Exec'ing python itself with libpyvmm_kvm.so in LD_PRELOAD starts the
 * prebuilder only once the dynamic loader has mapped and relocated libpython
 * (23 MB and ~36 000 relocations for pyenv's 3.11 here): its constructor ran
 * ~2.4 ms after execve, against ~1.1 ms for a program as small as this one, and
 * all of it is guest downtime.  This program needs only libc and
 * libpyvmm_kvm.so, whose constructor (csrc/cpr_exec.c) starts the build and,
 * with an early block, waits until the guest runs.  Then main() loads libpython
 * and hands argv to Python's own main: argv[0] is the python that the resume
 * command names (a venv's), so Python finds its prefix and the venv exactly as
 * it would have, and imports of vmm.kvm._kvm get the libpyvmm_kvm.so already
 * loaded, with the prebuilder's state in it.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LIBPYTHON_ENV "PYVMM_CPR_LIBPYTHON"

int main(int argc, char **argv)
{
    const char *v = getenv(LIBPYTHON_ENV);
    char path[4096];
    void *lib;
    int (*py_main)(int, char **);

    if (!v || !*v || strlen(v) >= sizeof(path) || argc < 1) {
        fprintf(stderr, "pyvmm-cpr-exec: run by a cpr-exec only (%s names libpython)\n",
                LIBPYTHON_ENV);
        return 127;
    }
    strcpy(path, v);
    unsetenv(LIBPYTHON_ENV);
    /* RTLD_GLOBAL: extension modules find Python's symbols in it, as they would in
     * a python that has libpython as a needed library. */
    lib = dlopen(path, RTLD_LAZY | RTLD_GLOBAL);
    if (!lib) {
        fprintf(stderr, "pyvmm-cpr-exec: cannot load %s: %s\n", path, dlerror());
        return 127;
    }
    *(void **)&py_main = dlsym(lib, "Py_BytesMain");
    if (!py_main) {
        fprintf(stderr, "pyvmm-cpr-exec: %s has no Py_BytesMain\n", path);
        return 127;
    }
    return py_main(argc, argv);
}
