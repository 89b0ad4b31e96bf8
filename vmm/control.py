"""What the QMP monitor drives: run state, stop/cont/quit, and live updates.

The monitor (vmm/monitor.py) speaks the protocol; this controller holds the
policy: which run state the VM is in, which migration parameters are set, and
how a live update is started, reported and cancelled.
"""

from __future__ import annotations

import sys
import threading

from .cpr import DOWNTIME_LIMIT_MS, resume_command
from .cpr.timeline import timeline_info
from .errors import VmmError

# After a failure past the point of no return the old VMM still answers QMP (query-migrate:
# failed, with error-desc) until quit, or for this long, then exits with status 1.
LOST_LINGER_S = 10.0
MAX_DOWNTIME_LIMIT_MS = 2_000_000   # QEMU's range: 0 to 2000 seconds


class Controller:
    """Binds a Machine to the monitor's commands."""

    def __init__(self, machine, *, config: dict | None = None, emit=None, on_exit=None):
        self.machine = machine
        self.config = config or {}
        self.emit = emit or (lambda name, data=None: None)
        self.on_exit = on_exit or (lambda code: None)
        self.params = {"mode": "normal", "cpr-exec-command": default_exec_command(),
                       "downtime-limit": DOWNTIME_LIMIT_MS, "max-bandwidth": 134217728,
                       "x-fault": []}
        self.migration = None
        self.extra_fds: dict[str, int] = {}
        self.status = "running"
        self.exit_code = 0   # 1 once a live update failed past its point of no return
        self._lock = threading.Lock()

    # -- run state --------------------------------------------------------------------------
    def query_status(self) -> dict:
        status = self.status
        if status in ("running", "paused"):
            status = "running" if self.machine.running else "paused"
        return {"status": status, "running": status == "running"}

    def stop(self) -> None:
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
        self.on_exit(self.exit_code)

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
        if "downtime-limit" in params:   # the longest pause before a rollback (CPR.md)
            limit = params["downtime-limit"]
            if not 0 <= limit <= MAX_DOWNTIME_LIMIT_MS:
                raise VmmError("Parameter 'downtime_limit' expects an integer in the range "
                               "of 0 to 2000 seconds")
            self.params["downtime-limit"] = limit
        if "max-bandwidth" in params:    # accepted; CPR copies no RAM
            self.params["max-bandwidth"] = params["max-bandwidth"]

    def query_migrate_parameters(self) -> dict:
        return dict(self.params)

    # -- live update --------------------------------------------------------------------------
    def migrate(self, main_addr: dict | None, cpr_addr: dict | None, detach: bool = True):
        """Check and set up the live update; returns the callable that starts it, which
        the monitor runs after its reply has been sent."""
        from .cpr.source import Migration
        with self._lock:
            if self.migration is not None and not self.migration.done.is_set():
                raise VmmError("a migration is already in progress")
            if self.status == "postmigrate":   # its state is stale: it must never run again
                raise VmmError("the guest has left this pyvmm (postmigrate): nothing to migrate")
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
                extra_fds=self.extra_fds, config=self.config,
                downtime_limit_ms=self.params["downtime-limit"])
        return threading.Thread(target=self._run_migration, name="migration", daemon=True).start

    def _migration_event(self, name: str, data=None) -> None:
        if name == "MIGRATION":
            status = data["status"]
            if status == "active":
                self.status = "finish-migrate"
            elif status in ("failed", "cancelled") and self.migration.committed:
                self.status = "postmigrate"     # failed past "go": never resumed here
            elif status in ("failed", "cancelled"):
                self.status = "running" if self.machine.running else "paused"
            elif status == "completed":
                self.status = "postmigrate"
        self.emit(name, data)

    def _run_migration(self) -> None:
        if self.migration.run():
            if self.migration.status != "completed":
                self._failed_after_go()
            self.on_exit(self.exit_code)  # the guest left this process: this one is done

    def _failed_after_go(self) -> None:
        """The guest left with "go", and the new VMM never said it runs it: a failure an
        orchestrator must see (status 1, one line on stderr, query-migrate failed while
        this process still answers, until quit or LOST_LINGER_S)."""
        self.exit_code = 1
        print(f"pyvmm: error: live update failed {self.migration.error}", file=sys.stderr,
              flush=True)
        self.machine.wait(LOST_LINGER_S)

    def query_migrate(self) -> dict:
        if self.migration is not None:
            return self.migration.info()
        tl = self.machine.cpr_timeline if self.machine is not None else None
        if tl is None:
            return {}
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
        return machine_summary(self.machine)


def default_exec_command() -> list[str]:
    """See vmm.cpr.resume_command (the lean start of a cpr-exec image)."""
    return resume_command()
