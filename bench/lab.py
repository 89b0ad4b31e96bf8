"""Network namespaces with a tap, for the tests, the demo and the labs.

All traffic stays between the namespace and the guest.

pyvmm itself runs inside the namespace (`ip netns exec`), so it opens the tap
there; the host side of the tap has HOST_IP, the guest GUEST_IP.  Everything
is removed on exit, also when a test fails.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import time
from contextlib import contextmanager

HOST_IP = "10.0.0.1"
GUEST_IP = "10.0.0.2"
_counter = itertools.count()


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True)


@contextmanager
def netns_with_tap():
    """Yield (namespace, tap name); the tap is up with HOST_IP/24 inside the namespace."""
    ns = f"pyvmm-{os.getpid()}-{next(_counter)}"
    tap = "tap0"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        sh("ip", "netns", "exec", ns, "ip", "tuntap", "add", "dev", tap, "mode", "tap",
           "vnet_hdr")
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{HOST_IP}/24", "dev", tap)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", tap, "up")
        yield ns, tap
    finally:
        sh("ip", "netns", "pids", ns, check=False)
        pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass
        sh("ip", "netns", "del", ns, check=False)


def in_ns(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


def stop_process(p, timeout: float = 5.0) -> None:
    """Terminate a child politely, then for sure (tests, benchmarks, the demo)."""
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class WatchedProcess:
    """A child whose stdout lines are read on a thread and stamped with the
    CLOCK_MONOTONIC time they arrived (the host's view of a guest heartbeat).

    `lines` holds the complete lines.  A last fragment without a newline (a line
    the old VMM was half-way through when it handed the guest over) is shown at
    once by snapshot() and text(), with `partial` set, so it can be joined with
    the new VMM's first line; search() looks at it only once the output ended.
    """

    def __init__(self, cmd: list[str], *, env: dict | None = None, cwd=None,
                 stdin=subprocess.DEVNULL):
        import threading
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=stdin, cwd=cwd,
                                     env=dict(os.environ, **(env or {})))
        self.lines: list[tuple[float, str]] = []
        self.partial = False     # the output so far ends inside a line (_tail)
        self._tail, self._tail_t = "", 0.0
        self.stderr = ""
        self._cond = threading.Condition()
        self._eof = False
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self):
        # Chunks, not `for line in stdout`: a line iteration holds back a fragment
        # until its newline comes, and a VMM that stopped its guest mid-line (a
        # migration source in postmigrate) never sends one.
        import codecs
        import time
        decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
        while True:
            chunk = self.proc.stdout.read1(65536)
            t = time.monotonic()
            text = decode(chunk, final=not chunk)
            with self._cond:
                *done, self._tail = (self._tail + text).split("\n")
                self.lines += [(t, line.rstrip("\r")) for line in done]
                if text:
                    self._tail_t = t
                self.partial = bool(self._tail)
                self._eof = not chunk
                self._cond.notify_all()
            if not chunk:
                return

    def _read_err(self):
        self.stderr = self.proc.stderr.read().decode(errors="replace")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def count(self) -> int:
        with self._cond:
            return len(self.lines)

    def snapshot(self) -> list[tuple[float, str]]:
        """The lines so far, the fragment after the last newline (if any) last."""
        with self._cond:
            return self.lines + [(self._tail_t, self._tail.rstrip("\r"))] * self.partial

    def text(self) -> str:
        return "\n".join(line for _, line in self.snapshot())

    def search(self, pattern: str, timeout: float = 30.0, start: int = 0):
        """The first match of `pattern` in a line at index >= start, waiting for it;
        None if none came in time or the output ended."""
        import re
        import time
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                ended = self._eof and self.partial   # (a fragment can still grow before)
                for _, line in self.lines[start:] + [(0.0, self._tail)] * ended:
                    m = rx.search(line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    return None
                self._cond.wait(min(left, 0.5))

    def stop(self) -> None:
        stop_process(self.proc)


def child_procs(pid: int) -> list[tuple[str, str]]:
    """(comm, state) of each child of `pid` (children gone meanwhile are skipped)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = f.read().split()
    except OSError:
        return []
    out = []
    for kid in kids:
        try:
            with open(f"/proc/{kid}/stat") as f:
                comm, rest = f.read().split(" (", 1)[1].rsplit(")", 1)
        except OSError:
            continue
        out.append((comm, rest.split()[0]))
    return out


def wait_until_no_child(pid: int, bad, timeout: float = 5.0) -> list:
    """Wait until no child of `pid` is `bad(comm, state)`; the bad ones left at the end.
    (After a cpr-exec: the `pyvmm-holder` that tears the old VM down, then is reaped.)"""
    deadline = time.monotonic() + timeout
    while True:
        left = [c for c in child_procs(pid) if bad(*c)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)
