"""What the QMP monitor drives: run state, stop/cont/quit, and live updates.

The monitor (vmm/qmp/) speaks the protocol; this controller holds the
policy: which run state the VM is in, which migration parameters are set, and
how a live update is started, reported and cancelled.

Imports inside methods are on purpose: a cpr-exec's new image imports this module
right after its guest runs again, and the live update's code or the summary
only when a command asks for them.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from .cpr import DOWNTIME_LIMIT_MS, resume_command
from .cpr.modes import DEFAULT_MODE, check_migrate_mode, check_settable_mode
from .cpr.timeline import timeline_info
from .errors import VmmError

MAX_DOWNTIME_LIMIT_MS = 2_000_000   # QEMU's range: 0 to 2000 seconds
HOLD_OFF_S = 0.1   # how long the monitor waits out a live update's stop (hold_off)


class Controller:
    """Binds a Machine to the monitor's commands."""

    def __init__(self, machine, *, config: dict | None = None, emit=None, on_exit=None):
        self.machine = machine
        self.config = config or {}
        self.emit = emit or (lambda name, data=None: None)
        self.on_exit = on_exit or (lambda code: None)
        self.clients = lambda: 0   # how many QMP clients are connected (the monitor's count)
        # The monitor's: sends what emit(..., wake=False) queued (None: no monitor)
        self.flush_events = None
        self.params = {"mode": DEFAULT_MODE, "cpr-exec-command": default_exec_command(),
                       "downtime-limit": DOWNTIME_LIMIT_MS, "max-bandwidth": 134217728,
                       "x-fault": [], "x-early-start": False}
        from .qmp.migration_args import MIGRATION_CAPABILITY_NAMES   # (QEMU 10's names)
        self.capabilities = {name: False for name in MIGRATION_CAPABILITY_NAMES}
        self.migration = None
        self.extra_fds: dict[str, int] = {}
        self.status = "running"
        self.exit_code = 0   # 1 once a live update failed past its point of no return
        self.incoming = None   # the Incoming a `pyvmm run --incoming` waits on
        self.arrival = None    # how the guest came here in a live update (cpr.target.Arrival)
        self._lock = threading.Lock()

    # -- run state --------------------------------------------------------------------------
    def query_status(self) -> dict:
        status = self.status
        arrived = getattr(self.incoming, "machine", None)
        if status == "inmigrate" and arrived is not None and arrived.running:
            # The guest runs here already: its source may have reported completed (our
            # RUNS/"running" went out) before this process finished taking it over.
            return {"status": "running", "running": True}
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
        self.on_exit(self.exit_code)

    # -- the machine, in QEMU's shapes (qapi/machine.json, qapi/misc.json) ---------------------
    def query_cpus_fast(self) -> list[dict]:
        tids = vcpu_thread_ids()
        return [{"cpu-index": i, "qom-path": f"/machine/unattached/device[{i}]",
                 "thread-id": tids.get(i, os.getpid()), "target": "x86_64",
                 "props": {"socket-id": 0, "die-id": 0, "module-id": 0, "core-id": i,
                           "thread-id": 0}}
                for i in range(len(self.machine.vcpus))]

    def query_name(self) -> dict:
        name = self.config.get("name")
        return {"name": name} if name else {}

    def query_kvm(self) -> dict:
        return {"enabled": True, "present": True}

    def query_memory_size_summary(self) -> dict:
        return {"base-memory": self.machine.memory.size, "plugged-memory": 0}

    def announce_self(self, params: dict) -> None:
        """QEMU's announce-self (qapi/net.json): RARP from each NIC's MAC on its tap,
        `rounds` times, `initial` ms from now, then every `step` ms (at most `max`), and
        the guest asked to announce itself where its driver negotiated GUEST_ANNOUNCE
        (vmm/migration/announce.py; what the destination of a migration does by itself)."""
        self._waiting()
        for key in ("initial", "max", "rounds", "step"):
            if not 0 <= params[key] <= 100_000:
                raise VmmError(f"announce-self: {key} must be 0 to 100000, "
                               f"got {params[key]}")
        from .migration.announce import announce
        interfaces = params.get("interfaces")
        known = [d.id for d in self.machine.devices if d.KIND == "net"]
        unknown = sorted(set(interfaces or ()) - set(known))
        if unknown:
            raise VmmError(f"announce-self: no NIC {', '.join(unknown)}: this VM has "
                           f"{', '.join(known) or 'none'}")
        announce(self.machine, initial=params["initial"] / 1000, rounds=params["rounds"],
                 step=min(params["step"], params["max"]) / 1000, interfaces=interfaces)

    def system_reset(self) -> None:
        raise VmmError("pyvmm cannot reset a guest in place (the toy guests' PVH entry state, "
                       "LAPIC, PIC and PIT would all have to be put back): quit it and start "
                       "it again")

    def system_powerdown(self) -> None:
        """QEMU presses the ACPI power button; pyvmm's ACPI tables have no FADT (no
        power button), so, as for a QEMU guest without one, the request is made and
        the guest does not react."""
        self.emit("POWERDOWN")

    # -- migration parameters -------------------------------------------------------------
    def set_migrate_parameters(self, params: dict) -> None:
        from .cpr.faults import parse
        if "mode" in params:
            check_settable_mode(params["mode"])
            self.params["mode"] = params["mode"]
        if "cpr-exec-command" in params:
            cmd = params["cpr-exec-command"]
            if not cmd or not all(isinstance(a, str) for a in cmd):
                raise VmmError("cpr-exec-command must be a non-empty list of strings")
            self.params["cpr-exec-command"] = list(cmd)
        if "x-early-start" in params:   # cpr-transfer: the guest runs before the device restore
            self.params["x-early-start"] = bool(params["x-early-start"])
        if "x-fault" in params:
            self.params["x-fault"] = sorted(parse(params["x-fault"]))
        if "downtime-limit" in params:   # the longest pause before a rollback (CPR.md)
            limit = params["downtime-limit"]
            if not 0 <= limit <= MAX_DOWNTIME_LIMIT_MS:
                raise VmmError("Parameter 'downtime_limit' expects an integer in the range "
                               "of 0 to 2000 seconds")
            self.params["downtime-limit"] = limit
        if "max-bandwidth" in params:    # a TCP migration's rate; CPR copies no RAM
            if params["max-bandwidth"] < 0:
                raise VmmError("Parameter 'max_bandwidth' expects an integer in the range "
                               "of 0 to 9223372036854775807 bytes/second")
            self.params["max-bandwidth"] = params["max-bandwidth"]

    def query_migrate_parameters(self) -> dict:
        return dict(self.params)

    # -- migration capabilities (QEMU's MigrationCapabilityStatus list) ---------------------
    def set_migrate_capabilities(self, caps: list[dict]) -> None:
        """Only `events` and `auto-converge` (a TCP migration's) do anything in pyvmm;
        turning another one on is refused (a tool relying on it must not be told it is
        on), turning it off is a no-op."""
        for cap in caps:
            name, state = cap["capability"], cap["state"]
            if state and name not in ("events", "auto-converge"):
                raise VmmError(f"pyvmm does not support the migration capability '{name}'")
        if self.migration is not None and not self.migration.done.is_set():
            raise VmmError("There's a migration process in progress")
        for cap in caps:
            self.capabilities[cap["capability"]] = cap["state"]

    def query_migrate_capabilities(self) -> list[dict]:
        return [{"capability": k, "state": v} for k, v in self.capabilities.items()]

    # -- live update --------------------------------------------------------------------------
    def migrate(self, main_addr: dict | None, cpr_addr: dict | None):
        """Check and set up the live update; returns the callable that starts it, which
        the monitor runs after its reply has been sent."""
        from .cpr.source import Migration
        from .migration import is_tcp
        self._waiting()
        with self._lock:
            if self.migration is not None and not self.migration.done.is_set():
                raise VmmError("a migration is already in progress")
            if self.status == "postmigrate":   # its state is stale: it must never run again
                raise VmmError("the guest has left this pyvmm (postmigrate): nothing to migrate")
            mode = self.params["mode"]
            if mode == DEFAULT_MODE and is_tcp(main_addr) and cpr_addr is None:
                if self.params["x-fault"]:
                    raise VmmError("x-fault arms CPR's fault points; a TCP migration has none")
                from .migration.sender import Outgoing
                self.migration = Outgoing(
                    self.machine, main_addr, downtime_limit_ms=self.params["downtime-limit"],
                    max_bandwidth=self.params["max-bandwidth"],
                    auto_converge=self.capabilities["auto-converge"],
                    emit=self._migration_event)
                return threading.Thread(target=self._run_migration, name="migration",
                                        daemon=True).start
            faults, self.params["x-fault"] = self.params["x-fault"], []   # for one update only
            check_migrate_mode(mode)
            path = None
            if mode == "cpr-exec":
                check_exec_channel(main_addr)
            if mode == "cpr-transfer":
                addr = cpr_addr or main_addr
                if not addr or addr.get("transport") != "socket" or addr.get("type") != "unix":
                    raise VmmError("cpr-transfer needs a unix socket channel "
                                   "(the new pyvmm's --incoming path)")
                path = addr["path"]
            self.migration = Migration(
                self.machine, mode, cpr_path=path,
                exec_command=self.params["cpr-exec-command"],
                faults=faults, emit=self._migration_event, main_addr=main_addr,
                extra_fds=self.extra_fds, config=self.config,
                downtime_limit_ms=self.params["downtime-limit"],
                early_start=self.params["x-early-start"])
        return threading.Thread(target=self._run_migration, name="migration", daemon=True).start

    def _migration_event(self, name: str, data=None) -> None:
        tcp = self.migration.mode == DEFAULT_MODE   # (a TCP migration runs the guest while
        if name == "MIGRATION":                     # "active": it stops it for "device")
            status = data["status"]
            if status == ("device" if tcp else "active"):
                self.status = "finish-migrate"
            elif status in ("failed", "cancelled") and self.migration.committed:
                self.status = "postmigrate"     # failed past "go": never resumed here
            elif status in ("failed", "cancelled"):
                self.status = "running" if self.machine.running else "paused"
            elif status == "completed":
                self.status = "postmigrate"
        if name in ("MIGRATION", "MIGRATION_PASS") and not self.capabilities["events"]:
            return                                 # QEMU: both only with events on
        settled = getattr(self.migration, "settled", None)
        if settled is not None and not settled.is_set() and self.flush_events is not None:
            self.emit(name, data, wake=False)      # sent when it settles (_run_migration)
        else:
            self.emit(name, data)

    def _run_migration(self) -> None:
        left = self.migration.run()
        if self.flush_events is not None:
            self.flush_events()   # the events queued inside the downtime (_migration_event)
        if left:
            # The guest left this process.  As QEMU's after cpr-transfer, this one stays
            # in postmigrate (query-migrate says completed, or failed past "go"; cont is
            # refused) while a QMP client is connected, until it sends quit; with nobody
            # connected it exits (pyvmm's own tools and a shell's `wait` see the old VMM end).
            if self.migration.status != "completed":
                self._failed_after_go()
            if getattr(self.migration, "stays", False):
                return   # a TCP migration's source stays paused in postmigrate until quit
            while self.clients() > 0 and not self.machine.done:
                time.sleep(0.05)
            self.on_exit(self.exit_code)

    def _failed_after_go(self) -> None:
        """The guest left with "go", and the new VMM never said it runs it: a failure an
        orchestrator must see (exit status 1, one line on stderr, query-migrate failed)."""
        self.exit_code = 1
        print(f"pyvmm: error: live update failed {self.migration.error}", file=sys.stderr,
              flush=True)

    def migrate_incoming(self, main_addr: dict) -> None:
        """QMP migrate-incoming on a `--incoming defer` VMM: start receiving."""
        if self.incoming is None or self.status != "inmigrate":
            raise VmmError("'-incoming' was not specified on the command line")
        self.incoming.start(main_addr)

    def query_migrate(self) -> dict:
        if self.migration is not None:
            return self.migration.info()
        # (the incoming side's own, until serve() hands it over: its status can say
        # "completed" a moment before, and a client must then see the whole timeline)
        arrival = self.arrival or getattr(self.incoming, "arrival", None)
        if hasattr(arrival, "info"):   # a TCP migration's (vmm/migration/receiver.py)
            return arrival.info()
        if arrival is None:
            if hasattr(self.incoming, "info"):
                return self.incoming.info()
            status = self.incoming.status if self.incoming is not None else "none"
            return {} if status == "none" else {"status": status}
        info = timeline_info(arrival.timeline, arrival.mode)
        if arrival.peer_threads is not None:
            info["x-peer-threads-at-transfer"] = arrival.peer_threads
        return info

    def hold_off(self) -> None:
        """Called by the monitor before it serves anything: while a live update has the
        guest stopped (here, or arriving here), wait for that to end, at most
        HOLD_OFF_S.  QEMU's monitor waits for its big lock the same way.  A client
        polling query-migrate every few ms would otherwise take the GIL from the
        update inside its downtime (measured: +0.7 ms at the median of a
        cpr-transfer polled every 5 ms).  The bound keeps migrate_cancel working
        when a stop lasts long (a slow new VMM)."""
        for side in (self.migration, self.incoming):
            settled = getattr(side, "settled", None)
            if settled is not None and not settled.is_set():
                settled.wait(HOLD_OFF_S)

    def migrate_cancel(self) -> None:
        if self.migration is not None:
            self.migration.cancel()

    # -- teaching view -----------------------------------------------------------------------
    def query_state(self) -> dict:
        from .summary import machine_summary
        self._waiting()
        return machine_summary(self.machine)


def vcpu_thread_ids() -> dict[int, int]:
    """{vCPU index: host thread id}, from the vCPU threads' names (vcpuN)."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if comm.startswith("vcpu") and comm[4:].isdigit():
            out[int(comm[4:])] = int(tid)
    return out


def check_exec_channel(addr: dict | None) -> None:
    """cpr-exec's main channel: `exec:` (pyvmm's own: the state crosses the exec in a
    memfd) or QEMU's recipe, `file:PATH` (the state crosses in the memfd too, and the
    new image writes it to PATH once the guest runs: pyvmm's blob, not QEMU's stream).
    Anything else would be silently ignored, so it is refused."""
    if addr is None:
        return
    if addr.get("transport") == "file":
        if addr.get("offset", 0) < 0:
            raise VmmError("file: offset must not be negative")
        return
    if addr.get("transport") == "exec" and addr.get("args") in ([], ["/bin/sh", "-c", ""]):
        return
    raise VmmError("cpr-exec takes the state across the exec: give the migration URI "
                   "'file:PATH' (written once the new image runs) or 'exec:', not "
                   f"{addr.get('transport')}")


def default_exec_command() -> list[str]:
    """See vmm.cpr.resume_command (the lean start of a cpr-exec image)."""
    return resume_command()
