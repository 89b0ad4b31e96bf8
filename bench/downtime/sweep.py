"""The sweep: its options, the plan of runs, running them with a progress bar, and
writing results.md, results.json and the plots (see bench/downtime/__init__.py)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

from bench.downtime.baselines import QEMU, run_naive, run_qemu
from bench.downtime.plots import plots
from bench.downtime.qemu10 import run_qemu10
from bench.downtime.report import MODE_NAME, host_description, size_name, table
from bench.downtime.runs import run_pyvmm
from bench import qemu10
from bench.release_tree import ReleaseTreeError
from bench.vmms import BUILD, ROOT, BenchError, Cleanup, Source, on_sigterm
from vmm import __version__
from vmm.errors import VmmError
from vmm.memory import MiB, parse_size


def plan(args) -> tuple[list[tuple], list[str]]:
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    modes = args.modes.split(",")
    rams = args.ram.split(",")
    bases = set(args.baselines.split(",")) - {""}
    jobs, baselines, skipped = [], [], []
    touched_max = parse_size(args.touched_max)
    naive_max = parse_size(args.naive_max)
    for size in sizes:
        for mode in modes:
            if args.vcpus:   # the vCPU sweep replaces the RAM/load matrix
                jobs += [("pyvmm", mode, size, "untouched", load, n, args.reps)
                         for load in args.vcpu_load.split(",") for n in args.vcpus]
                continue
            for ram in rams:
                if ram == "touched" and size > touched_max:
                    skipped.append(f"cpr-{mode}, {size_name(size)} touched: above --touched-max "
                                   f"{args.touched_max} (touching it takes too long)")
                    continue
                jobs.append(("pyvmm", mode, size, ram, "idle", None, args.reps))
            if "udp" in args.loads and not args.vcpus and (args.udp_sizes is None or size in args.udp_sizes):
                jobs.append(("pyvmm", mode, size, "untouched", "udp", None,
                             args.udp_reps or args.reps))
        if "naive" in bases:
            if size <= naive_max:
                baselines.append(("naive", "naive", size, "untouched", "idle", None, args.reps))
            else:
                skipped.append(f"naive snapshot at {size_name(size)}: above --naive-max "
                               f"{args.naive_max} (the copy would need {size_name(size)} more "
                               "host RAM)")
        if "qemu" in bases:
            if QEMU:
                baselines.append(("qemu", "qemu", size, "untouched", "idle", None, args.reps))
            else:
                skipped.append("QEMU baseline: qemu-system-x86_64 is not installed")
        if "qemu10" in bases:
            if qemu10.binary():
                baselines += [("qemu10", mode, size, "untouched", "idle", None, args.reps)
                              for mode in modes]
            elif size == sizes[0]:
                skipped.append(f"QEMU {qemu10.VERSION} baseline: not built; build it with "
                               f"{qemu10.HOW_TO_BUILD}")
    # Baselines last: the naive one writes GiBs through the page cache, whose
    # after-effects would otherwise land on the next pyvmm runs.
    return jobs + baselines, skipped


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="pyvmm bench downtime",
                                 description="CPR live-update downtime benchmark suite")
    ap.add_argument("--sizes", default="256M,1G,4G,16G",
                    help="guest RAM sizes, comma-separated (default 256M,1G,4G,16G)")
    ap.add_argument("--modes", default="exec,transfer",
                    help="exec and/or transfer, comma-separated (default both)")
    ap.add_argument("--ram", default="untouched,touched",
                    help="untouched (ticker) and/or touched (pattern guest, after pass 1)")
    ap.add_argument("--loads", default="idle,udp", help="idle and/or udp (netecho + 1 ms stream)")
    ap.add_argument("--baselines", default="naive,qemu,qemu10",
                    help="naive, qemu (QEMU 7.2 x-ignore-shared), qemu10 (QEMU 10's "
                         "cpr-exec/cpr-transfer, interleaved with pyvmm; bench/qemu10.py "
                         "builds it), comma-separated, or none (default naive,qemu,qemu10)")
    ap.add_argument("--early-start", action="store_true",
                    help="pyvmm's cpr-transfer updates with x-early-start (the guest runs "
                         "before the new VMM's device restore; docs/CPR.md)")
    ap.add_argument("--reps", type=int, default=5, help="updates per configuration (default 5)")
    ap.add_argument("--udp-reps", type=int, default=None,
                    help="updates per UDP-load configuration (default: --reps)")
    ap.add_argument("--touched-max", default="4G", help="largest RAM size run touched")
    ap.add_argument("--naive-max", default="4G", help="largest RAM size for the naive baseline")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), metavar="DIR",
                    help="where results.json, the Markdown table and the plots go "
                         "(default bench/results)")
    ap.add_argument("--quick", action="store_true",
                    help="256M and 1G, 2 reps, idle, one UDP-load run (< 2 minutes)")
    ap.add_argument("--from", dest="from_rev", metavar="REV",
                    help="an upgrade's downtime: run each guest under an older pyvmm (a "
                         "version in RELEASES.md, e.g. 0.1.0, or a git commit; built once "
                         "into ~/.cache/pyvmm/releases) and update it to this one")
    ap.add_argument("--vcpus", metavar="LIST",
                    help="the vCPU sweep: vCPU counts, comma-separated (e.g. 1,2,4,8); runs "
                         "the smp guest (every vCPU busy, IPIs between them, untouched RAM) "
                         "updated --reps times in a row for each count, instead of the "
                         "--ram/--loads matrix")
    ap.add_argument("--vcpu-load", default="busy", metavar="busy,idle",
                    help="the vCPU sweep's guest load: busy (every vCPU works and sends "
                         "IPIs), idle (vCPU 0 works, the others halt between IPIs), or both "
                         "(default busy)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    args.udp_sizes = None
    for size in args.sizes.split(","):
        try:
            parse_size(size)
        except VmmError as e:
            ap.exit(1, f"{ap.prog}: error: --sizes: {e}\n")
    if not set(args.modes.split(",")) <= {"exec", "transfer"}:
        ap.exit(1, f"{ap.prog}: error: --modes {args.modes!r}: use exec, transfer or both\n")
    if args.baselines != "none" and not set(args.baselines.split(",")) <= {
            "naive", "qemu", "qemu10"}:
        ap.exit(1, f"{ap.prog}: error: --baselines {args.baselines!r}: use naive, qemu, "
                   "qemu10 (comma-separated) or none\n")
    if args.reps < 1 or (args.udp_reps is not None and args.udp_reps < 1):
        ap.exit(1, f"{ap.prog}: error: --reps and --udp-reps take a whole number above 0\n")
    if args.vcpus:
        try:
            args.vcpus = [int(n) for n in args.vcpus.split(",")]
        except ValueError:
            args.vcpus = [0]
        if min(args.vcpus) < 1:
            ap.exit(1, f"{ap.prog}: error: --vcpus: give vCPU counts above 0, "
                       "comma-separated\n")
    if not set(args.vcpu_load.split(",")) <= {"busy", "idle"}:
        ap.exit(1, f"{ap.prog}: error: --vcpu-load {args.vcpu_load!r}: use busy, idle or "
                   "both\n")
    if args.quick:
        args.sizes, args.reps = "256M,1G", 2
        args.udp_sizes, args.udp_reps = [256 * MiB], 1
    if args.baselines == "none":
        args.baselines = ""
    return args


def main(argv=None) -> int:
    args = parse_args(argv if argv is not None else sys.argv[1:])
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("pyvmm bench downtime: /dev/kvm is not usable", file=sys.stderr)
        return 1
    if "udp" in args.loads and os.geteuid() != 0:
        print("pyvmm bench downtime: UDP load needs root (netns + tap); use --loads idle",
              file=sys.stderr)
        return 1
    missing = [g for g in ("ticker", "pattern", "netecho", "smp")
               if not (BUILD / f"{g}.elf").exists()]
    if missing:
        print(f"pyvmm bench downtime: build the guests first (make -C guest): missing {missing}",
              file=sys.stderr)
        return 1
    try:
        source = Source(args.from_rev, log=lambda line: print(line, file=sys.stderr))
    except ReleaseTreeError as e:
        print(f"pyvmm bench downtime: --from {args.from_rev}: {e}", file=sys.stderr)
        return 1
    import bench.vmms
    bench.vmms.EARLY_START = args.early_start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs, skipped = plan(args)
    total = sum(j[-1] for j in jobs)
    old_term = signal.signal(signal.SIGTERM, on_sigterm)
    reg = Cleanup()
    records: list[dict] = []
    failures: list[str] = []
    started = time.monotonic()
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn)
    console = Console(stderr=True)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, disable=args.no_progress)
    try:
        with progress:
            task = progress.add_task("downtime", total=total)
            for kind, mode, size, ram, load, vcpus, reps in jobs:
                what = f"{MODE_NAME[mode if kind != 'qemu10' else 'qemu10-' + mode]} " \
                       f"{size_name(size)} {ram} {load}" + (f" {vcpus} vCPUs" if vcpus else "")
                progress.update(task, description=what)
                advance = lambda: progress.advance(task)   # noqa: E731
                try:
                    if kind == "pyvmm":
                        records += run_pyvmm(reg, mode, size, ram, load, reps, advance,
                                             source, vcpus)
                    elif kind == "naive":
                        records += run_naive(reg, size, reps, advance)
                    elif kind == "qemu10":
                        records += run_qemu10(reg, mode, size, reps, advance)
                    else:
                        records += run_qemu(reg, size, reps, advance)
                except BenchError as e:
                    failures.append(f"{what}: {str(e).splitlines()[0]}")
                    console.print(f"[red]failed[/red] {what}: {e}")
                finally:
                    reg.reap()
                    reg.stack.close()
                    reg.stack = contextlib.ExitStack()
    except KeyboardInterrupt:
        console.print("interrupted: cleaning up")
        return 130
    finally:
        reg.close()
        signal.signal(signal.SIGTERM, old_term)
    elapsed = time.monotonic() - started
    cmd = "pyvmm bench downtime " + " ".join(argv if argv is not None else sys.argv[1:])
    head = ["# pyvmm downtime benchmark", "",
            f"- command: `{cmd.strip()}`",
            f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
            f"- host: {host_description()}",
            *([f"- an upgrade: each guest ran under pyvmm {args.from_rev} (tree "
               f"{source.cwd}) and was updated to this tree's pyvmm {__version__}"]
              if args.from_rev else []),
            f"- took {elapsed:.0f} s", ""]
    text = "\n".join(head) + "\n" + table(records, skipped + [f"FAILED {f}" for f in failures])
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(records, indent=1))
    pngs = plots(records, out) if records else []
    print(text)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, "
          + ", ".join(str(p) for p in pngs))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
