"""cffi build script for the tap ioctls (API mode, compiled against <linux/if_tun.h>).

The numbers come from the real headers at build time, so tap.py never carries a
hand-written ioctl number.  `struct ifreq` keeps its fields behind macros and
unions, so the C side exports its size and the two offsets tap.py needs.

Build in place with `python3 vmm/net/_build_tun.py` (any working directory);
setup.py builds it as "vmm/net/_build_tun.py:ffibuilder".
"""

import os

import cffi

ffibuilder = cffi.FFI()

CONSTANTS = """
TUNSETIFF TUNGETIFF TUNSETOFFLOAD TUNSETVNETHDRSZ TUNGETVNETHDRSZ TUNSETPERSIST
IFF_TUN IFF_TAP IFF_NO_PI IFF_VNET_HDR IFF_MULTI_QUEUE IFF_PERSIST
TUN_F_CSUM TUN_F_TSO4 TUN_F_TSO6 TUN_F_TSO_ECN TUN_F_UFO
IFF_UP IFF_RUNNING SIOCGIFFLAGS IFNAMSIZ
""".split()

ffibuilder.cdef("".join(f"#define {name} ...\n" for name in CONSTANTS) + """
static const int IFREQ_SIZE;
static const int IFREQ_NAME_OFFSET;
static const int IFREQ_FLAGS_OFFSET;
""")

ffibuilder.set_source(
    "vmm.net._tun",
    r"""
#include <stddef.h>
#include <sys/ioctl.h>
#include <net/if.h>
#include <linux/if_tun.h>

static const int IFREQ_SIZE = sizeof(struct ifreq);
static const int IFREQ_NAME_OFFSET = offsetof(struct ifreq, ifr_name);
static const int IFREQ_FLAGS_OFFSET = offsetof(struct ifreq, ifr_flags);
""",
)

if __name__ == "__main__":
    # tmpdir is the repository root, so the module lands in vmm/net/ whatever the cwd.
    ffibuilder.compile(tmpdir=os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), verbose=False)
