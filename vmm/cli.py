"""The `pyvmm` command.

Errors a user can cause print one line (`pyvmm: error: ...`) and exit 1; a
guest that crashes prints the reason and a register dump and exits 2; a guest
that writes to the debug-exit port makes that value pyvmm's exit status.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from .errors import VmmError
from .runner import EXIT_VMM_ERROR, _start_monitor, open_console, serve


class _Parser(argparse.ArgumentParser):
    """argparse with pyvmm's convention: a usage error is one line and exit status 1
    (argparse's own 2 is what pyvmm reserves for a guest crash)."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")
        sys.exit(EXIT_VMM_ERROR)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds above 0")
    return value


def version_text() -> str:
    """The version, and the git commit when run from a checkout."""
    from . import __version__
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = ""
    try:
        import subprocess
        r = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                           capture_output=True, text=True, timeout=5)
        if r.returncode == 0:
            commit = f" (commit {r.stdout.strip()})"
    except (OSError, subprocess.SubprocessError):
        pass
    return f"pyvmm {__version__}{commit}"


class _Version(argparse.Action):
    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


RUN_EPILOG = """exit status: the value the guest writes to the debug-exit port (0xf4); 0 when
it halts or is quit; 1 for an error you can fix (one line on stderr); 2 when the
guest crashes (the reason and a register dump on stderr); 128+N on signal N."""


def _parser() -> argparse.ArgumentParser:
    from .cpr.faults import POINTS
    p = _Parser(prog="pyvmm", description="A small KVM VMM with CPR live update.")
    p.add_argument("--version", action=_Version)
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="boot a guest kernel (or receive one: --incoming)",
                         epilog=RUN_EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--kernel", help="PVH ELF kernel image")
    run.add_argument("--memory", "-m", help="guest RAM, e.g. 256M, 1G (default 256M; with "
                     "--incoming tcp: the guest's, to make RAM before it comes)")
    run.add_argument("--mem-prealloc", "-mem-prealloc", action="store_true",
                     help="allocate all guest RAM at start (QEMU's -mem-prealloc): before the "
                          "guest boots, or before a migration (--incoming tcp) comes")
    run.add_argument("--cmdline", default="", help="kernel command line")
    run.add_argument("--vcpus", type=int, default=1, help="number of vCPUs (default 1)")
    run.add_argument("--hugetlb", action="store_true", help="back RAM with 2 MiB huge pages")
    run.add_argument("--console", metavar="FILE", help="append serial output to FILE, not stdout")
    run.add_argument("--net", action="append", default=[], metavar="tap[,ifname=NAME|fd=N][,mac=M][,backend=B]",
                     help="a virtio-net device on a tap: an existing tap by name (or a new one "
                          "pyvmm creates, bare `tap`), or an open tap fd; backend=c (the C "
                          "data path, default), python, or vhost (/dev/vhost-net)")
    run.add_argument("--device", action="append", default=[], metavar="KIND[,OPTS]",
                     help="another device (vmm/devices/__init__.py lists the kinds), e.g. "
                          "scratch,value=5: a 32-bit register at 0xd1000000")
    run.add_argument("--qmp", metavar="PATH", help="serve a QMP monitor on unix socket PATH")
    run.add_argument("--incoming", action="append", metavar="cpr-transfer:PATH",
                     help="wait for a live update from another pyvmm on unix socket PATH "
                          "(or QEMU's forms: a JSON channel, unix:PATH, defer; docs/CPR.md); "
                          "tcp:HOST:PORT with --net: a migration from another host "
                          "(docs/MIGRATION.md)")

    cpr = sub.add_parser("cpr", help="live-update a running pyvmm through its QMP socket")
    cpr.add_argument("--mode", choices=["exec", "transfer"], required=True,
                     help="exec: the VMM execs a new image of itself (same PID); "
                          "transfer: hand the guest to a pyvmm waiting with --incoming")
    cpr.add_argument("--socket", required=True, metavar="QMP", help="the running pyvmm's QMP socket")
    cpr.add_argument("--uri", metavar="PATH",
                     help="transfer: the new pyvmm's --incoming socket path")
    cpr.add_argument("--new-qmp", metavar="PATH",
                     help="transfer: the new pyvmm's QMP socket (to read its timeline)")
    cpr.add_argument("--fault", default="",
                     help="inject a fault to watch the rollback, one of: "
                          + ", ".join(sorted(POINTS)) + " (see docs/CPR.md)")
    cpr.add_argument("--early-start", action="store_true",
                     help="transfer: the new pyvmm runs the guest as soon as it has the vCPU "
                          "state, before its device restore (shorter pause; if the new pyvmm "
                          "then crashes the guest goes with it: see docs/CPR.md)")
    cpr.add_argument("--trace", action="store_true", help="print each step with its time")
    cpr.add_argument("--trace-plot", metavar="FILE",
                     help="draw this update (lanes per process, messages, downtime, fault "
                          "points) into FILE (.svg or .png; needs matplotlib)")
    cpr.add_argument("--timeout", type=_positive_seconds, default=60.0, metavar="SECONDS",
                     help="how long to wait for the update to finish (default 60 s)")

    mig = sub.add_parser("migrate", help="move a running guest to another host (QMP migrate "
                                         "over TCP; drives pyvmm or QEMU)")
    mig.add_argument("--socket", required=True, metavar="QMP",
                     help="the source VMM's QMP socket")
    mig.add_argument("--to", required=True, metavar="tcp:HOST:PORT",
                     help="where the destination waits (pyvmm run --incoming tcp:HOST:PORT)")
    mig.add_argument("--downtime-limit", type=int, metavar="MS",
                     help="the longest pause allowed for the last pass, in ms (QEMU's "
                          "downtime-limit; its default is 300)")
    mig.add_argument("--max-bandwidth", metavar="RATE",
                     help="cap the stream, bytes/s like 100M or 1G (K/M/G are powers of 1024)")
    mig.add_argument("--no-live", action="store_true",
                     help="one plain line per pass, even on a terminal")
    mig.add_argument("--timeout", type=_positive_seconds, default=600.0, metavar="SECONDS",
                     help="how long to wait for the migration to finish (default 600 s)")

    sub.add_parser("demo", help="live-update a guest with traffic flowing (needs root)")

    bench = sub.add_parser("bench", help="benchmarks: `pyvmm bench downtime --help`")
    bench.add_argument("suite", choices=["downtime", "soak", "migration", "migrate"],
                       help="migrate is another name for migration")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="the suite's own options")

    state = sub.add_parser("state", help="show a running VM's state (registers, memory, devices)")
    state.add_argument("--socket", required=True, metavar="QMP",
                       help="the running pyvmm's QMP socket (its --qmp PATH)")
    return p


