"""Build script: compiles the cffi modules (KVM binding, C hot path) in API mode.

cffi's API mode compiles a small C extension against the real kernel headers, so
struct layouts and ioctl numbers come from <linux/kvm.h>, never from hand-written
offsets.
"""
from setuptools import setup

setup(
    cffi_modules=["vmm/kvm/_build.py:ffibuilder"],
)
