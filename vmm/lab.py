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
