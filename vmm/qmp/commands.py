"""The QMP command table: what a request means, and the reply it gets.

Every command that touches the machine calls a method of a duck-typed
*controller* (vmm/control.py's, or a test's); a controller that lacks a method
simply does not have that command (CommandNotFound, and it is left out of
query-commands).  Arguments are checked here, with QEMU's wording, before the
controller sees them.  docs/QMP.md lists the commands.
"""

from __future__ import annotations

from .. import __version__
from ..cpr.modes import MIGRATION_MODES
from ..errors import VmmError
from ..log import get_logger, log_safely
from .args import CommandError, check_args, check_enum, check_str_list, check_type
from .migration_args import (check_capabilities, check_channels, check_faults, incoming_channel,
                             migrate_channels)

log = get_logger(__name__)   # (importing logging costs ~9 ms, after a cpr-exec too)

QEMU_VERSION = {"major": 10, "minor": 2, "micro": 0}


def greeting() -> dict:
    """What a client gets on connect: QEMU's greeting, naming the QMP dialect pyvmm follows."""
    return {"QMP": {"version": {"qemu": dict(QEMU_VERSION), "package": f"pyvmm {__version__}"},
                    "capabilities": ["oob"]}}


def error_reply(desc: str, error_class: str = "GenericError") -> dict:
    return {"error": {"class": error_class, "desc": desc}}


class Command:
    """One QMP command: argument spec, the handler, and the controller
    method it needs (None when the monitor handles it alone)."""

    def __init__(self, name, handler, spec=None, needs=None, after_reply=False):
        self.name = name
        self.handler = handler   # handler(session, args)
        self.spec = spec or {}
        self.needs = needs
        # Run the controller call after the reply has gone out (quit: the
        # process may be gone before it could answer otherwise).
        self.after_reply = after_reply


def _check_enable(value, name):
    """qmp_capabilities' `enable`: a list of capabilities, of which only "oob" exists."""
    return [check_enum(x, ("oob",), f"{name}[{i}]")
            for i, x in enumerate(check_type(value, list, name))]


