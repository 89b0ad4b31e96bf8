"""Running a machine until it is done, and resuming one after a cpr-exec.

Kept apart from the CLI so that the image a cpr-exec starts imports only what
it needs to get the guest running again (no argparse); the monitor is started
after the guest runs.
"""

from __future__ import annotations

import os
import sys

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


def resume_after_exec(t_python: int | None = None) -> int:
    """Entry point of the new image in cpr-exec (PYVMM_CPR_EXEC_STATE is set);
    t_python: when the image ran its first line (CLOCK_MONOTONIC ns), for the trace."""
    from .cpr.target import exec_resume
    # The guest runs again before this image has imported its monitor (~25 ms of
    # imports here, under the GIL): hand the GIL to the vCPU thread's exits every
    # 0.2 ms instead of every 5 ms meanwhile, so the guest does not wait on them.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0002)
    try:
        machine, config, fds = exec_resume(lambda cfg: open_console(cfg.get("console")),
                                           t_python)
        monitor = _start_monitor(config, machine, listen_fd=fds.pop("qmp", None))
        sys.setswitchinterval(interval)
        return serve(machine, config, monitor=monitor)
    except VmmError as e:
        print(f"pyvmm: error: live update failed in the new process: {e}", file=sys.stderr)
        return EXIT_VMM_ERROR


def _start_monitor(config, machine, *, listen_fd=None, status="running", incoming=None,
                   on_exit=None):
    """A QMP monitor with its controller, or None without --qmp.  Waiting for a live
    update, `incoming` is what the controller reports and starts (migrate-incoming),
    and on_exit(code) is how quit ends the wait."""
    if not config.get("qmp"):
        return None
    from .control import Controller
    from .monitor import Monitor
    controller = Controller(machine, config=config, on_exit=on_exit)
    controller.status = status
    controller.incoming = incoming
    monitor = Monitor(config["qmp"], controller, listen_fd=listen_fd)
    controller.emit = monitor.emit
    if incoming is not None:
        incoming.on_status = lambda status: monitor.emit("MIGRATION", {"status": status})
    monitor.start()
    return monitor, controller


def serve(machine, config, *, start=False, monitor=None, listen_fd=None) -> int:
    """Run until the guest exits, fails, is quit, or hands itself to a new pyvmm."""
    if monitor is None:
        monitor = _start_monitor(config, machine, listen_fd=listen_fd)
    exit_request: list[int] = []
    if monitor:
        mon, controller = monitor
        controller.machine = machine
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
    """Feed pyvmm's stdin to the guest's serial port (the UART's receive side)."""
    from .sync import Thread

    def pump():
        while True:
            try:
                data = os.read(0, 4096)
            except OSError:
                return
            if not data:
                return
            machine.serial.enqueue_input(data)

    Thread(pump, name="stdin").start()
