"""`pyvmm demo` (`make demo`, `python -m bench.demo`): the main demo — live-update a guest with traffic flowing.

1. make a network namespace with a tap (10.0.0.1 on the host side),
2. boot the netecho toy guest on it (10.0.0.2), with a QMP monitor,
3. send a numbered UDP stream and a ping through it,
4. live-update it twice while the traffic flows: cpr-exec (same PID), then
   cpr-transfer (into a pyvmm started beforehand),
5. print each update's timeline and downtime, and what the traffic saw.
Everything it creates is removed at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.lab import GUEST_IP, in_ns, netns_with_tap, stop_process
from vmm.errors import VmmError

ROOT = Path(__file__).resolve().parent.parent
KERNEL = ROOT / "guest" / "build" / "netecho.elf"


def pyvmm(*args: str) -> list[str]:
    return [sys.executable, "-m", "vmm", *args]


def wait_path(path: Path, proc, timeout=15.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise VmmError(f"pyvmm did not start (exit {proc.poll()}); see its output above")
        time.sleep(0.01)


def cpr(mode: str, qmp: Path, *extra: str) -> None:
    print(f"\n--- live update: cpr-{mode} ---", flush=True)
    r = subprocess.run(pyvmm("cpr", "--mode", mode, "--socket", str(qmp), "--trace", *extra))
    if r.returncode:
        raise VmmError(f"cpr-{mode} failed")


def main() -> int:
    if os.geteuid() != 0:
        raise VmmError("the demo makes a network namespace and a tap: run it as root")
    if not KERNEL.exists():
        raise VmmError(f"{KERNEL} is missing: run `make build` first")
    tmp = Path(tempfile.mkdtemp(prefix="pyvmm-demo-"))
    procs = []
    with netns_with_tap() as (ns, tap):
        try:
            print(f"[demo] namespace {ns}, {tap} (10.0.0.1) <-> netecho guest ({GUEST_IP})")
            qmp = tmp / "vmm.qmp"
            vmm = subprocess.Popen(in_ns(ns, *pyvmm("run", "--kernel", str(KERNEL), "--net",
                                                    f"tap,ifname={tap}", "--cmdline",
                                                    f"ip={GUEST_IP}", "--qmp", str(qmp))))
            procs.append(vmm)
            wait_path(qmp, vmm)
            time.sleep(0.5)
            print(f"[demo] pyvmm runs the guest as PID {vmm.pid}; starting traffic: 3000 "
                  "numbered UDP datagrams (one per ms) and ping -i 0.01", flush=True)
            stream = subprocess.Popen(in_ns(ns, sys.executable, "-m", "bench.traffic", GUEST_IP,
                                            "3000", "0.001"), stdout=subprocess.PIPE, text=True)
            ping = subprocess.Popen(in_ns(ns, "ping", "-q", "-c", "300", "-i", "0.01", "-W", "2",
                                          GUEST_IP), stdout=subprocess.PIPE, text=True)
            time.sleep(0.7)
            cpr("exec", qmp)
            print(f"[demo] same PID after cpr-exec: {vmm.poll() is None} (PID {vmm.pid})")

            time.sleep(0.5)
            sock, qmp2 = tmp / "incoming.cpr", tmp / "new.qmp"
            new = subprocess.Popen(in_ns(ns, *pyvmm("run", "--incoming",
                                                    f"cpr-transfer:{sock}", "--qmp", str(qmp2))))
            procs.append(new)
            wait_path(sock, new)
            cpr("transfer", qmp, "--uri", str(sock), "--new-qmp", str(qmp2))
            vmm.wait(10)
            print(f"[demo] old pyvmm exited ({vmm.returncode}); new pyvmm PID {new.pid} runs "
                  "the guest")

            result = json.loads(stream.communicate(timeout=60)[0])
            ping_out = ping.communicate(timeout=30)[0]
            got = result["got"]
            lost = result["sent"] - len(set(got))
            dups = len(got) - len(set(got))
            in_order = got == sorted(got)
            print("\n--- what the traffic saw ---")
            print(f"UDP: sent {result['sent']}, echoed {len(got)}, lost {lost}, duplicated {dups}, "
                  f"in order: {in_order}; largest gap between echoes "
                  f"{result['max_gap_ms']:.1f} ms")
            for line in ping_out.splitlines():
                if "transmitted" in line:
                    print(f"ping: {line}")
            return 0 if lost == 0 and dups == 0 and in_order else 1
        finally:
            for p in procs:
                stop_process(p)
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()


if __name__ == "__main__":
    sys.exit(main())
