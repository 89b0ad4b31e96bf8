"""Keep the old image's address space and KVM VM alive across a cpr-exec.

execve normally tears down the old address space (page tables over all the
RAM the guest touched) and, by closing the old VM's fds, destroys the old KVM
VM (~20-25 ms here: bench/cpr_costs.py): both inside the exec, so both downtime.  Before the stop
the old image starts a *holder*: a child cloned with CLONE_VM (it shares our
memory, like a vfork child, and so keeps the old mm alive after our exec)
that keeps only the VM's fds and reads a pipe (csrc/cpr_exec.c).  The new
image closes the pipe once the guest runs again; the holder then exits and
its exit, at nice 19, pays for the teardown.  `ps` shows it as
`pyvmm-holder`.
"""

from __future__ import annotations

import os

from ..errors import VmmError


class Holder:
    def __init__(self, fds: list[int]):
        from ..kvm.ffi import ffi, lib
        self._h = ffi.new("struct pyvmm_holder *")
        arr = ffi.new("int[]", fds)
        r = lib.pyvmm_holder_start(arr, len(fds), self._h)
        if r < 0:
            raise VmmError(f"cannot start the cpr-exec holder: {os.strerror(-r)}")
        self.pid = self._h.pid
        self.wfd = self._h.wfd

    def for_exec(self) -> str:
        """Make the pipe survive the exec; the value the new image gets in its environment."""
        os.set_inheritable(self.wfd, True)
        return f"{self.pid},{self.wfd}"

    def cancel(self) -> None:
        """The update did not happen: let the holder go (the VM stays ours)."""
        if self.wfd < 0:
            return
        os.close(self.wfd)
        self.wfd = -1
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        from ..kvm.ffi import lib
        lib.pyvmm_holder_free(self._h)   # its stack, now that it has exited


def release(value: str | None) -> None:
    """New image, guest running: let the old image's holder exit, and reap it."""
    if not value:
        return
    try:
        pid, wfd = (int(x) for x in value.split(","))
    except ValueError:
        return
    try:
        os.close(wfd)
    except OSError:
        pass
    from ..sync import Thread   # (not threading: the guest has just resumed)

    def wait():
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    Thread(wait, name="holder-wait").start()
