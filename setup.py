"""Build script: the C hot path, then the cffi modules that bind it.

cffi's API mode compiles small C extensions against the real kernel headers, so
struct layouts and ioctl numbers come from <linux/kvm.h>, <linux/if_tun.h> and
<linux/vhost.h>, never from hand-written offsets.  The KVM module's C (csrc/) is a
shared library of its own, libpyvmm_kvm.so, built here first with cpr-exec's
launcher beside it (vmm/kvm/_build.py says why); the virtio-net data path is
compiled into vmm.net._vnet.
"""
import importlib.util
import os

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def _kvm_build():
    spec = importlib.util.spec_from_file_location(
        "_kvm_build", os.path.join(ROOT, "vmm", "kvm", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildHotPath(build_ext):
    """libpyvmm_kvm.so and pyvmm-cpr-exec into vmm/kvm/ (in place) or the build
    tree, before the extensions that link the library."""

    def run(self):
        from setuptools._distutils.ccompiler import new_compiler
        from setuptools._distutils.sysconfig import customize_compiler

        kb = _kvm_build()
        out = os.path.dirname(self.get_ext_fullpath("vmm.kvm._kvm"))
        os.makedirs(out, exist_ok=True)
        cc = new_compiler(force=self.force)
        customize_compiler(cc)
        flags = ["-O2", "-fPIC", "-g", *kb.CFLAGS]
        objs = cc.compile(kb.LIBRARY_SOURCES, output_dir=self.build_temp,
                          include_dirs=["csrc"], extra_postargs=flags)
        cc.link_shared_object(objs, f"lib{kb.LIBRARY}.so", output_dir=out,
                              libraries=["pthread"],
                              extra_postargs=[f"-Wl,-soname,lib{kb.LIBRARY}.so"])
        objs = cc.compile(kb.LAUNCHER_SOURCES, output_dir=self.build_temp,
                          include_dirs=["csrc"], extra_postargs=flags)
        # (--no-as-needed: the launcher calls nothing in the library; it needs its
        # constructor to run before main)
        cc.link_executable(objs, kb.LAUNCHER, output_dir=out, libraries=[kb.LIBRARY, "dl"],
                           library_dirs=[out], extra_preargs=["-Wl,--no-as-needed"],
                           extra_postargs=["-Wl,-rpath,$ORIGIN"])
        for ext in self.extensions:
            if ext.name == "vmm.kvm._kvm":
                ext.library_dirs.append(out)
        super().run()


setup(
    cmdclass={"build_ext": BuildHotPath},
    cffi_modules=[
        "vmm/kvm/_build.py:ffibuilder",
        "vmm/net/_build_tun.py:ffibuilder",
        "vmm/net/_build_vhost.py:ffibuilder",
        "vmm/net/_build_vnet.py:ffibuilder",
    ],
)
