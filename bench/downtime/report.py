"""The sweep's Markdown report: the downtime table, the phases, the ratios, the host."""

from __future__ import annotations

import contextlib
import platform
import statistics
import subprocess

from bench.downtime.baselines import QEMU
from bench.qemu10 import VERSION as QEMU10_VERSION
from bench.qemu10 import binary as qemu10_binary
from bench.qemu10 import source_version as qemu10_source
from bench.downtime.stats import PHASES, group, summary
from vmm.memory import GiB, MiB


def fmt_triplet(s):
    return "–" if not s else f"{s['median'] / 1000:.2f} / {s['p95'] / 1000:.2f} / " \
                             f"{s['max'] / 1000:.2f}"


def size_name(size: int) -> str:
    return f"{size // GiB}G" if size % GiB == 0 else f"{size // MiB}M"


MODE_NAME = {"exec": "pyvmm cpr-exec", "transfer": "pyvmm cpr-transfer",
             "naive": "naive snapshot (pyvmm, RAM→file→RAM)",
             "qemu": "QEMU 7.2 migrate, x-ignore-shared",
             "qemu10-exec": f"QEMU {QEMU10_VERSION} cpr-exec",
             "qemu10-transfer": f"QEMU {QEMU10_VERSION} cpr-transfer"}