def main(argv: list[str] | None = None) -> int:
    from .runner import exec_entry   # a cpr-exec's new image resumes the guest, whatever argv says
    code = exec_entry(sys.argv[1:] if argv is None else argv)
    if code is not None:
        return code
    import faulthandler
    faulthandler.register(signal.SIGUSR2, all_threads=True)   # `kill -USR2 PID`: stacks
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "cpr":
            from .client.cpr import cmd_cpr
            return cmd_cpr(args)
        if args.command == "migrate":
            from .client.migrate import cmd_migrate
            return cmd_migrate(args)
        if args.command == "bench" and args.suite in ("migration", "migrate"):
            from bench.migration import main as migration_main
            return migration_main(args.args)
        if args.command == "bench" and args.suite == "soak":
            from bench.soak import main as soak_main
            return soak_main(args.args)
        if args.command == "bench":
            from bench.downtime import main as downtime_main
            return downtime_main(args.args)
        if args.command == "demo":
            from bench.demo import main as demo_main
            return demo_main()
        if args.command == "state":
            from .client.view import cmd_state
            return cmd_state(args)
    except VmmError as e:
        print(f"pyvmm: error: {e}", file=sys.stderr)
        return EXIT_VMM_ERROR
    except KeyboardInterrupt:
        return 130
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        print(f"pyvmm: error: {e.strerror or e}{where}", file=sys.stderr)
        return EXIT_VMM_ERROR
    return 0


def cmd_run(args) -> int:
    from .machine import Machine, MachineConfig
    from .memory import parse_size

    config = {"console": os.path.abspath(args.console) if args.console else None,
              "qmp": os.path.abspath(args.qmp) if args.qmp else None,
              "nets": args.net}
    created = bool(config["console"]) and not os.path.exists(config["console"])
    console = open_console(config["console"])
    try:
        if args.incoming:
            return _run_incoming(args, config, console)
        if not args.kernel:
            raise VmmError("give the guest kernel with --kernel PATH (or --incoming to receive one)")
        mconf = MachineConfig(kernel=args.kernel, memory=parse_size(args.memory or "256M"),
                              cmdline=args.cmdline, vcpus=args.vcpus, hugetlb=args.hugetlb,
                              console=console, nets=args.net, devices=args.device,
                              prealloc=args.mem_prealloc)
        machine = Machine(mconf)
        try:
            machine.create()
            machine.boot()
        except BaseException:
            machine.close()
            raise
    except BaseException:
        if created:     # a start-up error leaves no empty console file behind
            _remove_if_empty(config["console"])
        raise
    return serve(machine, config, start=True)


