"""Running a machine until it is done, and resuming one after a cpr-exec.

Kept apart from the CLI so that the image a cpr-exec starts imports only what
it needs to get the guest running again (no argparse); the monitor is started
after the guest runs.

Its imports sit inside the functions on purpose: in a cpr-exec's new image every
import is downtime, and each path takes only the modules it uses.
"""

from __future__ import annotations

import errno
import os
import sys
import time

from .errors import VmmError

EXIT_VMM_ERROR = 1
EXIT_GUEST_CRASH = 2


def open_console(path: str | None):
    """The serial console's writer: a file opened for append, or stdout."""
    if not path:
        return None
    from .machine import FdConsole
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise VmmError(f"cannot open console file {path}: {e.strerror}") from None
    return FdConsole(fd)


#: What a cpr-exec's new image takes from its command line; the rest (--kernel,
#: --memory, --vcpus, --incoming ...) describes the machine, which comes from the state.
EXEC_OPTIONS = ("--console", "--qmp")
#: In a cpr-exec-command's dry run (before the stop), the entry point answers with this.
CHECK_ENV = "PYVMM_CPR_EXEC_CHECK"
CHECK_ANSWER = "pyvmm-cpr-exec-check:"
#: ... and the old pyvmm's version and protocol ("0.2.0 2"), so that a pyvmm that
#: cannot take a guest from it says so before the stop (vmm/compat.py).
CHECK_FROM_ENV = "PYVMM_CPR_EXEC_FROM"


def exec_overrides(argv: list[str]) -> dict:
    """--console/--qmp from a cpr-exec image's command line (without argparse: this
    runs inside the downtime), as absolute paths: {"console": ..., "qmp": ...}."""
    out = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in EXEC_OPTIONS:
            if not eq:
                i += 1
                if i >= len(argv):
                    raise VmmError(f"{name} needs a value")
                value = argv[i]
            out[name[2:]] = os.path.abspath(value)
        i += 1
    return out


def exec_entry(argv: list[str], t_python: int | None = None) -> int | None:
    """The first thing every pyvmm entry point does (`pyvmm`, `python -m vmm`): in the
    image a cpr-exec started (PYVMM_CPR_EXEC_STATE set) resume the guest, whatever
    the rest of the command line says; in a cpr-exec-command's dry run, answer.
    None: a plain start, go on to the CLI."""
    if CHECK_ENV in os.environ:
        return _answer_check(argv)
    from .cpr import EXEC_STATE_ENV
    if EXEC_STATE_ENV in os.environ:
        return resume_after_exec(t_python, argv)
    return None


def _answer_check(argv: list[str]) -> int:
    """The dry run of a cpr-exec-command: say who we are and what we would take over
    with, or why we could not (the old VMM refuses the update before the stop)."""
    from . import __version__
    from .compat import PROTOCOL, peer_problem
    try:
        version, _, protocol = os.environ.get(CHECK_FROM_ENV, "").partition(" ")
        why = peer_problem(version or None, int(protocol) if protocol.isdigit() else None)
        if why:
            raise VmmError(why)
        over = exec_overrides(argv)
        if over.get("console"):
            directory = os.path.dirname(over["console"])
            if not os.access(directory, os.W_OK | os.X_OK) or (
                    os.path.exists(over["console"]) and not os.access(over["console"], os.W_OK)):
                raise VmmError(f"cannot open console file {over['console']}: not writable")
        if over.get("qmp") and over["qmp"] != os.environ.get(CHECK_ENV):
            from .unix import someone_listens
            if os.path.exists(over["qmp"]) and someone_listens(over["qmp"]):
                raise VmmError(f"monitor socket {over['qmp']} is in use by a running process")
    except VmmError as e:
        print(f"{CHECK_ANSWER} error {e}")
        return EXIT_VMM_ERROR
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    fields = {"root": root, "python": os.path.realpath(sys.executable),
              "pyvmm": __version__, "protocol": PROTOCOL, **over}
    print(CHECK_ANSWER, "ok", *(f"{k}={v}" for k, v in fields.items()))
    return 0


def resume_after_exec(t_python: int | None = None, argv: list[str] | None = None) -> int:
    """Entry point of the new image in cpr-exec (PYVMM_CPR_EXEC_STATE is set);
    t_python: when the image ran its first line (CLOCK_MONOTONIC ns), for the trace;
    argv: the image's command line, for a new --console or --qmp."""
    from .cpr.target import exec_resume
    # The guest runs again before this image has imported its monitor (~25 ms of
    # imports here, under the GIL): hand the GIL to the vCPU thread's exits every
    # 0.2 ms instead of every 5 ms meanwhile, so the guest does not wait on them.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0002)
    try:
        try:
            overrides = exec_overrides(argv or [])
        except VmmError as e:   # (checked before the stop; never lose the guest over it)
            print(f"pyvmm: live update: ignoring the command line: {e}", file=sys.stderr)
            overrides = {}
        machine, config, fds, old_qmp, arrival = exec_resume(
            lambda cfg: open_console(cfg.get("console")), t_python, overrides)
        monitor = _start_exec_monitor(config, machine, fds.pop("qmp", None), old_qmp)
        sys.setswitchinterval(interval)
        from .cpr.target import write_state_file
        write_state_file(arrival)
        return serve(machine, config, monitor=monitor, arrival=arrival)
    except VmmError as e:
        print(f"pyvmm: error: live update failed in the new process: {e}", file=sys.stderr)
        return EXIT_VMM_ERROR