def table(records, skipped: list[str]) -> str:
    order = {"exec": 0, "transfer": 1, "naive": 2, "qemu": 3, "qemu10-exec": 4,
             "qemu10-transfer": 5}
    rows = ["| what | RAM | RAM state | load | n | host ms (median / p95 / max) | "
            "guest maxgap ms (median / p95 / max) | guest t_us tick gap ms (median / p95 / max) | "
            "heartbeat gap ms (median / p95 / max) | "
            "UDP echo gap ms (median / p95 / max) | UDP lost / dup |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    groups = group(records)
    for key in sorted(groups, key=lambda k: (order[k[0]], k[1], k[2], k[3])):
        rs = groups[key]
        mode, size, ram, load = key
        gg = [r.get("guest_gap_us") for r in rs]
        nvis = sum(1 for x in gg if x is not None)
        guest = fmt_triplet(summary(gg))
        if any("guest_maxgap_after_us" in r for r in rs) and nvis < len(rs):
            guest += f" ({nvis}/{len(rs)} above the prior max)"
        loss = "–"
        if any("udp_sent" in r for r in rs):
            loss = f"{sum(r['udp_lost'] for r in rs)} / {sum(r['udp_dup'] for r in rs)} " \
                   f"of {sum(r['udp_sent'] for r in rs)}"
        rows.append(f"| {MODE_NAME[mode]} | {size_name(size)} | {ram} | {load} | {len(rs)} | "
                    f"{fmt_triplet(summary([r['host_us'] for r in rs]))} | {guest} | "
                    f"{fmt_triplet(summary([r.get('guest_tick_gap_us') for r in rs]))} | "
                    f"{fmt_triplet(summary([r.get('heartbeat_gap_us') for r in rs]))} | "
                    f"{fmt_triplet(summary([r.get('net_gap_us') for r in rs]))} | {loss} |")
    out = ["## Downtime", "", *rows, "",
           "host: pyvmm's `x-downtime-us` (stop -> last vCPU back in KVM_RUN in the new VMM); "
           "naive: pause -> resume in-process; QEMU: source STOP event -> destination RESUME event"
           " (QMP timestamps); QEMU 10: its vmstate_downtime_checkpoint trace, src-downtime-start "
           "-> dst-precopy-bh-vm-started. guest maxgap: ticker's `maxgap_us` after the update, "
           "counted only when it rose above its value before (a pause that catches the guest "
           "inside its write syscall is not in maxgap). guest t_us tick gap: the largest "
           "difference of the guest's own `t_us` between two consecutive ticks across the update "
           "(period 1 ms). heartbeat gap: the largest gap between two tick lines as they arrived "
           "on the host (pipe included). UDP echo gap: the largest gap between two echoes of a 1 "
           "ms stream through netecho. Guest and heartbeat views exist only for the ticker guest "
           "(untouched RAM, idle).", ""]

    out += ["## Phases (median µs, host view, idle)", "",
            "| mode | RAM | RAM state | " + " | ".join(PHASES) + " |",
            "|---|---|---|" + "---|" * len(PHASES)]
    for key in sorted(groups, key=lambda k: (order[k[0]], k[1], k[2], k[3])):
        mode, size, ram, load = key
        if mode not in ("exec", "transfer", "naive") or load != "idle":
            continue
        cells = []
        for ph in PHASES:
            s = summary([r["phases_us"].get(ph) for r in groups[key]])
            cells.append("–" if not s else f"{s['median']:.0f}")
        out.append(f"| {MODE_NAME[mode]} | {size_name(size)} | {ram} | " + " | ".join(cells)
                   + " |")
    out += ["", "pyvmm's timeline ends at the `resume` mark (last vCPU back in KVM_RUN), so "
            "`restore` runs up to it and `resume` has no length of its own. Naive: stop = "
            "pause, save = state + RAM -> file, restore = file -> RAM, resume = restore_state + "
            "resume.", ""]

    ratios = []
    for size in sorted({k[1] for k in groups}):
        for mode in ("exec", "transfer"):
            mine = groups.get((mode, size, "untouched", "idle"))
            if not mine:
                continue
            m = statistics.median(r["host_us"] for r in mine)
            for base in ("naive", "qemu", f"qemu10-{mode}"):
                b = groups.get((base, size, "untouched", "idle"))
                if b:
                    bm = statistics.median(r["host_us"] for r in b)
                    ratios.append(f"| {size_name(size)} | cpr-{mode} | {MODE_NAME[base]} | "
                                  f"{m / 1000:.2f} | {bm / 1000:.2f} | {m / bm:.3g} |")
    if ratios:
        out += ["## pyvmm / baseline (median host downtime, untouched RAM, idle)", "",
                "| RAM | pyvmm | baseline | pyvmm ms | baseline ms | ratio |",
                "|---|---|---|---|---|---|", *ratios, ""]
    out += vcpus_section(records)
    out += qemu10_section(records)
    if skipped:
        out += ["## Not run", "", *[f"- {s}" for s in skipped], ""]
    return "\n".join(out)


def vcpus_section(records) -> list[str]:
    """The vCPU sweep (--vcpus): downtime against the vCPU count, and its growth per
    added vCPU (the medians' least-squares slope)."""
    by: dict[tuple, list] = {}
    for r in records:
        if "vcpus" in r:
            by.setdefault((r["mode"], r["size"], r["load"], r["vcpus"]), []).append(r)
    if not by:
        return []
    rows = ["| mode | RAM | guest | vCPUs | n | host ms (median / p95 / max) | "
            + " | ".join(f"{ph} µs" for ph in PHASES) + " |",
            "|---|---|---|---|---|---|" + "---|" * len(PHASES)]
    slopes = []
    for mode, size, load in sorted({k[:3] for k in by}):
        points = []
        for n in sorted(k[3] for k in by if k[:3] == (mode, size, load)):
            rs = by[(mode, size, load, n)]
            host = summary([r["host_us"] for r in rs])
            points.append((n, host["median"]))
            cells = [summary([r["phases_us"].get(ph) for r in rs]) for ph in PHASES]
            rows.append(f"| {MODE_NAME[mode]} | {size_name(size)} | {load} | {n} | {len(rs)} | "
                        f"{fmt_triplet(host)} | "
                        + " | ".join("–" if not c else f"{c['median']:.0f}" for c in cells)
                        + " |")
        if len(points) > 1:
            mx = statistics.mean(n for n, _ in points)
            my = statistics.mean(y for _, y in points)
            slope = sum((n - mx) * (y - my) for n, y in points) / \
                sum((n - mx) ** 2 for n, _ in points)
            slopes.append(f"| {MODE_NAME[mode]} | {size_name(size)} | {load} | "
                          f"{slope / 1000:.3f} |")
    out = ["## Downtime by vCPU count (the smp guest)", "", *rows, "",
           "guest busy: every vCPU works in ring 3 and sends IPIs; idle: vCPU 0 works, the "
           "others halt and are woken by an IPI twice a second. Phases: medians. The guest is "
           "updated --reps times in a row per count (chained new VMMs for cpr-transfer).", ""]
    if slopes:
        out += ["| mode | RAM | guest | ms per added vCPU (slope of the medians) |",
                "|---|---|---|---|", *slopes, ""]
    return out


def qemu10_section(records) -> list[str]:
    """pyvmm beside QEMU 10 (bench/downtime/qemu10.py): the same measure for both."""
    from bench.downtime.qemu10 import STEADY_LONG_S
    pairs: dict[tuple, dict[str, list]] = {}
    for r in records:
        if r.get("vs") == "qemu10":
            vmm = "qemu10" if r["mode"].startswith("qemu10-") else "pyvmm"
            mode = r["mode"].removeprefix("qemu10-")
            pairs.setdefault((mode, r["size"]), {"pyvmm": [], "qemu10": []})[vmm].append(r)
    if not pairs:
        return []
    name = {"pyvmm": "pyvmm", "qemu10": f"QEMU {QEMU10_VERSION}"}
    cols = ["switch_gap_us", "window_gap_us", "guest_tick_gap_us", "host_us"]
    rows = ["| update | RAM | VMM | n | switch gap ms | window gap ms | guest t_us tick gap ms | "
            "self-reported downtime ms | steady gap ms (median / max) |",
            "|---|---|---|---|---|---|---|---|---|"]
    ratios = ["| update | RAM | switch gap | window gap | self-reported | steady 10 s, largest "
              "gap (host / guest clock) |", "|---|---|---|---|---|---|"]
    for (mode, size), by in sorted(pairs.items()):
        for vmm in ("pyvmm", "qemu10"):
            rs = by[vmm]
            if not rs:
                continue
            steady = summary([r.get("steady_median_gap_us") for r in rs])
            smax = summary([r.get("steady_max_gap_us") for r in rs])
            rows.append(f"| cpr-{mode} | {size_name(size)} | {name[vmm]} | {len(rs)} | " +
                        " | ".join(fmt_triplet(summary([r.get(c) for r in rs])) for c in cols) +
                        f" | {steady['median'] / 1000 if steady else 0:.2f} / "
                        f"{smax['max'] / 1000 if smax else 0:.2f} |")
        cells = []
        for c in ("switch_gap_us", "window_gap_us", "host_us"):
            a, b = (summary([r.get(c) for r in by[v]]) for v in ("pyvmm", "qemu10"))
            cells.append(f"{a['median'] / 1000:.2f} / {b['median'] / 1000:.2f} = "
                         f"{a['median'] / b['median']:.2f}" if a and b else "–")
        long = {v: [r for r in by[v] if r.get("steady_s", 0) >= STEADY_LONG_S] for v in by}
        views = []
        for c in ("steady_max_gap_us", "steady_guest_max_gap_us"):
            a, b = (max((r.get(c) or 0 for r in long[v]), default=0) for v in ("pyvmm", "qemu10"))
            views.append(f"{a / 1000:.2f} / {b / 1000:.2f} = {a / b:.2f}" if a and b else "–")
        cells.append(" ; ".join(views))
        ratios.append(f"| cpr-{mode} | {size_name(size)} | " + " | ".join(cells) + " |")
    binary = qemu10_binary()
    return [f"## pyvmm beside QEMU {QEMU10_VERSION} (interleaved, same guest, same measure)", "",
            f"QEMU: {binary or '?'} (Debian source qemu {qemu10_source() or '?'}, built by "
            "bench/qemu10.py), `-M microvm`, RAM `memory-backend-memfd,share=on`, "
            "`aux-ram-share=on`; cpr-transfer with `main` and `cpr` `-incoming` channels (unix "
            "sockets), cpr-exec with `cpr-exec-command` and `-incoming file:`. Each rep is one "
            "pyvmm update then one QEMU update of the ticker guest (period_us=1000), both "
            "VMMs' stdout (the serial line) a FIFO read with poll() and stamped on arrival "
            "by a reader process of its own (bench/downtime/stamper.py). "
            "switch gap: the gap between heartbeat lines that contains the VMM's own stop..resume; "
            "window gap: the largest gap within ±0.5 s of the stop; guest t_us tick gap: the "
            "guest's own clock across the update; self-reported: pyvmm `x-downtime-us`, QEMU "
            "src-downtime-start -> dst-precopy-bh-vm-started (its vmstate_downtime_checkpoint "
            "trace); steady gap: the heartbeat gaps in the second before the update (median of "
            "the medians / largest); steady 10 s: in each row's first rep both VMMs' guests ran "
            "ten seconds untouched before the update, and the largest gap between two ticks in "
            "them, as the lines reached the host and by the guest's own clock (t_us), pyvmm / "
            "QEMU. Cells: median / p95 / max.", "", *rows, "",
            f"### pyvmm / QEMU {QEMU10_VERSION} (medians, ms)", "", *ratios, ""]


def host_description() -> str:
    def run(*cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return "?"
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = run("free", "-g").splitlines()
    return (f"kernel {run('uname', '-r')}, {run('nproc')} CPUs ({cpu}), "
            f"RAM: {' '.join(mem[1].split()[:2]) if len(mem) > 1 else '?'} GiB total (free -g), "
            f"Python {platform.python_version()}, "
            f"{run(QEMU, '--version').splitlines()[0] if QEMU else 'no QEMU'}, "
            f"QEMU {QEMU10_VERSION}: "
            f"{'built, Debian ' + qemu10_source() if qemu10_binary() else 'not built'}")
