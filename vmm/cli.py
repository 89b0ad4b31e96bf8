"""The `pyvmm` command.

Errors a user can cause print one line (`pyvmm: error: ...`) and exit 1; a
guest that crashes prints the reason and a register dump and exits 2; a guest
that writes to the debug-exit port makes that value pyvmm's exit status.
"""

from __future__ import annotations

import argparse
import signal
import sys

from .errors import VmmError

EXIT_VMM_ERROR = 1
EXIT_GUEST_CRASH = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyvmm", description="A small KVM VMM with CPR live update.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="boot a guest kernel")
    run.add_argument("--kernel", required=True, help="PVH ELF kernel image")
    run.add_argument("--memory", "-m", default="256M", help="guest RAM, e.g. 256M, 1G (default 256M)")
    run.add_argument("--cmdline", default="", help="kernel command line")
    run.add_argument("--vcpus", type=int, default=1, help="number of vCPUs (default 1)")
    run.add_argument("--hugetlb", action="store_true", help="back RAM with 2 MiB huge pages")
    run.add_argument("--console", metavar="FILE", help="write serial output to FILE, not stdout")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
    except VmmError as e:
        print(f"pyvmm: error: {e}", file=sys.stderr)
        return EXIT_VMM_ERROR
    except KeyboardInterrupt:
        return 130
    return 0


def cmd_run(args) -> int:
    from .machine import Machine, MachineConfig
    from .memory import parse_size

    console = None
    if args.console:
        try:
            out = open(args.console, "ab", buffering=0)
        except OSError as e:
            raise VmmError(f"cannot open console file {args.console}: {e.strerror}") from None
        console = out.write
    config = MachineConfig(kernel=args.kernel, memory=parse_size(args.memory),
                           cmdline=args.cmdline, vcpus=args.vcpus, hugetlb=args.hugetlb,
                           console=console)
    machine = Machine(config)
    stop = []

    def on_signal(signo, frame):
        stop.append(signo)
        machine._done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        machine.create()
        machine.boot()
        machine.start()
        while not machine.wait(0.5):
            pass
    finally:
        machine.close()
    if stop:
        return 128 + stop[0]
    if machine.error is not None:
        first, _, dump = str(machine.error).partition("\n")
        print(f"pyvmm: error: {first}", file=sys.stderr)
        if dump:
            print(dump, file=sys.stderr)
        return EXIT_GUEST_CRASH
    return machine.exit_code or 0
