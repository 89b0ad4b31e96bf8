"""CPR live update: stop -> notify -> save -> transfer, in cpr-exec and cpr-transfer modes.

The order is the point (see QEMU's "migration: stop vm earlier for cpr"):
the new VMM uses the devices the moment it receives their fds, so the old one
must have stopped the guest (vCPUs paused, data paths quiesced) and released
every device before any device fd leaves it.

Its functions import what they use themselves, on purpose: every cpr-exec image
imports this package first, inside the downtime.
"""

# cpr-exec: the environment of the new image names the state memfd, when the old
# image began the exec (CLOCK_MONOTONIC ns), and whether this is the fallback exec.
EXEC_STATE_ENV = "PYVMM_CPR_EXEC_STATE"
EXEC_T_ENV = "PYVMM_CPR_T_TRANSFER"
FALLBACK_ENV = "PYVMM_CPR_FALLBACK"
RECORD_PEER_ENV = "PYVMM_CPR_RECORD_PEER"   # new VMM: list the old one's threads at fd receipt
HOLDER_ENV = "PYVMM_CPR_HOLDER"   # "pid,fd": the old image's holder (cpr/holder.py), for the new image to release
# cpr-transfer: the longest the guest may stay stopped before the new VMM has restored
# it (ms; QMP's downtime-limit), then the old VMM rolls back.  A cpr-transfer takes ~2 ms
# here; QEMU's 300 ms default would leave little room on a loaded host, and 1 s is what a
# tap's default queue (1000 packets) holds of a 1 packet/ms stream.
DOWNTIME_LIMIT_MS = 1000



def search_path() -> list[str]:
    """This process's module search path with pyvmm's root first, for a new image
    started without site (which would otherwise add site-packages)."""
    import os
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = [root] + [p for p in sys.path if p and os.path.isdir(p)]
    return list(dict.fromkeys(paths))


def resume_command() -> list[str]:
    """What a cpr-exec runs by default: this interpreter, isolated (-I: no PYTHON*
    variables, no user site) and without site (-S: its .pth files cost ~40 ms here),
    straight into the resume path (no runpy), with this process's module search path
    written into the command itself.  Arguments after it (--console, --qmp) are the new
    image's (vmm.runner.exec_overrides)."""
    import sys
    snippet = ("import time, sys; t = time.clock_gettime_ns(time.CLOCK_MONOTONIC); "
               f"sys.path[:0] = {search_path()!r}; "
               "import vmm.runner as r; raise SystemExit(r.resume_after_exec(t, sys.argv[1:]))")
    return [sys.executable, "-I", "-S", "-c", snippet]