class Commands:
    """The commands a monitor serves with `controller`, and how one request runs.

    A *session* is a client's QMP state: its `negotiated` and `oob` flags.
    """

    def __init__(self, controller):
        self.controller = controller
        self._table = {c.name: c for c in self._make_table()}

    def handle(self, session, request) -> tuple[dict, object]:
        """Run one request: (the reply, a callable to run once it is sent, or None)."""
        reply = {}
        after = None
        try:
            after = self._dispatch(session, request, reply)
        except CommandError as e:
            reply = error_reply(e.desc, e.error_class)
        except Exception as e:  # a controller failed: report, keep serving
            if not isinstance(e, VmmError):
                log_safely(log, "error", "QMP command failed", exc_info=True)
            reply = error_reply(str(e) or type(e).__name__, "GenericError")
        if isinstance(request, dict) and "id" in request:
            reply["id"] = request["id"]
        return reply, after

    def _has(self, cmd: Command) -> bool:
        return not cmd.needs or callable(getattr(self.controller, cmd.needs, None))

    def _dispatch(self, session, request, reply):
        """Run one request; fill reply["return"], or raise CommandError."""
        if not isinstance(request, dict):
            raise CommandError("QMP input must be a JSON object")
        exec_key = None
        for key, value in request.items():
            if key == "execute" or (key == "exec-oob" and session.oob):
                if not isinstance(value, str):
                    raise CommandError(f"QMP input member '{key}' must be a string")
                if exec_key:
                    raise CommandError(f"QMP input member '{key}' clashes with '{exec_key}'")
                exec_key = key
            elif key == "arguments":
                if not isinstance(value, dict):
                    raise CommandError("QMP input member 'arguments' must be an object")
            elif key != "id":
                raise CommandError(f"QMP input member '{key}' is unexpected")
        if exec_key is None:
            raise CommandError("QMP input lacks member 'execute'")
        name = request[exec_key]
        cmd = self._table.get(name)
        if not session.negotiated and name != "qmp_capabilities":
            raise CommandError("Expecting capabilities negotiation with 'qmp_capabilities'",
                               "CommandNotFound")
        if cmd is None or not self._has(cmd):
            raise CommandError(f"The command {name} has not been found", "CommandNotFound")
        if exec_key == "exec-oob":
            raise CommandError(f"The command {name} does not support OOB")
        args = check_args(request.get("arguments", {}), cmd.spec)
        if cmd.after_reply:
            reply["return"] = {}
            return lambda: cmd.handler(session, args)
        result = cmd.handler(session, args)
        if callable(result):
            # The controller wants work done once the reply is out (migrate: a
            # cpr-exec may replace this process before the reply could be sent).
            reply["return"] = {}
            return result
        reply["return"] = {} if result is None else result
        return None

    def _make_table(self):
        ctl = lambda: self.controller  # noqa: E731  (looked up per call)
        return [
            Command("qmp_capabilities", self._qmp_capabilities,
                    {"enable": (_check_enable, False)}),
            Command("query-version", lambda s, a: greeting()["QMP"]["version"]),
            Command("query-commands", self._query_commands),
            Command("query-status", lambda s, a: ctl().query_status(), needs="query_status"),
            Command("stop", lambda s, a: ctl().stop(), needs="stop"),
            Command("cont", lambda s, a: ctl().cont(), needs="cont"),
            Command("quit", lambda s, a: ctl().quit(), needs="quit", after_reply=True),
            Command("migrate-set-parameters", lambda s, a: ctl().set_migrate_parameters(a),
                    {"mode": (tuple(MIGRATION_MODES), False),
                     "cpr-exec-command": (check_str_list, False),
                     "downtime-limit": (int, False),
                     "max-bandwidth": (int, False),
                     "x-fault": (check_faults, False),
                     "x-early-start": (bool, False)},
                    needs="set_migrate_parameters"),
            Command("query-migrate-parameters", lambda s, a: ctl().query_migrate_parameters(),
                    needs="query_migrate_parameters"),
            Command("migrate-set-capabilities",
                    lambda s, a: ctl().set_migrate_capabilities(a["capabilities"]),
                    {"capabilities": (check_capabilities, True)},
                    needs="set_migrate_capabilities"),
            Command("query-migrate-capabilities",
                    lambda s, a: ctl().query_migrate_capabilities(),
                    needs="query_migrate_capabilities"),
            Command("migrate", self._migrate,
                    {"uri": (str, False), "channels": (check_channels, False),
                     "detach": (bool, False), "resume": (bool, False)},
                    needs="migrate"),
            Command("migrate-incoming", self._migrate_incoming,
                    {"uri": (str, False), "channels": (check_channels, False),
                     "exit-on-error": (bool, False)},
                    needs="migrate_incoming"),
            Command("query-migrate", lambda s, a: ctl().query_migrate(), needs="query_migrate"),
            Command("migrate_cancel", lambda s, a: ctl().migrate_cancel(),
                    needs="migrate_cancel"),
            Command("x-query-state", lambda s, a: ctl().query_state(), needs="query_state"),
            Command("query-cpus-fast", lambda s, a: ctl().query_cpus_fast(),
                    needs="query_cpus_fast"),
            Command("query-name", lambda s, a: ctl().query_name(), needs="query_name"),
            Command("query-kvm", lambda s, a: ctl().query_kvm(), needs="query_kvm"),
            Command("query-memory-size-summary",
                    lambda s, a: ctl().query_memory_size_summary(),
                    needs="query_memory_size_summary"),
            Command("announce-self", lambda s, a: ctl().announce_self(a),
                    {"initial": (int, True), "max": (int, True), "rounds": (int, True),
                     "step": (int, True), "interfaces": (check_str_list, False),
                     "id": (str, False)},
                    needs="announce_self"),
            Command("system_reset", lambda s, a: ctl().system_reset(), needs="system_reset"),
            Command("system_powerdown", lambda s, a: ctl().system_powerdown(),
                    needs="system_powerdown"),
        ]

    def _qmp_capabilities(self, session, args):
        if session.negotiated:
            raise CommandError("Capabilities negotiation is already complete, command ignored",
                               "CommandNotFound")
        session.oob = "oob" in args.get("enable", [])
        session.negotiated = True

    def _query_commands(self, session, args):
        return [{"name": c.name} for c in self._table.values() if self._has(c)]

    def _migrate(self, session, args):
        if args.get("resume"):
            raise CommandError("pyvmm does not support postcopy recovery (resume)")
        main, cpr = migrate_channels(args)
        started = self.controller.migrate(main, cpr)   # (detach: accepted, as QEMU ignores it)
        return started if callable(started) else {}

    def _migrate_incoming(self, session, args):
        main = incoming_channel(args)
        if args.get("exit-on-error") is False:
            raise CommandError("pyvmm always exits when an incoming live update fails "
                               "(exit-on-error must be true)")
        self.controller.migrate_incoming(main)
