"""The cpr-exec helpers in csrc/cpr_exec.c, each on its own, in real processes.

The prebuilder: a Python started through pyvmm-cpr-exec (the launcher that loads
libpython itself) or with libpyvmm_kvm.so in LD_PRELOAD, and a spec memfd, builds
the VM before its main(); the resume path adopts it.  The
holder: a CLONE_VM child that keeps only the fds it is given and goes when its
pipe closes.  (The whole cpr-exec path with both: tests/test_cpr.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import ROOT, need_kvm
from vmm.cpr import prebuild
from vmm.cpr.holder import Holder
from vmm.memory import MiB, GuestMemory

CHILD = textwrap.dedent("""
    import json, os, subprocess, sys
    sys.path.insert(0, {root!r})
    from vmm.cpr import prebuild
    built = prebuild.take()
    out = {{"env": sorted(k for k in os.environ if k in ("LD_PRELOAD", "PYVMM_CPR_PREBUILD",
                                                           "PYVMM_CPR_PRELOAD_WAS",
                                                           "PYVMM_CPR_NICE_WAS",
                                                           "PYVMM_CPR_LIBPYTHON")),
           "exe": os.readlink("/proc/self/exe"), "prefix": sys.prefix,
           "executable": sys.executable,
           "nice": os.getpriority(os.PRIO_PROCESS, 0),
           "ld_preload": os.environ.get("LD_PRELOAD"),
           "grandchild_env": subprocess.run(["env"], capture_output=True, text=True).stdout}}
    if built is None:
        out["built"] = None
    else:
        out["built"] = {{"ok": built.ok, "error": built.error, "vcpus": len(built.vcpu_fds),
                         "ram_size": built.ram_size}}
        if built.ok:
            from vmm.kvm.ffi import ffi
            from vmm.memory import GuestMemory
            from vmm.machine import create_kvm_parts
            mem = GuestMemory.from_fd({ram_fd}, built.ram_size, address=built.ram_addr)
            out["ram_head"] = mem.read(0, 16).hex()
            cpuids = [open({cpuid!r}, "rb").read()] * len(built.vcpu_fds)
            kvm, vm, vcpus = create_kvm_parts(mem, len(cpuids), cpuids, prebuilt=built)
            out["vm_state_keys"] = sorted(vm.get_state())
            out["slots"] = sorted(vm.slots)
            for v in vcpus:
                v.close()
            vm.close(); kvm.close(); mem.close()
        else:   # what the resume path does with it (vmm/cpr/target.py), then our stdin
            built.discard()
            out["stdin_open"] = os.path.exists("/proc/self/fd/0")
    out["fds"] = sorted(os.readlink("/proc/self/fd/" + f) for f in os.listdir("/proc/self/fd")
                        if os.path.exists("/proc/self/fd/" + f))
    print(json.dumps(out))
