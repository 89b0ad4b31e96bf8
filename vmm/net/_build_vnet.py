"""cffi build script for the C virtio-net data path (csrc/vnet.c, API mode).

Build in place from the repository root:  python3 vmm/net/_build_vnet.py
(setup.py can list it as "vmm/net/_build_vnet.py:ffibuilder").
"""

import os
import sys

import cffi

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from vmm.cffi_header import cdef_from_header  # noqa: E402

CDEF = cdef_from_header(os.path.join(ROOT, "csrc", "vnet.h"))

ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "vmm.net._vnet",
    '#include "vnet.h"',
    sources=["csrc/vnet.c", "csrc/virtq.c"],
    include_dirs=["csrc"],
    extra_compile_args=["-Wall", "-Wextra", "-Werror", "-O2", "-std=gnu11"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    os.chdir(ROOT)  # sources are relative to the repository root
    ffibuilder.compile(tmpdir=ROOT, verbose=True)