def _start_exec_monitor(config, machine, listen_fd, old_path):
    """After a cpr-exec: serve the inherited listening socket, or, when the command
    line named another --qmp path, bind that one and let the old one go (if the new
    path cannot be bound, keep serving the old one rather than lose the monitor)."""
    if listen_fd is None or not old_path or config.get("qmp") == old_path:
        return _start_monitor(config, machine, listen_fd=listen_fd)
    try:
        monitor = _start_monitor(config, machine)
    except VmmError as e:
        print(f"pyvmm: live update: {e}; the monitor stays on {old_path}", file=sys.stderr)
        config["qmp"] = old_path
        return _start_monitor(config, machine, listen_fd=listen_fd)
    os.close(listen_fd)
    from .unix import someone_listens
    try:
        if not someone_listens(old_path):
            os.unlink(old_path)
    except OSError:
        pass
    return monitor


def _start_monitor(config, machine, *, listen_fd=None, status="running", incoming=None,
                   on_exit=None):
    """A QMP monitor with its controller, or None without --qmp.  Waiting for a live
    update, `incoming` is what the controller reports and starts (migrate-incoming),
    and on_exit(code) is how quit ends the wait."""
    if not config.get("qmp"):
        return None
    from .control import Controller
    from .qmp.server import Monitor
    controller = Controller(machine, config=config, on_exit=on_exit)
    controller.status = status
    controller.incoming = incoming
    monitor = Monitor(config["qmp"], controller, listen_fd=listen_fd)
    controller.emit = monitor.emit
    controller.flush_events = monitor.flush
    controller.clients = monitor.client_count
    if incoming is not None:
        incoming.on_status = lambda status: monitor.emit("MIGRATION", {"status": status})
    monitor.start()
    return monitor, controller


def serve(machine, config, *, start=False, monitor=None, listen_fd=None, arrival=None) -> int:
    """Run until the guest exits, fails, is quit, or hands itself to a new pyvmm.
    `arrival`: how the guest came here in a live update (vmm.cpr.target.Arrival)."""
    if monitor is None:
        monitor = _start_monitor(config, machine, listen_fd=listen_fd)
    exit_request: list[int] = []
    if monitor:
        mon, controller = monitor
        controller.machine = machine
        controller.arrival = arrival
        controller.status = "running"
        if mon.listen_fd is not None:
            controller.extra_fds["qmp"] = mon.listen_fd

        def on_exit(code):
            exit_request.append(code)
            machine._done.set()
        controller.on_exit = on_exit
    stop_signal: list[int] = []

    def on_signal(signo, frame):
        stop_signal.append(signo)
        machine._done.set()

    import signal   # here, not at the top: the cpr-exec image resumes the guest first
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # A background job (`pyvmm run ... &` in a shell with job control) must never be
    # stopped by the terminal: reading it would raise SIGTTIN, writing it under
    # `stty tostop` SIGTTOU, and a stopped VMM freezes its guest.  Ignored, a read
    # fails with EIO and a write goes through; the stdin reader below reads the
    # terminal only while pyvmm is in its foreground.
    signal.signal(signal.SIGTTIN, signal.SIG_IGN)
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    start_stdin_reader(machine)
    try:
        if start:
            machine.start()
        while not machine.wait(0.5):
            pass
    finally:
        if monitor:
            monitor[0].close()
        machine.close()
    if stop_signal:
        return 128 + stop_signal[0]
    if exit_request:
        return exit_request[0]
    if machine.error is not None:
        first, _, dump = str(machine.error).partition("\n")
        print(f"pyvmm: error: {first}", file=sys.stderr)
        if dump:
            print(dump, file=sys.stderr)
        return EXIT_GUEST_CRASH
    return machine.exit_code or 0


def start_stdin_reader(machine) -> None:
    """Feed pyvmm's stdin to the guest's serial port (the UART's receive side).

    From a terminal, input is read only while pyvmm's process group is the
    terminal's foreground group: a VMM sent to the background (`&`, Ctrl-Z then
    `bg`) leaves what the user types to the shell, and takes it again after `fg`.
    """
    from .sync import Thread
    try:
        tty = os.isatty(0)
    except OSError:
        return

    def in_foreground() -> bool:
        try:
            return os.tcgetpgrp(0) == os.getpgrp()
        except OSError:
            return False

    serial = machine.device("serial").uart

    def pump():
        import select
        while True:
            if tty:
                try:
                    ready, _, _ = select.select([0], [], [], 0.25)
                except (OSError, ValueError):
                    return
                if not ready:
                    continue
                if not in_foreground():
                    time.sleep(0.25)     # the data is the shell's; look again later
                    continue
            try:
                data = os.read(0, 4096)
            except OSError as e:
                if tty and e.errno == errno.EIO:   # moved to the background meanwhile
                    time.sleep(0.25)
                    continue
                return
            if not data:
                return
            serial.enqueue_input(data)

    Thread(pump, name="stdin").start()
