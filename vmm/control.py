"""What the QMP monitor drives: run state, stop/cont/quit, and live updates.

The monitor (vmm/monitor.py) speaks the protocol; this controller holds the
policy: which run state the VM is in, which migration parameters are set, and
how a live update is started, reported and cancelled.
"""

from __future__ import annotations

import threading

from .cpr import resume_command
from .cpr.timeline import timeline_info
from .errors import VmmError


class Controller:
    """Binds a Machine to the monitor's commands."""

    def __init__(self, machine, *, config: dict | None = None, emit=None, on_exit=None):
        self.machine = machine
        self.config = config or {}
        self.emit = emit or (lambda name, data=None: None)
        self.on_exit = on_exit or (lambda code: None)
        self.params = {"mode": "normal", "cpr-exec-command": default_exec_command(),
                       "downtime-limit": 300, "max-bandwidth": 134217728, "x-fault": []}
        self.migration = None
        self.extra_fds: dict[str, int] = {}
        self.status = "running"
        self.incoming = None   # the Incoming a `pyvmm run --incoming` waits on
        self._lock = threading.Lock()

    # -- run state --------------------------------------------------------------------------
    def query_status(self) -> dict:
        status = self.status
        if status in ("running", "paused"):
            status = "running" if self.machine.running else "paused"
        return {"status": status, "running": status == "running"}

    def _waiting(self) -> None:
        """QEMU's refusal for what needs a guest while none has arrived yet."""
        if self.machine is None:
            raise VmmError("Guest is waiting for an incoming migration")

    def stop(self) -> None:
        self._waiting()
        if self.machine.running:
            self.machine.pause()
            self.emit("STOP")

    def cont(self) -> None:
        if self.status in ("inmigrate", "finish-migrate", "postmigrate"):
            raise VmmError(f"cannot continue: the VM is in state {self.status}")
        if not self.machine.running:
            self.machine.resume()
            self.emit("RESUME")

    def quit(self) -> None:
        self.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
        self.on_exit(0)

    # -- migration parameters -------------------------------------------------------------
    def set_migrate_parameters(self, params: dict) -> None:
        from .cpr.faults import parse
        if "mode" in params:
            if params["mode"] not in ("normal", "cpr-transfer", "cpr-exec"):
                raise VmmError(f"migration mode {params['mode']!r} is not supported by pyvmm: "
                               "use cpr-transfer or cpr-exec")
            self.params["mode"] = params["mode"]
        if "cpr-exec-command" in params:
            cmd = params["cpr-exec-command"]
            if not cmd or not all(isinstance(a, str) for a in cmd):
                raise VmmError("cpr-exec-command must be a non-empty list of strings")
            self.params["cpr-exec-command"] = list(cmd)
        if "x-fault" in params:
            self.params["x-fault"] = sorted(parse(params["x-fault"]))
        for key in ("downtime-limit", "max-bandwidth"):   # accepted; CPR copies no RAM
            if key in params:
                self.params[key] = params[key]

    def query_migrate_parameters(self) -> dict:
        return dict(self.params)

    # -- live update --------------------------------------------------------------------------
    def migrate(self, main_addr: dict | None, cpr_addr: dict | None, detach: bool = True):
        """Check and set up the live update; returns the callable that starts it, which
        the monitor runs after its reply has been sent."""
        from .cpr.source import Migration
        self._waiting()
        with self._lock:
            if self.migration is not None and not self.migration.done.is_set():
                raise VmmError("a migration is already in progress")
            mode = self.params["mode"]
            faults, self.params["x-fault"] = self.params["x-fault"], []   # for one update only
            if mode == "normal":
                raise VmmError("pyvmm only does CPR: first set the mode with "
                               "migrate-set-parameters mode=cpr-transfer or mode=cpr-exec")
            path = None
            if mode == "cpr-transfer":
                addr = cpr_addr or main_addr
                if not addr or addr.get("transport") != "socket" or addr.get("type") != "unix":
                    raise VmmError("cpr-transfer needs a unix socket channel "
                                   "(the new pyvmm's --incoming path)")
                path = addr["path"]
            self.migration = Migration(
                self.machine, mode, cpr_path=path,
                exec_command=self.params["cpr-exec-command"],
                faults=faults, emit=self._migration_event,
                extra_fds=self.extra_fds, config=self.config)
        return threading.Thread(target=self._run_migration, name="migration", daemon=True).start

    def _migration_event(self, name: str, data=None) -> None:
        if name == "MIGRATION":
            status = data["status"]
            if status == "active":
                self.status = "finish-migrate"
            elif status in ("failed", "cancelled"):
                self.status = "running" if self.machine.running else "paused"
            elif status == "completed":
                self.status = "postmigrate"
        self.emit(name, data)

    def _run_migration(self) -> None:
        if self.migration.run():
            self.on_exit(0)     # the new VMM runs the guest: this one is done

    def migrate_incoming(self, main_addr: dict) -> None:
        """QMP migrate-incoming on a `--incoming defer` VMM: start receiving."""
        if self.incoming is None or self.status != "inmigrate":
            raise VmmError("'-incoming' was not specified on the command line")
        self.incoming.start(main_addr)

    def query_migrate(self) -> dict:
        if self.migration is not None:
            return self.migration.info()
        tl = self.machine.cpr_timeline if self.machine is not None else None
        if tl is None:
            status = self.incoming.status if self.incoming is not None else "none"
            return {} if status == "none" else {"status": status}
        info = timeline_info(tl, self.machine.cpr_mode)
        peer = getattr(self.machine, "cpr_peer_threads", None)
        if peer is not None:
            info["x-peer-threads-at-transfer"] = peer
        return info

    def migrate_cancel(self) -> None:
        if self.migration is not None:
            self.migration.cancel()

    # -- teaching view -----------------------------------------------------------------------
    def query_state(self) -> dict:
        from .inspect import machine_summary
        self._waiting()
        return machine_summary(self.machine)


def default_exec_command() -> list[str]:
    """See vmm.cpr.resume_command (the lean start of a cpr-exec image)."""
    return resume_command()