def _remove_if_empty(path: str) -> None:
    try:
        if os.path.getsize(path) == 0:
            os.unlink(path)
    except OSError:
        pass


def _run_incoming(args, config, console) -> int:
    """Wait for a live update (cpr-transfer) or a migration over TCP, then run the guest
    it brings."""
    import signal
    from .cpr.target import Incoming, IncomingAborted, parse_incoming
    from .memory import GuestMemory, parse_size
    from .migration.receiver import Receiver, parse_incoming as parse_tcp_incoming
    tcp = parse_tcp_incoming(args.incoming, args.net)
    for given, what in ((args.kernel, "--kernel"), (args.net, "--net"), (args.device, "--device"),
                        (args.memory, "--memory"), (args.hugetlb, "--hugetlb"),
                        (args.mem_prealloc, "--mem-prealloc")):
        if given and not (tcp and what in ("--net", "--memory", "--hugetlb", "--mem-prealloc")):
            raise VmmError(f"{what} cannot be given with --incoming: the guest's kernel, RAM "
                           "and devices (NICs with their taps) come from the old VMM in the update"
                           + ("" if what != "--net" else " (a TCP migration, "
                              "--incoming tcp:HOST:PORT, takes this host's taps with --net)"))
    for given, what in ((args.mem_prealloc, "--mem-prealloc"), (args.hugetlb, "--hugetlb")):
        if tcp and given and not args.memory:
            raise VmmError(f"{what} with --incoming tcp needs the guest's RAM size: "
                           "give -m SIZE (as on the source)")
    ram = None   # RAM made before the source comes (tcp with -m), allocated with --mem-prealloc
    if tcp:
        if args.memory:
            ram = GuestMemory(parse_size(args.memory), hugetlb=args.hugetlb)

        def make():
            return Receiver(tcp[0], args.net, console=console, deferred=tcp[1], memory=ram)
    else:
        path, deferred = parse_incoming(args.incoming)

        def make():
            return Incoming(path, console=console, deferred=deferred)
    exit_code: list[int] = []   # set by a signal (128+signo) or by QMP quit

    def on_signal(signo, frame):   # SIGTERM, Ctrl-C: clean up, exit 128+signo quietly
        exit_code.append(128 + signo)
        raise IncomingAborted(f"signal {signo}")

    def on_quit(code):
        exit_code.append(code)
        incoming.abort()

    for signo in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signo, on_signal)
    incoming = monitor = None
    try:
        if ram is not None and args.mem_prealloc:   # (Ctrl-C stops it: a signal raises)
            ram.prealloc()
        # A signal while the sockets are being made is held until both are known,
        # so the cleanup below removes each one that exists.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        try:
            incoming = make()
            monitor = _start_monitor(config, None, status="inmigrate", incoming=incoming,
                                     on_exit=on_quit)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        incoming.prepare()
        machine = incoming.complete()
        incoming.status = "completed"
    except BaseException:
        for signo in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signo, signal.SIG_IGN)
        if monitor:
            monitor[0].close()
        if incoming is not None:
            incoming.close()
            if incoming.machine is not None:
                incoming.machine.close()
        if ram is not None and (incoming is None or incoming.machine is None):
            ram.close()   # (again after incoming.close(): closing twice is harmless)
        if exit_code:
            return exit_code[0]
        raise
    for signo in (signal.SIGTERM, signal.SIGINT):   # serve() sets its own at once
        signal.signal(signo, lambda signo, frame: exit_code.append(128 + signo))
    incoming.close()
    if exit_code:   # quit or a signal as the guest arrived: stop, as asked
        if monitor:
            monitor[0].close()
        machine.close()
        return exit_code[0]
    if monitor:   # (QEMU's order on a destination: RESUME as the guest starts, then this)
        if machine.running:
            monitor[1].emit("RESUME")
        monitor[1].emit("MIGRATION", {"status": "completed"})
    return serve(machine, config, monitor=monitor, arrival=incoming.arrival)
