"""`pyvmm bench soak`: many live updates in a row under traffic, watching for leaks and loss.

    pyvmm bench soak [--updates 20] [--memory 256M] [--no-live]

Boots the netecho guest on a tap in a network namespace made for the run, keeps
`ping -i 0.01` going for the whole soak and, for every update, sends a numbered
UDP stream (1 datagram/ms, `bench.traffic`) across it while it live-updates the
VMM, alternating cpr-exec and cpr-transfer.  Per update it reports the datagrams
lost, duplicated and reordered, the downtime (`x-downtime-us`), and the VMM's
fd count (/proc/PID/fd), thread count (/proc/PID/task) and RSS once it settled.

Exits 1 if a datagram or a ping was lost or duplicated, if an update failed, or
if the fds or threads after an update outnumber those after the first update of
the same mode (a leak grows with every update); 0 otherwise.  Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time

from bench.lab import GUEST_IP, in_ns, netns_with_tap, wait_until_no_child
from bench.vmms import (BUILD, ROOT, BenchError, Cleanup, Guest, do_update, on_sigterm,
                        start_incoming, start_vmm)
from vmm.memory import MiB

MODES = ("exec", "transfer")


def proc_counts(pid: int) -> dict:
    """What a leak would grow: open fds, threads, resident memory (KiB)."""
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return {"fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": len(os.listdir(f"/proc/{pid}/task")), "rss_kib": rss}


def settled_counts(pid: int, timeout: float = 3.0) -> dict:
    """proc_counts once the VMM has settled after an update: the QMP connection the
    benchmark just closed, or a holder's pipe, may take a moment on a busy host to
    be closed on the VMM's side.  The lowest reading over a quiet spell, so a
    transient fd is not counted as a leak (a leaked one never goes away)."""
    best = proc_counts(pid)
    deadline = time.monotonic() + timeout
    quiet = 0
    while time.monotonic() < deadline and quiet < 5:
        time.sleep(0.02)
        now = proc_counts(pid)
        quiet = quiet + 1 if (now["fds"], now["threads"]) == (best["fds"], best["threads"]) else 0
        if (now["fds"], now["threads"]) < (best["fds"], best["threads"]):
            best = now
    return best


def stream_counts(got: list[int], sent: int) -> dict:
    """Lost, duplicated and reordered datagrams of one numbered stream."""
    uniq = set(got)
    return {"sent": sent, "lost": sum(1 for k in range(sent) if k not in uniq),
            "dup": len(got) - len(uniq),
            "reordered": sum(1 for a, b in zip(got, got[1:]) if b < a)}


def soak(args, on_update) -> tuple[list[dict], dict]:
    reg = Cleanup()
    g = Guest("untouched", "udp", args.memory)
    records: list[dict] = []
    ping = None
    try:
        ns, tap = reg.stack.enter_context(netns_with_tap())
        cur, cur_qmp = start_vmm(reg, g, "vm0", ns, tap)
        cur.wait_for(g.ready, timeout=60)
        initial = proc_counts(cur.pid)
        ping = subprocess.Popen(in_ns(ns, "ping", "-i", "0.01", "-W", "1", GUEST_IP),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(args.updates):
            mode = MODES[i % 2]
            sock = new_qmp = new = None
            if mode == "transfer":
                new, sock, new_qmp = start_incoming(reg, f"new{i}", ns)
            stream = subprocess.Popen(
                in_ns(ns, sys.executable, "-m", "bench.traffic", GUEST_IP,
                      str(args.datagrams), "0.001"), stdout=subprocess.PIPE, text=True, cwd=ROOT)
            time.sleep(args.datagrams / 1000 / 3)       # the update lands inside the stream
            try:
                info, _, _ = do_update(mode, cur_qmp, sock, new_qmp)
            except BaseException:
                stream.kill()
                stream.wait()
                raise
            if mode == "exec":   # the holder that tears the old VM down, then is reaped
                wait_until_no_child(cur.pid, lambda comm, state: comm == "pyvmm-holder", 30)
            else:
                if cur.proc.wait(30) != 0:
                    raise BenchError(f"old pyvmm exited {cur.proc.returncode}: "
                                     f"{cur.stderr[-2000:]}")
                cur, cur_qmp = new, new_qmp
            r = json.loads(stream.communicate(timeout=60)[0])
            rec = {"update": i + 1, "mode": mode, "downtime_us": info["x-downtime-us"],
                   **stream_counts(r["got"], r["sent"]), **settled_counts(cur.pid)}
            records.append(rec)
            on_update(rec, initial)
        ping.send_signal(signal.SIGINT)
        out = ping.communicate(timeout=10)[0]
        m = re.search(r"(\d+) packets transmitted, (\d+) received(?:, \+(\d+) duplicates)?", out)
        pings = {"sent": int(m.group(1)), "received": int(m.group(2)),
                 "dup": int(m.group(3) or 0)} if m else {"error": out[-300:]}
        return records, {"initial": initial, "ping": pings}
    finally:
        if ping and ping.poll() is None:
            ping.kill()
            ping.wait()
        reg.close()


def verdict(records: list[dict], extra: dict, wanted: int) -> list[str]:
    """What went wrong, one line each; empty if the soak passed."""
    bad = []
    if len(records) < wanted:
        bad.append(f"only {len(records)} of {wanted} updates ran")
    for r in records:
        if r["lost"] or r["dup"]:
            bad.append(f"update {r['update']} (cpr-{r['mode']}): {r['lost']} datagrams lost, "
                       f"{r['dup']} duplicated")
    first = {}
    for r in records:
        base = first.setdefault(r["mode"], r)
        for k in ("fds", "threads"):
            if r[k] > base[k]:
                bad.append(f"update {r['update']} (cpr-{r['mode']}): {r[k]} {k}, "
                           f"{base[k]} after update {base['update']}")
    p = extra.get("ping", {})
    if "error" in p:
        bad.append(f"ping gave no summary: {p['error']}")
    elif p and (p["received"] < p["sent"] - 1 or p["dup"]):   # the last may be in flight
        bad.append(f"ping: {p['sent']} sent, {p['received']} received, {p['dup']} duplicates")
    return bad


def _table(records):
    from rich.table import Table
    t = Table(title="pyvmm bench soak")
    for col in ("#", "mode", "downtime ms", "sent", "lost", "dup", "reord", "fds", "threads",
                "RSS MiB"):
        t.add_column(col, justify="right")
    for r in records:
        t.add_row(str(r["update"]), f"cpr-{r['mode']}", f"{r['downtime_us'] / 1000:.2f}",
                  str(r["sent"]), str(r["lost"]), str(r["dup"]), str(r["reordered"]),
                  str(r["fds"]), str(r["threads"]), f"{r['rss_kib'] / 1024:.1f}")
    return t


def summary(records: list[dict], extra: dict) -> str:
    lines = []
    for mode in MODES:
        rs = [r for r in records if r["mode"] == mode]
        if not rs:
            continue
        d = sorted(r["downtime_us"] / 1000 for r in rs)
        med = statistics.median(d)
        lines.append(f"cpr-{mode}: {len(rs)} updates, downtime median {med:.2f} ms, "
                     f"max {d[-1]:.2f} ms; fds {min(r['fds'] for r in rs)}–"
                     f"{max(r['fds'] for r in rs)}, threads {min(r['threads'] for r in rs)}–"
                     f"{max(r['threads'] for r in rs)}")
    tot = {k: sum(r[k] for r in records) for k in ("sent", "lost", "dup", "reordered")}
    lines.append(f"datagrams: {tot['sent']} sent, {tot['lost']} lost, {tot['dup']} duplicated, "
                 f"{tot['reordered']} reordered")
    if records:
        lines.append(f"RSS: {extra['initial']['rss_kib'] / 1024:.1f} MiB before, "
                     f"{records[0]['rss_kib'] / 1024:.1f} after update 1, "
                     f"{records[-1]['rss_kib'] / 1024:.1f} after update {len(records)}")
    p = extra.get("ping", {})
    if "sent" in p:
        lines.append(f"ping -i 0.01: {p['received']}/{p['sent']} received, {p['dup']} duplicates")
    return "\n".join(lines)


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="pyvmm bench soak", description=__doc__.split("\n")[0])
    ap.add_argument("--updates", type=int, default=20, help="live updates, alternating modes")
    ap.add_argument("--memory", default="256M", help="guest RAM (M or G suffix)")
    ap.add_argument("--datagrams", type=int, default=600,
                    help="UDP datagrams (1 per ms) sent across each update")
    ap.add_argument("--json", metavar="FILE", help="also write the records as JSON")
    ap.add_argument("--no-live", action="store_true", help="no live table (plain lines)")
    args = ap.parse_args(argv)
    m = re.fullmatch(r"(\d+)([MG])", args.memory)
    if not m:
        ap.error(f"--memory {args.memory!r}: give a size like 256M or 1G")
    args.memory = int(m.group(1)) * (MiB if m.group(2) == "M" else 1024 * MiB)
    if args.updates < 1 or args.datagrams < 100:
        ap.error("--updates must be at least 1 and --datagrams at least 100")
    return args


def main(argv=None) -> int:
    args = parse_args(argv if argv is not None else sys.argv[1:])
    if os.geteuid() != 0 or not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("pyvmm bench soak: needs root (a netns and a tap) and a usable /dev/kvm",
              file=sys.stderr)
        return 1
    if not (BUILD / "netecho.elf").exists():
        print("pyvmm bench soak: build the guests first (make -C guest)", file=sys.stderr)
        return 1
    from rich.console import Console
    from rich.live import Live
    console = Console(stderr=True)
    records: list[dict] = []
    live = Live(_table(records), console=console, refresh_per_second=4,
                auto_refresh=not args.no_live)

    def on_update(rec, initial):
        if args.no_live:
            print(f"update {rec['update']:3} cpr-{rec['mode']:8} downtime "
                  f"{rec['downtime_us'] / 1000:7.2f} ms  sent {rec['sent']} lost {rec['lost']} "
                  f"dup {rec['dup']} reordered {rec['reordered']}  fds {rec['fds']} "
                  f"threads {rec['threads']} rss {rec['rss_kib'] / 1024:.1f} MiB", flush=True)
        else:
            live.update(_table(records))
    old_term = signal.signal(signal.SIGTERM, on_sigterm)
    extra: dict = {}
    failed = None
    try:
        if args.no_live:
            records, extra = soak(args, on_update)
        else:
            with live:
                records, extra = soak(args, lambda rec, initial: (records.append(rec),
                                                                  on_update(rec, initial)))
    except KeyboardInterrupt:
        print("pyvmm bench soak: interrupted", file=sys.stderr)
        return 130
    except BenchError as e:
        failed = str(e).splitlines()[0]
    finally:
        signal.signal(signal.SIGTERM, old_term)
    bad = verdict(records, extra, args.updates) if failed is None else [f"failed: {failed}"]
    print(summary(records, extra) if records else "no update completed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"records": records, **extra}, f, indent=1)
    for line in bad:
        print(f"FAIL {line}")
    print("soak: FAILED" if bad else "soak: passed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