""")


@pytest.fixture(scope="module", autouse=True)
def kvm():
    need_kvm()


@pytest.fixture(params=["launcher", "preload"])
def how(request):
    """The two ways a cpr-exec starts the prebuilder (vmm/cpr/prebuild.py)."""
    if request.param == "launcher" and prebuild.launcher() is None:
        pytest.skip("this Python has no shared libpython (or pyvmm-cpr-exec is not "
                    "built): cpr-exec uses LD_PRELOAD here")
    return request.param


def run_child(spec_fd, ram_fd, cpuid_path, env_extra=None, nice=None, how="preload"):
    env = dict(os.environ)
    launch = prebuild.launcher() if how == "launcher" else None
    if spec_fd is not None:
        env.update(prebuild.exec_env(spec_fd, launch[1] if launch else None))
    env.update(env_extra or {})
    code = CHILD.format(root=str(ROOT), ram_fd=ram_fd, cpuid=str(cpuid_path))
    fds = [f for f in (spec_fd, ram_fd) if f is not None]
    renice = None if nice is None else (lambda: os.setpriority(os.PRIO_PROCESS, 0, nice))
    r = subprocess.run([sys.executable, "-c", code], env=env, pass_fds=fds,
                       executable=launch[0] if launch else None,
                       capture_output=True, text=True, timeout=60, preexec_fn=renice)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    # What ran: the launcher, which found this venv from argv[0] as python would have
    # (and names the same sys.executable, which the next cpr-exec's command starts with).
    assert out["exe"] == (launch[0] if launch else os.path.realpath(sys.executable))
    assert (out["prefix"], out["executable"]) == (sys.prefix, sys.executable)
    return out


@pytest.fixture
def ram_and_cpuid(tmp_path):
    from vmm.machine import create_kvm_parts
    mem = GuestMemory(64 * MiB)
    mem.write(0, b"pyvmm prebuild!!")
    kvm, vm, vcpus = create_kvm_parts(mem, 2)
    cpuid = tmp_path / "cpuid"
    cpuid.write_bytes(vcpus[0].cpuid_bytes)
    for v in vcpus:
        v.close()
    vm.close()
    kvm.close()
    yield mem, cpuid
    mem.close()


def test_prebuilder_builds_the_vm_before_main_and_cleans_the_environment(ram_and_cpuid, how):
    mem, cpuid = ram_and_cpuid
    spec = prebuild.request(mem, 2)
    try:
        out = run_child(spec, mem.fd, cpuid, how=how)
    finally:
        os.close(spec)
    assert out["built"] == {"ok": True, "error": "", "vcpus": 2, "ram_size": 64 * MiB}
    assert bytes.fromhex(out["ram_head"]) == b"pyvmm prebuild!!"   # the same RAM, mapped
    assert out["slots"] == [0]
    assert "irqchip" in out["vm_state_keys"] and "pit" in out["vm_state_keys"]
    # Nothing of the request is left for the image or anything it starts.
    assert out["env"] == [] and out["ld_preload"] is None
    assert "LD_PRELOAD" not in out["grandchild_env"]
    assert "PYVMM_CPR" not in out["grandchild_env"]
    # The constructor closed the spec memfd, and the closed VM left nothing behind.
    assert not [t for t in out["fds"] if "pyvmm-prebuild" in t or "kvm" in t], out["fds"]


def test_prebuilder_puts_back_an_ld_preload_it_found(ram_and_cpuid, how):
    """LD_PRELOAD as the old image had it: put back after ours, or not touched by
    the launcher."""
    mem, cpuid = ram_and_cpuid
    spec = prebuild.request(mem, 1)
    # A harmless library that is surely there: the C library itself.
    libc = next(p for p in ("/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib64/libc.so.6")
                if os.path.exists(p))
    saved = os.environ.get("LD_PRELOAD")
    os.environ["LD_PRELOAD"] = libc
    try:
        out = run_child(spec, mem.fd, cpuid, how=how)
    finally:
        os.close(spec)
        if saved is None:
            del os.environ["LD_PRELOAD"]
        else:
            os.environ["LD_PRELOAD"] = saved
    assert out["built"]["ok"]
    assert out["ld_preload"] == libc and out["env"] == ["LD_PRELOAD"]


@pytest.mark.parametrize("was, expect", [("3", 3), ("0", 0), ("-20x", -5), ("99", -5)])
def test_prebuilder_puts_back_the_nice_the_exec_raised(ram_and_cpuid, was, expect, how):
    """The old image execs at the vCPU threads' nice and names the one it had; the
    constructor gives it back to the main thread (a malformed value: left as it is)
    and the variable is gone for the image and what it starts."""
    if os.geteuid() != 0:
        pytest.skip("setting a negative nice needs CAP_SYS_NICE")
    mem, cpuid = ram_and_cpuid
    spec = prebuild.request(mem, 2)
    try:
        out = run_child(spec, mem.fd, cpuid, {prebuild.NICE_WAS_ENV: was}, nice=-5, how=how)
    finally:
        os.close(spec)
    assert out["built"]["ok"] and out["nice"] == expect
    assert out["env"] == [] and "PYVMM_CPR" not in out["grandchild_env"]


@pytest.mark.parametrize("spec_bytes", [b"", b"garbage" * 40, None])
def test_prebuilder_refuses_a_bad_request_and_builds_nothing(ram_and_cpuid, spec_bytes, how):
    mem, cpuid = ram_and_cpuid
    if spec_bytes is None:   # a well-formed spec that lies about the RAM size
        from vmm.kvm.ffi import ffi
        good = prebuild.request(mem, 1)
        data = bytearray(os.pread(good, 4096, 0))
        os.close(good)
        spec_c = ffi.new("struct pyvmm_prebuild_spec *")
        ffi.buffer(spec_c)[:] = bytes(data[:ffi.sizeof(spec_c[0])])
        spec_c.ram_size = 128 * MiB
        spec_bytes = bytes(ffi.buffer(spec_c))
        want = "check the RAM memfd's size"
    else:
        want = "read the prebuild request" if not spec_bytes else "check the prebuild request"
    spec = os.memfd_create("bad-spec", 0)
    os.write(spec, spec_bytes)
    try:
        out = run_child(spec, mem.fd, cpuid, how=how)
    finally:
        os.close(spec)
    assert out["built"]["ok"] is False and out["built"]["error"].startswith(want)
    assert out["env"] == []
    assert out["stdin_open"]   # discarding a failed build closes nothing it did not make


def test_without_a_request_there_is_nothing_to_take(ram_and_cpuid):
    mem, cpuid = ram_and_cpuid
    out = run_child(None, mem.fd, cpuid)
    assert out["built"] is None


def _comm(pid):
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def test_holder_keeps_only_its_fds_and_goes_when_released():
    r, w = os.pipe()
    keep = os.memfd_create("held", 0)
    try:
        holder = Holder([keep])
        deadline = time.monotonic() + 5
        while _comm(holder.pid) != "pyvmm-holder":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        deadline = time.monotonic() + 5
        while True:   # it closes the rest of its copy of our fd table first
            fds = os.listdir(f"/proc/{holder.pid}/fd")
            if len(fds) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        targets = sorted(os.readlink(f"/proc/{holder.pid}/fd/{fd}") for fd in fds)
        assert len(targets) == 2 and targets[0].startswith("/memfd:held") and \
            targets[1].startswith("pipe:"), targets
        with open(f"/proc/{holder.pid}/stat") as f:
            nice = int(f.read().rsplit(")", 1)[1].split()[16])
        assert nice == 19   # its exit pays for the teardown, yielding to the guest
        holder.cancel()
        assert not os.path.exists(f"/proc/{holder.pid}")   # exited and reaped
    finally:
        for fd in (r, w, keep):
            os.close(fd)


def test_stale_pyc_is_compiled_before_an_exec():
    """An edited module would be compiled from source inside the new image's downtime;
    the old image refreshes it first (vmm.cpr.source._byte_compile)."""
    import sys
    from vmm.cpr.source import _byte_compile
    src = ROOT / "vmm" / "sync.py"
    pyc = ROOT / "vmm" / "__pycache__" / f"sync.{sys.implementation.cache_tag}.pyc"
    _byte_compile()
    st = src.stat()
    os.utime(src, (st.st_atime, st.st_mtime + 5))   # as if just edited
    try:
        _byte_compile()
        header = pyc.read_bytes()[:16]
        assert header[8:12] == (int(st.st_mtime + 5) & 0xFFFFFFFF).to_bytes(4, "little")
    finally:
        os.utime(src, (st.st_atime, st.st_mtime))
        _byte_compile()


@pytest.mark.parametrize("libpython, want", [(None, "run by a cpr-exec only"),
                                             ("/nonexistent/libpython3.so", "cannot load"),
                                             ("/lib/x86_64-linux-gnu/libc.so.6", "no Py_BytesMain")])
def test_launcher_run_wrongly_says_why_in_one_line(libpython, want):
    launch = prebuild.launcher()
    if launch is None:
        pytest.skip("this Python has no shared libpython: no launcher to run")
    if libpython and not os.path.exists(libpython) and want != "cannot load":
        pytest.skip(f"{libpython} is not here")
    env = {k: v for k, v in os.environ.items() if k != prebuild.LIBPYTHON_ENV}
    if libpython:
        env[prebuild.LIBPYTHON_ENV] = libpython
    r = subprocess.run([sys.executable, "-c", "print('python ran')"], executable=launch[0],
                       env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 127 and r.stdout == ""
    assert r.stderr.startswith("pyvmm-cpr-exec: ") and want in r.stderr
    assert r.stderr.count("\n") == 1, r.stderr


def test_a_static_python_gets_ld_preload_even_with_a_libpython_installed():
    """Debian's python3.11 has the interpreter linked in, though its sysconfig names
    libpython3.11.so.1.0 (which may be installed: it is on this project's machines):
    the launcher would run that library instead of the user's binary, so only a
    libpython this very process has mapped counts."""
    static = "/usr/bin/python3.11"
    if not os.path.exists(static):
        pytest.skip(f"no {static} here")
    code = ("import sys; sys.path.insert(0, %r); "
            "from vmm.cpr.prebuild import _loaded_libpython; "
            "print(_loaded_libpython())" % str(ROOT))
    r = subprocess.run([static, "-I", "-c", code], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    loaded = r.stdout.strip()
    if subprocess.run(["ldd", static], capture_output=True, text=True).stdout.count("libpython"):
        pytest.skip(f"{static} links libpython dynamically here")
    assert loaded == "None"
    # ... and this pytest's own interpreter: the launcher's libpython is the one mapped.
    mine = prebuild._loaded_libpython()
    if mine is not None:
        with open("/proc/self/maps") as f:
            assert mine in f.read()
