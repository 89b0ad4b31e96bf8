"""`pyvmm bench migration`: live migration between two hosts (bench/twohosts.py), pyvmm
beside QEMU 10.2.2, interleaved, with a plain socket copy over the same link as yardstick.

For each RAM size × dirty rate, each rep migrates the same guest once with each VMM
(the order alternates per rep) from hostA to hostB over the migration link, driven the
same way over QMP (migrate-set-parameters downtime-limit and max-bandwidth, `migrate
uri=tcp:...`, `query-migrate` every 10 ms), then copies pass 1's bytes over the same
link with a plain TCP socket (bench/sockcopy.py): the RAM the pattern guest wrote,
which is what its pass 1 sends.  The copy runs while the guest runs on hostB: every
toy guest's vCPU spins (no interrupts, no halt), so it takes one of the host's CPUs
during the copy as during pass 1.  The guest:

* `idle`, `N` (MB/s): the pattern guest (every page of RAM − 32 MiB written in its pass
  1, none of them zero), then idle (`dirty_mbps=0`) or writing N MB/s of pages;
* `ticker`: the ticker guest (1 ms heartbeat, RAM untouched): the guest-visible pause.

Per migration: total time, downtime (the VMM's own `downtime`, and the host's view: the
source's STOP event to the destination's RESUME event, QMP timestamps), transferred
bytes, the bytes sent while the guest was stopped (`downtime-bytes`: a VMM that
switches over with much still to send moves it while the stopped guest's vCPU leaves
its CPU to the copy), passes (dirty-sync-count), pass-1 throughput (the rate of `transferred`
between the first and the last sample with dirty-sync-count 1) and the plain copy's
throughput of the same number of bytes; with the ticker, the largest gap between two heartbeat
lines as the host received them (bench/downtime/heartbeat.py).

QEMU (Debian's 7.2, or 10.2.2 from bench/qemu10.py) runs the toy guests as
tests/test_guest_qemu.py does, `-M microvm` with `-cpu qemu64` (invtsc would block
migration); pyvmm runs `pyvmm run` and `pyvmm run --incoming tcp:HOST:PORT`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path

from bench import qemu10
from bench.downtime.heartbeat import heartbeat_views, joined_lines
from bench.downtime.report import host_description, size_name
from bench.twohosts import two_hosts
from bench.vmms import BUILD, HEARTBEAT_US, ROOT, BenchError, Cleanup, Proc, on_sigterm, \
    pyvmm_cmd, qmp_connect
from vmm.client import QmpError
from vmm.errors import VmmError
from vmm.memory import MiB, parse_size

QEMU72 = shutil.which("qemu-system-x86_64")
MIGRATION_PORT = 4444
POLL_S = 0.01
UNLIMITED = 1 << 40          # max-bandwidth for "as fast as the link goes" (QEMU's default
#                              is 128 MiB/s, below this host's veth)
VMM_NAME = {"pyvmm": "pyvmm", "qemu10": f"QEMU {qemu10.VERSION}", "qemu72": "QEMU 7.2"}


def qemu_cmd(binary: str | Path, guest: str, size_mb: int, cmdline: str, qmp: Path,
             incoming: str | None = None, prealloc: bool = False) -> list[str]:
    """One QEMU running guest/build/GUEST.elf, its serial on stdout, QMP on unix `qmp`."""
    cmd = [str(binary), "-L", qemu10.FIRMWARE_DIR,
           "-M", "microvm,x-option-roms=off,rtc=off", "-accel", "kvm", "-cpu", "qemu64",
           "-m", f"{size_mb}M", "-nodefaults", "-no-user-config", "-display", "none",
           "-serial", "stdio", "-monitor", "none", "-no-reboot",
           "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
           "-qmp", f"unix:{qmp},server=on,wait=off",
           "-kernel", str(BUILD / f"{guest}.elf"), "-append", cmdline]
    if incoming:
        cmd += ["-incoming", incoming]
    if prealloc:
        cmd += ["-mem-prealloc"]
    return cmd


def guest_for(size: int, dirty: str) -> tuple[str, str, str]:
    """(kernel, cmdline, the serial line that says it is ready) for a dirty rate."""
    if dirty == "ticker":
        return "ticker", f"period_us={HEARTBEAT_US}", r"tick 20 "
    mbps = 0 if dirty == "idle" else int(dirty)
    return "pattern", f"pattern_mb={size // MiB - 32} dirty_mbps={mbps}", r"^pass 1$"


def start_pair(reg: Cleanup, t, vmm: str, size: int, dirty: str, prealloc: bool = False) -> tuple:
    """The source in hostA (guest ready) and the destination waiting in hostB (with
    `prealloc`, its RAM allocated: pyvmm's --mem-prealloc, QEMU's -mem-prealloc)."""
    kernel, cmdline, ready = guest_for(size, dirty)
    uri = f"tcp:{t.link_ip(t.host_b)}:{MIGRATION_PORT}"
    sq, dq = reg.tmp / f"{vmm}-src.qmp", reg.tmp / f"{vmm}-dst.qmp"
    for f in (sq, dq):
        with contextlib.suppress(FileNotFoundError):
            f.unlink()
    if vmm == "pyvmm":
        src = Proc(t.run(t.host_a, *pyvmm_cmd("run", "--kernel", str(BUILD / f"{kernel}.elf"),
                                               "--memory", f"{size // MiB}M", "--cmdline",
                                               cmdline, "--qmp", str(sq))), reg)
        ram = ["-m", f"{size // MiB}M", "--mem-prealloc"] if prealloc else []
        dst = Proc(t.run(t.host_b, *pyvmm_cmd("run", "--incoming", uri, "--qmp", str(dq),
                                               *ram)), reg)
    else:
        binary = qemu10.binary() if vmm == "qemu10" else QEMU72
        src = Proc(t.run(t.host_a, *qemu_cmd(binary, kernel, size // MiB, cmdline, sq)), reg)
        dst = Proc(t.run(t.host_b, *qemu_cmd(binary, kernel, size // MiB, cmdline, dq,
                                             incoming=uri, prealloc=prealloc)), reg)
    src.wait_for(ready, timeout=120)
    if prealloc:   # (both serve QMP once their RAM is allocated)
        with qmp_connect(dq, timeout=120) as d:
            d.execute("query-status")
    return src, sq, dst, dq, uri


def migrate_once(reg: Cleanup, t, vmm: str, size: int, dirty: str, downtime_ms: int,
                 bandwidth: int, timeout: float, prealloc: bool = False) -> dict:
    src, sq, dst, dq, uri = start_pair(reg, t, vmm, size, dirty, prealloc)
    samples: list[tuple[float, int, int]] = []    # (time, dirty-sync-count, transferred)
    with qmp_connect(sq) as s, qmp_connect(dq) as d:
        time.sleep(0.3)                           # a steady heartbeat before
        s.execute("migrate-set-parameters", arguments={"downtime-limit": downtime_ms,
                                                       "max-bandwidth": bandwidth})
        t_cmd = time.monotonic()
        s.execute("migrate", uri=uri)
        while True:
            info = s.execute("query-migrate")
            now = time.monotonic()
            ram = info.get("ram") or {}
            if info.get("status") == "active":
                samples.append((now, ram.get("dirty-sync-count", 0), ram.get("transferred", 0)))
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            if now - t_cmd > timeout:
                s.execute("migrate_cancel")
                raise BenchError(f"did not converge in {timeout:.0f} s (pass "
                                 f"{ram.get('dirty-sync-count')}, remaining "
                                 f"{ram.get('remaining', 0) / MiB:.0f} MiB, dirty rate "
                                 f"{ram.get('dirty-pages-rate', 0) * 4096 / 1e6:.0f} MB/s)")
            time.sleep(POLL_S)
        t_done = time.monotonic()
        if info["status"] != "completed":
            raise BenchError(f"migration {info['status']}: {info.get('error-desc')}")
        host_us = None
        with contextlib.suppress(QmpError, TimeoutError, KeyError, OSError):
            stop = s.wait_event("STOP", timeout=5)["timestamp"]
            resume = d.wait_event("RESUME", timeout=5)["timestamp"]
            host_us = (resume["seconds"] - stop["seconds"]) * 1e6 + \
                resume["microseconds"] - stop["microseconds"]
        if d.execute("query-status")["status"] != "running":
            raise BenchError("the destination is not running the guest after the migration")
    time.sleep(0.3)                               # a steady heartbeat after
    ram = info.get("ram") or {}
    pass1 = [x for x in samples if x[1] == 1]
    rec = {"vmm": vmm, "size": size, "dirty": dirty, "total_ms": info.get("total-time"),
           "downtime_ms": info.get("downtime"), "setup_ms": info.get("setup-time"),
           "host_downtime_us": host_us, "transferred": ram.get("transferred"),
           # (QEMU's and pyvmm's own count of what went while the guest was stopped)
           "downtime_bytes": ram.get("downtime-bytes"),
           "passes": ram.get("dirty-sync-count"), "zero_pages": ram.get("duplicate"),
           "normal_pages": ram.get("normal"),
           "copy_bytes": size - 32 * MiB if dirty != "ticker" else None,
           # (the ticker's RAM is all zero pages: its pass 1 says nothing about the sender)
           "pass1_MBps": ((pass1[-1][2] - pass1[0][2]) / (pass1[-1][0] - pass1[0][0]) / 1e6
                          if dirty != "ticker" and len(pass1) > 1
                          and pass1[-1][0] - pass1[0][0] >= 0.05 else None)}
    if dirty == "ticker":
        rec.update(heartbeat_views(joined_lines([src, dst]), t_cmd, t_done))
    elif rec["pass1_MBps"]:
        # now, while the guest runs on hostB: its vCPU spins on one of the host's CPUs
        # during the copy as it did on hostA during pass 1
        rec["copy_MBps"] = t.socket_copy(rec["copy_bytes"])["MBps"]
    return rec


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="pyvmm bench migration",
                                 description="live migration between two hosts in network "
                                             "namespaces: pyvmm beside QEMU, and a plain copy")
    ap.add_argument("--sizes", default="256M,1G", help="guest RAM sizes (default 256M,1G)")
    ap.add_argument("--dirty", default="idle,10,100,ticker",
                    help="the guest's dirty rates: idle, MB/s numbers, ticker (default "
                         "idle,10,100,ticker)")
    ap.add_argument("--vmms", default="pyvmm,qemu10",
                    help="pyvmm, qemu10 (bench/qemu10.py builds it), qemu72 (Debian's), "
                         "comma-separated (default pyvmm,qemu10)")
    ap.add_argument("--reps", type=int, default=3, help="migrations per VMM and point (3)")
    ap.add_argument("--link-rate", metavar="RATE",
                    help="limit the migration link with tc, e.g. 1gbit (default: unlimited)")
    ap.add_argument("--downtime-limit", type=int, default=300, metavar="MS",
                    help="downtime-limit for both VMMs (default 300, QEMU's)")
    ap.add_argument("--max-bandwidth", default=None, metavar="RATE",
                    help="max-bandwidth for both, like 100M (default: unlimited)")
    ap.add_argument("--timeout", type=float, default=60.0,
                    help="a migration not done in this many seconds is cancelled (default 60)")
    ap.add_argument("--prealloc", action="store_true",
                    help="the destinations allocate their RAM before the migration (pyvmm "
                         "-m SIZE --mem-prealloc, QEMU -mem-prealloc): on a host that backs "
                         "its memory lazily, writing fresh pages is what limits pass 1")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "migration"),
                    metavar="DIR", help="where results.md and results.json go")
    args = ap.parse_args(argv)
    try:
        args.size_list = [parse_size(s) for s in args.sizes.split(",")]
        args.bandwidth = parse_size(args.max_bandwidth) if args.max_bandwidth else UNLIMITED
    except VmmError as e:
        ap.exit(1, f"{ap.prog}: error: {e}\n")
    args.dirty_list = args.dirty.split(",")
    if any(d not in ("idle", "ticker") and not d.isdigit() for d in args.dirty_list):
        ap.exit(1, f"{ap.prog}: error: --dirty {args.dirty!r}: idle, ticker or MB/s numbers\n")
    args.vmm_list = args.vmms.split(",")
    if not set(args.vmm_list) <= set(VMM_NAME):
        ap.exit(1, f"{ap.prog}: error: --vmms {args.vmms!r}: pyvmm, qemu10, qemu72\n")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if os.geteuid() != 0 or not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("pyvmm bench migration: needs root (network namespaces) and /dev/kvm",
              file=sys.stderr)
        return 1
    skipped = []
    if "qemu10" in args.vmm_list and not qemu10.binary():
        skipped.append(f"QEMU {qemu10.VERSION}: not built; build it with {qemu10.HOW_TO_BUILD}")
        args.vmm_list.remove("qemu10")
    if "qemu72" in args.vmm_list and not QEMU72:
        skipped.append("QEMU 7.2: qemu-system-x86_64 is not installed")
        args.vmm_list.remove("qemu72")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from vmm.cli import version_text
    tree = version_text()                       # the code that runs, not what is committed later
    old_term = signal.signal(signal.SIGTERM, on_sigterm)
    reg = Cleanup()
    records, failures = [], []
    started = time.monotonic()
    try:
        with two_hosts(rate=args.link_rate) as t:
            for size in args.size_list:
                for dirty in args.dirty_list:
                    for rep in range(args.reps):
                        order = args.vmm_list if rep % 2 == 0 else args.vmm_list[::-1]
                        for vmm in order:
                            what = f"{VMM_NAME[vmm]} {size_name(size)} dirty={dirty} rep {rep}"
                            try:
                                rec = migrate_once(reg, t, vmm, size, dirty,
                                                   args.downtime_limit, args.bandwidth,
                                                   args.timeout, args.prealloc)
                            except (BenchError, QmpError, OSError) as e:
                                failures.append(f"{what}: {str(e).splitlines()[0]}")
                                print(f"failed {what}: {e}", file=sys.stderr)
                                continue
                            finally:
                                reg.reap()
                            rec["rep"] = rep
                            records.append(rec)
                            print(line(rec), file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("interrupted: cleaning up", file=sys.stderr)
        return 130
    finally:
        reg.close()
        signal.signal(signal.SIGTERM, old_term)
    head = ["# pyvmm live-migration benchmark", "",
            f"- command: `pyvmm bench migration {' '.join(argv)}`",
            f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
            f"- tree: {tree}",
            f"- host: {host_description()}",
            f"- link: veth between two network namespaces, "
            f"{args.link_rate or 'unlimited'}; downtime-limit {args.downtime_limit} ms, "
            f"max-bandwidth {args.max_bandwidth or 'unlimited'}; destination RAM "
            + ("preallocated before the migration" if args.prealloc else "allocated as pages come"),
            f"- took {time.monotonic() - started:.0f} s", ""]
    text = "\n".join(head) + "\n" + report(records, skipped + [f"FAILED {f}" for f in failures])
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(records, indent=1))
    print(text)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}")
    return 1 if failures else 0


def line(r: dict) -> str:
    """One migration, for the progress on stderr."""
    return (f"{VMM_NAME[r['vmm']]} {size_name(r['size'])} dirty={r['dirty']} rep {r['rep']}: "
            f"total {r['total_ms']} ms, downtime {r['downtime_ms']} ms, "
            f"{(r['transferred'] or 0) / MiB:.0f} MiB in {r['passes']} passes, pass 1 "
            f"{_f(r['pass1_MBps'])} MB/s, plain copy {_f(r.get('copy_MBps'))} MB/s")


def _f(x, fmt="{:.0f}") -> str:
    return "–" if x is None else fmt.format(x)


def _median(rs: list[dict], key: str):
    xs = [r[key] for r in rs if r.get(key) is not None]
    return statistics.median(xs) if xs else None


def report(records: list[dict], skipped: list[str]) -> str:
    """Medians per VMM and point, and pyvmm/QEMU ratios where both ran."""
    rows = ["| VMM | RAM | dirty MB/s | n | total ms | downtime ms (own) | STOP→RESUME ms | "
            "heartbeat gap ms | transferred MiB | sent stopped MiB | passes | pass 1 MB/s | "
            "plain copy MB/s | pass 1 / copy |",
            "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    points = sorted({(r["size"], r["dirty"]) for r in records},
                    key=lambda p: (p[0], p[1] != "idle", p[1] == "ticker",
                                   int(p[1]) if p[1].isdigit() else 0))
    vmms = sorted({r["vmm"] for r in records}, key=list(VMM_NAME).index)
    ratios = []
    for size, dirty in points:
        med = {}
        for vmm in vmms:
            rs = [r for r in records if (r["size"], r["dirty"], r["vmm"]) == (size, dirty, vmm)]
            if not rs:
                continue
            m = {k: _median(rs, k) for k in ("total_ms", "downtime_ms", "host_downtime_us",
                                             "heartbeat_gap_us", "transferred",
                                             "downtime_bytes", "passes",
                                             "pass1_MBps", "copy_MBps")}
            ratio = [r["pass1_MBps"] / r["copy_MBps"] for r in rs
                     if r.get("pass1_MBps") and r.get("copy_MBps")]
            m["pass1_ratio"] = statistics.median(ratio) if ratio else None
            med[vmm] = m
            rows.append(
                f"| {VMM_NAME[vmm]} | {size_name(size)} | {dirty} | {len(rs)} | "
                f"{_f(m['total_ms'])} | {_f(m['downtime_ms'])} | "
                f"{_f(m['host_downtime_us'] and m['host_downtime_us'] / 1000, '{:.1f}')} | "
                f"{_f(m['heartbeat_gap_us'] and m['heartbeat_gap_us'] / 1000, '{:.1f}')} | "
                f"{_f(m['transferred'] and m['transferred'] / MiB)} | "
                f"{_f(m['downtime_bytes'] and m['downtime_bytes'] / MiB, '{:.1f}')} | "
                f"{_f(m['passes'])} | "
                f"{_f(m['pass1_MBps'])} | {_f(m['copy_MBps'])} | "
                f"{_f(m['pass1_ratio'] and 100 * m['pass1_ratio'], '{:.0f} %')} |")
        qemu = med.get("qemu10") or med.get("qemu72")
        if "pyvmm" in med and qemu:
            ratios.append(f"| {size_name(size)} | {dirty} | "
                          f"{_ratio(med['pyvmm']['total_ms'], qemu['total_ms'])} | "
                          f"{_ratio(med['pyvmm']['downtime_ms'], qemu['downtime_ms'])} | "
                          f"{_ratio(med['pyvmm']['host_downtime_us'], qemu['host_downtime_us'])}"
                          f" | {_ratio(med['pyvmm']['transferred'], qemu['transferred'])} |")
    text = "Medians over the reps.\n\n" + "\n".join(rows) + "\n"
    if ratios:
        text += ("\npyvmm / QEMU (medians; below 1 is pyvmm better):\n\n| RAM | dirty | total "
                 "time | downtime (own) | STOP→RESUME | transferred |\n|---|---|--:|--:|--:|--:|\n"
                 + "\n".join(ratios) + "\n")
    if skipped:
        text += "\nNot run:\n\n" + "\n".join(f"- {s}" for s in skipped) + "\n"
    return text


def _ratio(a, b) -> str:
    return "–" if not a or not b else f"{a / b:.2f}"


if __name__ == "__main__":
    sys.exit(main())
