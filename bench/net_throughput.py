"""UDP echo throughput host -> guest -> host through the netecho guest, for three VMMs.

    python3 bench/net_throughput.py [--seconds 3] [--window 32] [--vmm c,python,qemu]
                                    [--payload 64,1400]

Must run as root on a host with /dev/kvm.  For each VMM and payload size it makes a
fresh private network namespace with a tap (bench/lab.py: 10.0.0.1 on the tap, the guest is 10.0.0.2), boots
guest/build/netecho.elf in it and runs a closed-loop, windowed UDP sender inside the
namespace: W datagrams are kept in flight (every echo that comes back releases the
next datagram); echoes are counted over a fixed time.  All traffic stays between
10.0.0.1 and 10.0.0.2 inside that namespace; it is bounded in time (--seconds per
measurement, plus a short warm-up and drain) and so in count.

The VMMs, same guest image, same tap setup:
  c       pyvmm, C data path            (--net tap,...,backend=c)
  python  pyvmm, pure-Python data path  (--net tap,...,backend=python)
  qemu    Debian's qemu-system-x86_64, microvm, virtio-net-device on the tap,
          userspace virtio-net (no vhost), -accel kvm

Prints a Markdown table (echoes/s, UDP payload Mbit/s each way, loss) and the ratios
pyvmm-C/QEMU and pyvmm-C/pyvmm-Python, all from this run.  For pyvmm it also prints
the data path's own counters per echo (kicks, wakeups, interrupts), read over QMP.

Everything it starts (namespaces, taps, VMM processes) is removed on exit, also on
an error or Ctrl-C.

`--sender HOST SIZE SECONDS WINDOW` is the sender on its own (run inside a
namespace); it prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
NETECHO = ROOT / "guest" / "build" / "netecho.elf"
QEMU = shutil.which("qemu-system-x86_64")
GUEST_CMDLINE = "ip=10.0.0.2 stats=0"
# as tests/test_guest_qemu.py: microvm, modern virtio-mmio, the first virtio device on
# microvm's last transport
QEMU_BASE = ["-M", "microvm,x-option-roms=off,rtc=off", "-accel", "kvm",
             "-cpu", "qemu64,+invtsc", "-m", "256M", "-nodefaults", "-no-user-config",
             "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot",
             "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
             "-global", "virtio-mmio.force-legacy=false"]
QEMU_VIRTIO_CMDLINE = "virtio_mmio.device=512@0xfeb02e00:28"
NAMES = {"c": "pyvmm C path", "python": "pyvmm Python path", "qemu": "QEMU 7.2 microvm"}
HDR = struct.Struct("!Q")


# ---------------------------------------------------------------- the sender

def window_sender(host: str, size: int, seconds: float, window: int,
                  warmup: float = 0.3, port: int = 7) -> dict:
    """Closed-loop UDP echo load: keep `window` datagrams in flight for `seconds`.

    Each datagram carries its sequence number in its first 8 bytes (size >= 8).
    An echo releases one more datagram.  If nothing comes back for 50 ms the datagrams
    in flight are written off and a fresh window is sent (counted as a stall).  After
    the measurement it stops sending and drains echoes for up to 0.5 s; loss counts
    the measured datagrams that never came back, `dup` the echoes of a measured
    datagram beyond its first, `unsent` echoes of a number never sent (both are bugs:
    the guest echoes each datagram once).
    """
    size = max(size, HDR.size)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    s.connect((host, port))
    s.setblocking(False)
    poller = select.poll()
    poller.register(s, select.POLLIN)
    buf = bytearray(size)
    mv = memoryview(buf)
    send, recv_into = s.send, s.recv_into
    rbuf = bytearray(65536)
    seq = 0

    # wait until the guest answers at all (ARP, first echo), bounded
    end = time.monotonic() + 5.0
    alive = False
    while not alive and time.monotonic() < end:
        HDR.pack_into(buf, 0, seq)
        send(mv)
        seq += 1
        if poller.poll(200):
            try:
                while True:
                    recv_into(rbuf)
                    alive = True
            except BlockingIOError:
                pass
    if not alive:
        s.close()
        return {"error": f"no echo from {host} within 5 s"}

    first = None            # first measured sequence number
    last = None             # one past the last measured sequence number
    inflight = 0
    echoes = 0              # echoes that arrived inside the measuring window
    bad = 0
    stalls = 0
    got = set()
    dup = unsent = 0
    t_warm = time.monotonic()
    t0 = t_warm + warmup
    t_end = t0 + seconds
    measuring = False
    while True:
        now = time.monotonic()
        if not measuring and now >= t0:
            measuring, first, echoes, t0 = True, seq, 0, now
            t_end = t0 + seconds
        if measuring and now >= t_end:
            last = seq
            break
        while inflight < window:
            HDR.pack_into(buf, 0, seq)
            try:
                send(mv)
            except BlockingIOError:
                break
            except OSError:          # e.g. ENOBUFS: count it as sent and lost
                pass
            seq += 1
            inflight += 1
        if not poller.poll(50):
            stalls += 1
            inflight = 0
            continue
        try:
            while True:
                n = recv_into(rbuf)
                if n != size:
                    bad += 1
                    continue
                k = HDR.unpack_from(rbuf)[0]
                inflight -= 1
                echoes += 1
                if k >= seq:
                    unsent += 1
                elif first is not None and k >= first:
                    dup += k in got
                    got.add(k)
        except BlockingIOError:
            pass
        if inflight < 0:
            inflight = 0
    t_stop = time.monotonic()
    # drain: echoes of measured datagrams still on their way
    drain_end = t_stop + 0.5
    while len(got) < last - first and time.monotonic() < drain_end:
        if not poller.poll(50):
            continue
        try:
            while True:
                n = recv_into(rbuf)
                if n == size:
                    k = HDR.unpack_from(rbuf)[0]
                    if k >= last:
                        unsent += 1
                    elif k >= first:
                        dup += k in got
                        got.add(k)
        except BlockingIOError:
            pass
    s.close()
    sent = last - first
    returned = sum(1 for k in got if k < last)
    elapsed = t_stop - t0
    return {"size": size, "window": window, "seconds": elapsed, "sent": sent,
            "echoes": echoes, "rate": echoes / elapsed, "lost": sent - returned,
            "loss": (sent - returned) / sent if sent else 1.0, "stalls": stalls, "bad": bad,
            "dup": dup, "unsent": unsent}


# ---------------------------------------------------------------- namespaces and VMMs

class Cleanup:
    """Namespaces and processes to remove, whatever happens."""

    def __init__(self):
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []

    def run(self):
        for p in self.procs:
            stop(p)
        for ns in self.namespaces:
            pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            sh("ip", "netns", "del", ns, check=False)   # takes the tap with it
        self.procs.clear()
        self.namespaces.clear()


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=30)


def make_ns(cleanup: Cleanup, tag: str) -> tuple[str, str]:
    ns, tap = f"pyvmm-bench-{os.getpid()}-{tag}", "tap0"
    sh("ip", "netns", "add", ns)
    cleanup.namespaces.append(ns)
    ex = ["ip", "netns", "exec", ns]
    sh(*ex, "ip", "link", "set", "lo", "up")
    sh(*ex, "ip", "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr")
    sh(*ex, "ip", "addr", "add", "10.0.0.1/24", "dev", tap)
    sh(*ex, "ip", "link", "set", tap, "up")
    return ns, tap


def stop(p: subprocess.Popen) -> None:
    from bench.lab import stop_process
    stop_process(p)


class Vmm:
    """One VMM process with netecho, its serial output collected on a thread."""

    def __init__(self, kind: str, ns: str, tap: str, qmp: str | None, cleanup: Cleanup):
        if kind == "qemu":
            cmd = [QEMU, *QEMU_BASE,
                   "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off",
                   "-device", "virtio-net-device,netdev=n0",
                   "-kernel", str(NETECHO), "-append", f"{QEMU_VIRTIO_CMDLINE} {GUEST_CMDLINE}"]
        else:
            cmd = [sys.executable, "-m", "vmm", "run", "--kernel", str(NETECHO),
                   "--net", f"tap,ifname={tap},backend={kind}", "--cmdline", GUEST_CMDLINE]
            if qmp:
                cmd += ["--qmp", qmp]
        self.qmp = qmp
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], cwd=ROOT,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        cleanup.procs.append(self.proc)
        self.out = ""
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for raw in self.proc.stdout:
            with self._cond:
                self.out += raw.decode(errors="replace")
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_up(self, timeout: float = 30.0) -> str:
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                m = re.search(r"netecho: up .*features=0x([0-9a-f]+)", self.out)
                if m:
                    return m.group(1)
                left = end - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise RuntimeError(f"netecho did not come up:\n{self.out[-2000:]}")
                self._cond.wait(min(left, 0.2))

    def stats(self) -> dict | None:
        if not self.qmp:
            return None
        from vmm.client import QmpClient
        with QmpClient(self.qmp, timeout=10) as q:
            st = q.execute("x-query-state")
        for d in st.get("devices", []):
            if d.get("type") == "virtio-net-mmio":
                return d.get("stats")
        return None


def run_sender(ns: str, size: int, seconds: float, window: int) -> dict:
    cmd = ["ip", "netns", "exec", ns, sys.executable, str(Path(__file__).resolve()),
           "--sender", "10.0.0.2", str(size), str(seconds), str(window)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
    if r.returncode != 0 or not r.stdout.strip():
        raise RuntimeError(f"sender failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_cell(kind: str, size: int, seconds: float, window: int,
               cleanup: Cleanup, tmp: str) -> dict:
    """One VMM, one payload size: a fresh namespace, tap and VMM for each cell."""
    ns, tap = make_ns(cleanup, kind)
    qmp = os.path.join(tmp, f"{kind}-{size}.qmp") if kind != "qemu" else None
    vmm = Vmm(kind, ns, tap, qmp, cleanup)
    try:
        features = vmm.wait_up()
        before = vmm.stats()
        res = run_sender(ns, size, seconds, window)
        after = vmm.stats()
        if "error" in res:     # the guest never answered: a row of zeros, with the reason
            res = {"size": size, "window": window, "seconds": seconds, "sent": 0,
                   "echoes": 0, "rate": 0.0, "lost": 0, "loss": 1.0, "stalls": 0, "bad": 0,
                   "error": res["error"]}
        res["vmm"], res["features"] = kind, features
        if before and after:
            res["counters"] = {k: after[k] - before[k] for k in after}
            res["counters_after"] = after
        print(f"  {NAMES[kind]:18} {size:5} B: {res['rate']:10.0f} echoes/s "
              f"loss {res['loss'] * 100:.2f}% stalls {res['stalls']}"
              + (f" ({res['error']})" if res.get("error") else ""),
              file=sys.stderr, flush=True)
        return res
    finally:
        stop(vmm.proc)
        cleanup.run()


# ---------------------------------------------------------------- report

def table(rows: list[dict]) -> str:
    out = ["| VMM | payload | echoes/s | Mbit/s each way (UDP payload) | loss |",
           "|---|---:|---:|---:|---:|"]
    for r in rows:
        mbit = r["rate"] * r["size"] * 8 / 1e6
        loss = (f"{r['lost']}/{r['sent']} ({r['loss'] * 100:.2f}%)" if not r.get("error")
                else f"no echo at all ({r['error']})")
        if r.get("stalls"):
            loss += f", {r['stalls']} stalls of 50 ms"
        if r.get("dup") or r.get("unsent"):
            loss += f", {r.get('dup', 0)} duplicated, {r.get('unsent', 0)} never sent"
        out.append(f"| {NAMES[r['vmm']]} | {r['size']} B | {r['rate']:,.0f} | {mbit:,.1f} | "
                   f"{loss} |")
    return "\n".join(out)


def counters_table(rows: list[dict]) -> str:
    rows = [r for r in rows if r.get("counters")]
    if not rows:
        return ""
    out = ["| VMM | payload | guest kicks / echo | data-path wakeups / echo | "
           "interrupts / echo | rx pkts | tx pkts |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        c = r["counters"]
        n = max(c.get("tx_packets", 0), 1)   # guest TX = echoes (+ ARP)
        out.append(f"| {NAMES[r['vmm']]} | {r['size']} B | {c.get('kicks', 0) / n:.3f} | "
                   f"{c.get('wakeups', 0) / n:.3f} | {c.get('interrupts', 0) / n:.3f} | "
                   f"{c.get('rx_packets', 0)} | {c.get('tx_packets', 0)} |")
    return "\n".join(out)


def ratios(rows: list[dict]) -> str:
    by = {(r["vmm"], r["size"]): r["rate"] for r in rows}
    lines = []
    for size in sorted({r["size"] for r in rows}):
        c = by.get(("c", size))
        if c is None:
            continue
        parts = []
        if by.get(("qemu", size)):
            parts.append(f"pyvmm-C/QEMU {c / by[('qemu', size)]:.2f}x")
        if by.get(("python", size)):
            parts.append(f"pyvmm-C/pyvmm-Python {c / by[('python', size)]:.2f}x")
        if parts:
            lines.append(f"- {size} B: " + ", ".join(parts))
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--sender":
        host, size, seconds, window = sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), \
            int(sys.argv[5])
        print(json.dumps(window_sender(host, size, seconds, window)))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="measuring time per cell")
    ap.add_argument("--window", type=int, default=32, help="datagrams kept in flight")
    ap.add_argument("--vmm", default="c,python,qemu", help="comma list of c, python, qemu")
    ap.add_argument("--payload", default="64,1400", help="comma list of UDP payload sizes")
    args = ap.parse_args()
    kinds = [k for k in args.vmm.split(",") if k]
    sizes = [int(x) for x in args.payload.split(",") if x]
    if any(k not in NAMES for k in kinds):
        ap.error(f"--vmm: choose from {', '.join(NAMES)}")
    if any(not 8 <= s <= 1472 for s in sizes):
        ap.error("--payload: 8..1472 bytes (one frame at MTU 1500)")
    if not 0 < args.seconds <= 60 or not 1 <= args.window <= 256:
        ap.error("--seconds must be in (0, 60], --window in [1, 256]")
    if os.geteuid() != 0:
        print("net_throughput: needs root (network namespaces, taps)", file=sys.stderr)
        return 1
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("net_throughput: no usable /dev/kvm", file=sys.stderr)
        return 1
    if "qemu" in kinds and QEMU is None:
        print("net_throughput: qemu-system-x86_64 not installed: skipping QEMU",
              file=sys.stderr)
        kinds.remove("qemu")
    subprocess.run(["make", "-s", "-C", str(ROOT / "guest")], check=True, timeout=120)

    cleanup = Cleanup()

    def on_signal(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)
    rows: list[dict] = []
    try:
        with tempfile.TemporaryDirectory(prefix="pyvmm-bench-") as tmp:
            for kind in kinds:
                for size in sizes:
                    rows.append(bench_cell(kind, size, args.seconds, args.window, cleanup,
                                           tmp))
    finally:
        cleanup.run()
    print(f"\nUDP echo through netecho, window {args.window} in flight, "
          f"{args.seconds:g} s per cell\n")
    print(table(rows))
    r = ratios(rows)
    if r:
        print("\nRatios (echoes/s, same run):\n" + r)
    c = counters_table(rows)
    if c:
        print("\npyvmm data-path counters over the measured cell (incl. warm-up):\n" + c)
    return 0


if __name__ == "__main__":
    sys.exit(main())
