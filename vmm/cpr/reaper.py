"""Let a child process, not the live update, pay for destroying the old KVM VM.

Closing a KVM VM fd destroys the VM, which takes about 13 ms on this host
(measured: bench/README or docs/BENCHMARKS.md).  In a cpr-exec that happens
inside execve, on the critical path.  So before the stop we start `cat` holding
duplicates of the VM's fds, reading a pipe whose write end is close-on-exec:
the exec closes the pipe, `cat` exits, and the VM is destroyed by `cat`'s exit
on another CPU while the new image is already starting.
"""

from __future__ import annotations

import subprocess


class VmReaper:
    def __init__(self, fds: list[int]):
        self.proc = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, pass_fds=fds, close_fds=True)

    def cancel(self) -> None:
        """The update did not happen: let the holder go (the VM stays ours)."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait()
