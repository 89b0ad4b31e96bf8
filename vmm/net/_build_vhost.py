"""cffi build script for the vhost-net ioctls (API mode, compiled against <linux/vhost.h>).

cffi checks every struct field below against the real header at build time,
so backend_vhost.py's layouts and ioctl numbers cannot drift from the kernel's.

Build in place with `python3 vmm/net/_build_vhost.py` (any working directory);
setup.py builds it as "vmm/net/_build_vhost.py:ffibuilder".
"""

import os

import cffi

ffibuilder = cffi.FFI()

CONSTANTS = """
VHOST_GET_FEATURES VHOST_SET_FEATURES VHOST_SET_OWNER VHOST_RESET_OWNER
VHOST_SET_MEM_TABLE VHOST_SET_VRING_NUM VHOST_SET_VRING_ADDR VHOST_SET_VRING_BASE
VHOST_GET_VRING_BASE VHOST_SET_VRING_KICK VHOST_SET_VRING_CALL VHOST_SET_VRING_ERR
VHOST_NET_SET_BACKEND VHOST_NET_F_VIRTIO_NET_HDR VHOST_FILE_UNBIND
""".split()

ffibuilder.cdef("""
typedef unsigned long long __u64;
typedef unsigned int __u32;

struct vhost_vring_state { unsigned int index; unsigned int num; };
struct vhost_vring_file { unsigned int index; int fd; };
struct vhost_vring_addr {
    unsigned int index; unsigned int flags;
    __u64 desc_user_addr; __u64 used_user_addr; __u64 avail_user_addr; __u64 log_guest_addr;
};
struct vhost_memory_region {
    __u64 guest_phys_addr; __u64 memory_size; __u64 userspace_addr; __u64 flags_padding;
};
struct vhost_memory { __u32 nregions; __u32 padding; struct vhost_memory_region regions[]; };
""" + "".join(f"#define {name} ...\n" for name in CONSTANTS))

ffibuilder.set_source(
    "vmm.net._vhost",
    r"""
#include <sys/ioctl.h>
#include <linux/vhost.h>
""",
)

if __name__ == "__main__":
    # tmpdir is the repository root, so the module lands in vmm/net/ whatever the cwd.
    ffibuilder.compile(tmpdir=os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), verbose=False)
