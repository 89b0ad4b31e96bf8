"""Build script: compiles the cffi modules in API mode.

cffi's API mode compiles small C extensions against the real kernel headers, so
struct layouts and ioctl numbers come from <linux/kvm.h>, <linux/if_tun.h> and
<linux/vhost.h>, never from hand-written offsets.  The virtio-net data path
(csrc/) is compiled into vmm.net._vnet the same way.
"""
from setuptools import setup

setup(
    cffi_modules=[
        "vmm/kvm/_build.py:ffibuilder",
        "vmm/net/_build_tun.py:ffibuilder",
        "vmm/net/_build_vhost.py:ffibuilder",
        "vmm/net/_build_vnet.py:ffibuilder",
    ],
)
