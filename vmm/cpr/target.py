"""The new VMM's side of a live update.

cpr-transfer: `pyvmm run --incoming cpr-transfer:PATH` listens on PATH.  The
old VMM connects *before* it stops its guest and passes the RAM memfd and the
machine's shape; we map RAM, create the KVM VM, its memory slots and vCPUs
(the slow part, off the downtime) and say "prepared".  After the stop the
state blob and device fds arrive; we restore, say "restored", and resume the
guest when the old VMM says "go".  Until "go", the old VMM may still roll
back, so nothing here may touch a device before it.

cpr-exec: the same process image is replaced; the state memfd's number is in
PYVMM_CPR_EXEC_STATE and every passed fd is listed in the state.  We mark them
close-on-exec again at once, so no fd leaks into whatever we exec later.

Imports are inside the functions on purpose: in the cpr-exec image this module
is the resume path, and every import there is downtime.
"""

from __future__ import annotations

import gc
import os

from .. import state as state_format
from ..errors import VmmError
from ..memory import GuestMemory
from ..state import read_memfd
from . import (EXEC_STATE_ENV, EXEC_T_ENV, FALLBACK_ENV, HOLDER_ENV, RECORD_PEER_ENV,
               resume_command)
from .faults import Faults
from .timeline import Timeline


# The handoff thread's step (its own lane in `pyvmm cpr --trace`: it runs beside ours).
HANDOFF_STEP = "handoff: VM and vCPU state written (a thread of the new pyvmm, in C)"
EARLY_STEP = ("handoff: VM and vCPU state written, the guest runs (the early start: "
              "a thread of the new pyvmm, in C)")


def map_ram(shape: dict, ram_fd: int, address: int = 0) -> GuestMemory:
    """The old VMM's RAM memfd, mapped here (or, with `address`, already mapped)."""
    mem = shape["memory"]
    return GuestMemory.from_fd(ram_fd, mem["size"], name=mem.get("name", "pyvmm-ram"),
                               hugetlb=mem.get("hugetlb", False), address=address)


def build_machine(shape: dict, ram_fd: int, config: dict, console=None, *, memory=None,
                  kvm_parts=None):
    """An empty machine of the given shape on the old VMM's RAM (created, not started)."""
    from ..machine import Machine, MachineConfig

    mem = shape["memory"]
    cfg = MachineConfig(kernel=shape.get("kernel"), memory=mem["size"],
                        cmdline=shape.get("cmdline", ""), vcpus=shape["vcpus"],
                        hugetlb=mem.get("hugetlb", False), console=console)
    if memory is None:
        memory = map_ram(shape, ram_fd)
    machine = Machine(cfg)
    machine.create(memory=memory, cpuids=shape["cpuid"], restoring=True, kvm_parts=kvm_parts)
    # Everything that does not need the saved state happens now, before the old VMM
    # stops its guest: vCPU threads exist and wait parked; device code is imported.
    machine.start(paused=True)
    from ..devices import device_class
    for kind in shape.get("devices", ()):
        device_class(kind)
    return machine


def warm_up(machine, shape: dict) -> None:
    """Run the restore path once before the guest stops, on the new empty VM (its own
    state written back through the blob encoder, the decoder and the schema check of a
    whole saved tree, and throwaway devices of the shape's kinds): a first run in a
    fresh process is the slow one (the cold schema check alone took ~5 ms), and the
    real one runs inside the downtime.  cpr-transfer's and a TCP migration's
    destinations both do it."""
    own = machine.save_state()
    machine.restore_state(state_format.loads(state_format.dumps(own), "saved"),
                          advance_time=False)
    machine.warm_up_restore(shape.get("devices", ()))


def warm_up_empty(kinds) -> None:
    """build_machine() and warm_up() once on a throwaway 2 MiB machine with devices of
    these kinds, then tear it down: a destination that does it while it waits for
    the source builds the real machine in 3-6 ms instead of 6-14 ms (its first run
    imports and first-uses everything; docs/MIGRATION.md), and that build is part of
    the migration's setup time."""
    from ..machine import Machine, MachineConfig
    from ..memory import MIN_RAM, GuestMemory
    model = Machine(MachineConfig(kernel=None, memory=MIN_RAM))
    try:
        model.create()
        shape = model.shape()
    finally:
        model.close()
    shape["devices"] = sorted(set(shape["devices"]) | set(kinds))
    memory = GuestMemory(MIN_RAM)
    try:
        machine = build_machine(shape, -1, {}, memory=memory)
    except BaseException:
        memory.close()
        raise
    try:
        warm_up(machine, shape)
    finally:
        machine.close()   # (and its memory)


def restore(machine, state: dict, fds: dict[str, int]) -> None:
    """Write the saved state into the machine and re-own its devices (not resumed yet)."""
    machine.restore_state(state)
    machine.restore_devices(state, fds)


class Arrival:
    """How the guest came to this VMM (for query-migrate): the update's mode, its
    timeline (the old VMM's marks and steps, then ours), the old VMM's threads at
    fd receipt (when PYVMM_CPR_RECORD_PEER asked), and the file:PATH to write the
    state to once the guest runs (QEMU's `migrate uri=file:`), as (path, offset, blob)."""

    def __init__(self, mode: str, timeline, peer_threads=None, state_file=None):
        self.mode = mode
        self.timeline = timeline
        self.peer_threads = peer_threads
        self.state_file = state_file


def resume_guest(machine, state: dict, timeline, t_transfer, early=None,
                 who: str = "new image") -> None:
    """The tail both modes share, in the new VMM: the old VMM's marks and steps go
    before ours (with its transfer time), the devices and then the vCPUs run again
    (a guest paused in the old VMM stays paused), and "resume" is marked when the
    last vCPU is back in the guest.  The garbage collector, paused when the
    downtime began here (a collection of the fresh state tree costs ~1 ms), runs
    again from then on.

    `early`: the cpr-exec prebuilder (a vmm.cpr.prebuild.Prebuilt) or cpr-transfer's
    handoff thread (a vmm.cpr.handoff.Waiter) runs the vCPUs already; our vCPU
    threads take them over once the devices are back, and the guest ran again
    ("resume") when the last early thread went into it.  `who`: the steps' prefix."""
    cpr = state["cpr"]
    sent = [] if any(m[0] == "transfer" for m in cpr["timeline"]) else [["transfer", t_transfer]]
    timeline.marks = cpr["timeline"] + sent + timeline.marks   # (the early start's: marked)
    timeline.steps = cpr.get("steps", []) + timeline.steps
    machine.resume_devices()
    for addr, data in cpr.get("mmio_writes", ()):   # (prebuild.Prebuilt.capture_early)
        machine.mmio_bus.write(addr, data)
    if early is not None:
        timeline.step(f"{who}: devices running; the early vCPU threads are stopped now")
        t_early, handed, ring = machine.take_over_early(early)
        through = "" if ring is None else f", {ring} console bytes through their coalesced ring"
        timeline.step(f"{who}: early vCPU threads stopped ({handed} exits for Python "
                      f"handed over{through})")
        machine.resume()
        timeline.step(f"{who}: Python's vCPU threads run the guest", machine.wait_entered())
        from ..kvm.ffi import lib
        lib.pyvmm_early_reap()   # (the early threads, stopped: joined now, off the pause)
        timeline.mark("resume", t_early)
    elif cpr.get("running", True):
        machine.resume()
        timeline.mark("resume", machine.wait_entered())
    else:
        timeline.mark("resume")
    gc.enable()


class IncomingAborted(VmmError):
    """The wait for the old VMM was ended here (quit, or a signal) before "go"."""


_FILE_HELP = ("pyvmm keeps no migration stream in files: a cpr-exec's new image finds its "
              "state in the environment (PYVMM_CPR_EXEC_STATE), and there is none here. "
              "To receive a live update from another pyvmm use --incoming cpr-transfer:PATH "
              "or QEMU's cpr channel")


def parse_incoming(values: list[str]) -> tuple[str | None, bool]:
    """QEMU's -incoming, given once or twice: (the path to listen on now, deferred).

    Each value is a channel in QEMU's JSON form (`{"channel-type": "main"|"cpr",
    "addr": MigrationAddress}`), `defer` (the main channel comes later, from QMP
    migrate-incoming), a URI (QEMU's main channel: unix:PATH, file:PATH, tcp:...)
    or pyvmm's own cpr-transfer:PATH (a cpr channel on a unix socket).  The
    monitor's address checks do the validating, so the CLI and QMP agree.

    pyvmm carries everything (fds and device state) over one socket: the cpr
    channel's if there is one (a main channel beside it is checked, not used:
    the old pyvmm never connects to it), else the main channel's.  With defer
    and no cpr channel the path comes from migrate-incoming.
    """
    from ..qmp.args import CommandError
    from ..qmp.framing import parse_json
    from ..qmp.migration_args import check_channels, parse_migration_uri
    channels, defer = [], False
    try:
        for value in values:
            if value == "defer":
                if defer:
                    raise CommandError("Channel list has more than one main entry")
                defer = True
            elif value.startswith("{"):
                try:
                    channels.append(parse_json(value.encode()))
                except ValueError as e:
                    raise CommandError(f"{value!r} is not a JSON channel ({e})") from None
            elif value.startswith("cpr-transfer:") and len(value) > len("cpr-transfer:"):
                channels.append({"channel-type": "cpr", "addr": parse_migration_uri(
                    "unix:" + value.partition(":")[2])})
            else:
                channels.append({"channel-type": "main", "addr": parse_migration_uri(value)})
        found = check_channels(channels, "incoming")
        if defer and "main" in found:
            raise CommandError("Channel list has more than one main entry")
    except CommandError as e:
        raise VmmError(f"--incoming: {e.desc}") from None
    if "cpr" in found:
        return listen_path(found["cpr"], "--incoming: the cpr channel"), defer
    if defer:
        return None, True
    return listen_path(found["main"], "--incoming"), False


def listen_path(addr: dict, what: str) -> str:
    """The unix socket path to receive a live update on, from a MigrationAddress."""
    if addr["transport"] == "socket" and addr["type"] == "unix" and not addr.get("abstract"):
        return addr["path"]
    if addr["transport"] == "file":
        raise VmmError(f"{what} file:{addr['filename']}: {_FILE_HELP}")
    kind = addr.get("type", addr["transport"])
    if addr.get("abstract"):
        kind = "abstract unix"
    raise VmmError(f"{what}: pyvmm receives a live update over a unix socket in the "
                   f"file system (unix:PATH or a cpr channel), not over {kind}")


class Waiting:
    """What every incoming side shares (this module's Incoming, a cpr-transfer; and
    vmm/migration/receiver.py's Receiver, a migration over TCP): `status` for
    query-migrate with on_status(status) called at each change, a deferred start
    (QMP migrate-incoming, which may name the address: _listen_on(addr)), and
    abort() from another thread (quit, a signal), which wakes the wait for a peer
    on `listener` and shuts the connection (`_peer_socket()`) down; `settled`, clear
    while the guest is stopped on its way in (the monitor holds its clients off)."""

    def __init__(self, deferred: bool):
        self.listener = None
        self.status = "none"
        self.on_status = lambda status: None
        self.deferred = deferred      # started with defer: accept only after start()
        self.started = not deferred
        self.aborted = False
        from ..sync import Event
        self.settled = Event()   # clear from the state's arrival to the resume (hold_off)
        self.settled.set()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def _set_status(self, status: str) -> None:
        self.status = status
        self.on_status(status)

    def _listen_on(self, main_addr: dict) -> None:
        raise NotImplementedError

    def _peer_socket(self):
        return None

    def start(self, main_addr: dict) -> None:
        """migrate-incoming: begin accepting (listening on main_addr if need be)."""
        if not self.deferred:
            raise VmmError("For use with '-incoming defer'")
        if self.started:
            raise VmmError("The incoming migration has already been started")
        self._listen_on(main_addr)
        self.started = True
        self._set_status("setup")
        os.write(self._wake_w, b"\0")

    def abort(self) -> None:
        """End the wait (any thread): prepare()/complete() raise IncomingAborted."""
        self.aborted = True
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass
        sock = self._peer_socket()
        if sock is not None:
            import socket
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _wait_for_peer(self) -> None:
        """Until a peer is at the listener (and, with defer, after start()); abortable."""
        import select
        while True:
            waiting = [self._wake_r]
            if self.listener is not None and self.started:
                waiting.append(self.listener)
            ready, _, _ = select.select(waiting, [], [])
            if self.aborted:
                raise IncomingAborted("quit while waiting for the live update")
            if self._wake_r in ready:
                try:
                    os.read(self._wake_r, 64)
                except BlockingIOError:
                    pass
            elif self.listener in ready:
                return

    def _close_wake(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            _close(fd)
        self._wake_r = self._wake_w = -1


class Incoming(Waiting):
    """cpr-transfer target: wait for the old VMM, prepare, restore, resume on "go".

    `path` is where to listen now; with `deferred`, nothing is accepted until
    start() (QMP migrate-incoming), which may also name the path.  `status` is
    the incoming side's MigrationStatus for query-migrate ("none" while deferred,
    "setup" while listening, "active" once the old VMM is in, then "completed");
    `on_status` is called with each change.  abort() (quit, from the monitor
    thread) ends the wait before "go".
    """

    def __init__(self, path: str | None, console=None, *, deferred: bool = False):
        super().__init__(deferred)
        self.path = None
        self.console = console
        self.channel = None
        self.commit = None    # the old VMM's commit word (None from pyvmm 0.1.0: "go")
        self.handoff = None   # our handoff page and its thread (vmm/cpr/handoff.py), if offered
        self.machine = None
        self.arrival = None   # how the guest came, once it runs here
        self.timeline = Timeline()
        self.config: dict = {}
        self.faults = Faults()
        self._inode = None
        if path is not None:
            self._listen(path)

    def _listen(self, path: str) -> None:
        from .channel import listen
        self.listener = listen(path)
        self.path = path
        self._inode = os.stat(path).st_ino
        if self.started:
            self._set_status("setup")

    def _listen_on(self, main_addr: dict) -> None:
        if self.listener is None:   # else a cpr channel carries everything: main is not used
            self._listen(listen_path(main_addr, "migrate-incoming"))

    def _peer_socket(self):
        return self.channel.sock if self.channel is not None else None

    def close(self) -> None:
        """Stop listening and remove our socket path (if it is still ours)."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            self._unlink()
        if self.channel is not None:
            self.channel.close()
        self._close_commit()
        self._close_wake()

    def _close_commit(self) -> None:
        if self.commit is not None:
            self.commit.close()
            self.commit = None
        if self.handoff is not None:
            self.handoff.close()
            self.handoff = None

    def _unlink(self) -> None:
        try:
            if self.path and os.lstat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except OSError:
            pass

    def prepare(self) -> None:
        """Accept the old VMM and build the VM on its RAM (before it stops the guest).
        Peers refused before that (another user, garbage, a bad hello) cost a line on
        stderr each, and we go on listening (channel.accept)."""
        from .channel import accept, check_hello
        self._wait_for_peer()
        self._set_status("active")
        self.channel, msg, fds, shape = accept(self.listener, check_hello)
        self.timeline.step("new: hello and RAM memfd received")
        self.listener.close()
        self.listener = None
        self._unlink()
        if self.aborted:
            for fd in fds:
                _close(fd)
            raise IncomingAborted("quit while waiting for the live update")
        try:
            if len(fds) == 2:    # the commit page (check_hello: only with "commit")
                from .commit import CommitWord
                self.commit = CommitWord.receive(fds.pop())
            self.faults = Faults(msg.get("faults", ()))
            self.faults.check("target-prepare")
            self.faults.delay("target-slow-prepare")
            self.config = msg.get("config", {})
            self.machine = build_machine(shape, fds[0], self.config, self.console)
            warm_up(self.machine, shape)
            if msg.get("handoff") is True:
                from .handoff import Waiter
                early = msg.get("early") is True and self.commit is not None
                try:
                    self.handoff = Waiter(self.machine, self.commit if early else None)
                except OSError:   # (no handoff: the state is written from the blob)
                    self.handoff = None
        except Exception as e:
            for fd in fds:
                _close(fd)
            self._close_commit()
            self._refuse(e)
            raise
        self.timeline.step("new: VM built on the same RAM, \"prepared\" sent")
        if self.handoff is not None:
            self.channel.send(dict(prepared_message(), handoff=True), [self.handoff.fd])
        else:
            self.channel.send(prepared_message())

    def complete(self):
        """Receive state and fds, restore, wait for "go", resume.  Returns the machine
        (and leaves how it came in self.arrival)."""
        from .channel import ChannelError
        self.faults.crash("target-crash-before-fds")
        try:
            msg, fds = self.channel.expect("state", timeout=None)
        except ChannelError as e:   # the old VMM failed: after its handoff, the guest may run here
            if self.handoff is not None and self.handoff.posted():
                self.handoff.finish(True)
                if self.handoff.running:
                    self._hand_back(None, e)
            raise
        gc.disable()   # the guest is stopped until resume_guest(), which enables it again
        self.settled.clear()
        try:
            return self._complete(msg, fds)
        finally:
            self.settled.set()

    def _complete(self, msg, fds):
        from .channel import ChannelError
        self.timeline.mark("restore")
        state = None
        try:
            from ..schema import check
            names = check("state-msg", msg)["fds"]
            if len(names) != len(fds) or not names or names[0] != "state" or \
                    len(set(names)) != len(names):
                raise ChannelError("fd list does not match the fds received")
        except VmmError as e:
            for fd in fds:
                _close(fd)
            self._refuse_or_hand_back(None, e, msg.get("handoff") is True)
            raise
        by_name = dict(zip(names, fds))
        # What the old VMM still runs at the moment its fds reach us (the order test
        # checks that no device data-path thread is among them).  Reading /proc costs
        # ~0.2 ms of downtime, so only when asked: PYVMM_CPR_RECORD_PEER=1.
        self.peer_threads = (peer_threads(self.channel.sock)
                             if os.environ.get(RECORD_PEER_ENV) else None)
        self.faults.crash("target-crash-after-fds")
        try:
            state_fd = by_name.pop("state")
            try:
                state = state_format.loads(read_memfd(state_fd), "state")
            finally:
                os.close(state_fd)
            self.timeline.step("new: state blob loaded")
            written = self._handed_over(msg.get("handoff") is True)
            early = self.handoff is not None and self.handoff.running
            self.faults.delay("target-slow-restore")   # (with an early start: the guest runs)
            self.faults.check("target-restore")
            if written is not None:   # the VM and vCPUs: by the handoff thread, meanwhile
                self.machine.check_fits(state)
                self.machine.adopt_state(state)
                self.machine.restore_devices(state, by_name)
                self.timeline.step("new: device state written")
            else:
                restore(self.machine, state, by_name)
                self.timeline.step("new: vCPU, VM and device state written")
        except Exception as e:
            self._refuse_or_hand_back(state, e, msg.get("handoff") is True)
            raise
        self.timeline.steps += [list(s) for s in msg.get("steps", ())]
        if early:   # the guest is ours since the early start: nobody else moves the word
            from .commit import EARLY, NEW
            self.commit.move(EARLY, NEW)
            self.timeline.step("new: restore done, the early start's claim made final")
        elif self.commit is not None:
            from .commit import NEW
            if not self.commit.claim(NEW):
                raise ChannelError("the old pyvmm took the guest back before this one could "
                                   "run it (a cancel, or the pause passed its downtime-limit)")
            self.timeline.step("new: guest claimed (\"go\": the point of no return)")
        else:   # pyvmm 0.1.0: "restored", then its "go" (EOF: it rolled back)
            self.channel.send({"msg": "restored"})
            go, _ = self.channel.expect("go", timeout=None)
            self.timeline.step("new: \"go\" received")
            self.timeline.steps += [list(s) for s in go.get("steps", [])
                                    if isinstance(s, list) and len(s) == 2]
        resume_guest(self.machine, state, self.timeline, msg.get("t_transfer"),
                     self.handoff if early else None, who="new")
        self.faults.delay("target-slow-running")
        # Past "go" this process owns the guest, whatever became of the old one (killed,
        # or gave up waiting while we were stopped): a broken channel is worth a line,
        # never the guest.
        try:
            self.channel.send({"msg": "running", "timeline": self.timeline.marks,
                               "steps": self.timeline.steps})
        except ChannelError as e:
            import sys
            print(f"pyvmm: live update: the old pyvmm went away after \"go\" ({e}); "
                  "this pyvmm runs the guest", file=sys.stderr)
        self.channel.close()
        self._close_commit()
        self.arrival = Arrival("cpr-transfer", self.timeline, self.peer_threads)
        return self.machine

    def _handed_over(self, posted: bool) -> int | None:
        """When our handoff thread wrote the VM and vCPU state the old VMM handed over
        (vmm/cpr/handoff.py), or None: then it is written from the blob."""
        if self.handoff is None:
            return None
        written = self.handoff.finish(posted)
        if self.handoff.running:   # the guest ran again there: this side's restore began then
            self.timeline.marks = [m for m in self.timeline.marks if m[0] != "restore"]
            self.timeline.mark("restore", self.handoff.waiter.t_woke_ns)
            self.timeline.step(EARLY_STEP, written)
        elif written is not None:
            self.timeline.step(HANDOFF_STEP, written)
        elif posted:
            self.timeline.step(f"new: handoff refused ({self.handoff.problem}); the state is "
                               "written from the blob")
        return written

    def _refuse_or_hand_back(self, state: dict | None, error: Exception, posted: bool) -> None:
        """A failure here: refused, as before; but when the guest runs here since the
        early start, it goes back to the old VMM with its state as it is now."""
        if self.handoff is not None and posted:
            self.handoff.finish(True)
            if self.handoff.running:
                self._hand_back(state, error)
                return
        self._refuse(error)

    def _hand_back(self, state: dict | None, error: Exception) -> None:
        """The early start ran the guest here, and this side cannot finish: stop the
        early vCPUs, send the old VMM their state (it takes the guest back with it and
        resumes), and give up the guest (EARLY to OLD)."""
        from .commit import EARLY, OLD
        from ..state import dumps, to_memfd
        back = self.handoff.capture(self.machine, state)
        fd = to_memfd(dumps(back))
        try:
            self.commit.move(EARLY, OLD)
            self.timeline.step("new: early vCPUs stopped, the guest handed back")
            self.channel.send({"msg": "handback", "desc": str(error)}, [fd])
        except VmmError:
            pass
        finally:
            os.close(fd)

    def _refuse(self, error: Exception) -> None:
        if self.channel is not None:
            try:
                self.channel.send({"msg": "error", "desc": str(error)})
            except VmmError:
                pass


def prepared_message() -> dict:
    """"prepared", with this pyvmm's version and protocol: the old VMM refuses, before
    its stop, a new one that says none (older than 0.2.0: a downgrade)."""
    from .. import __version__
    from .channel import PROTOCOL_VERSION
    return {"msg": "prepared", "pyvmm": __version__, "version": PROTOCOL_VERSION}


def peer_threads(sock) -> list[str]:
    """Thread names of the process at the other end of a unix socket (SO_PEERCRED)."""
    from ..unix import peer_cred
    try:
        pid = peer_cred(sock)[0]
        names = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                names.append(f.read().strip())
        return sorted(names)
    except OSError:
        return []


def exec_resume(console_factory=None, t_python: int | None = None,
                overrides: dict | None = None):
    """cpr-exec target: rebuild the machine from the state memfd named in the environment.

    overrides: what this image's command line changes in the saved config
    (--console, --qmp).  Returns (machine, config, kept fds, the old QMP path, Arrival).

    There is no old process to fall back to after an exec, so if the restore
    fails here (before any device was started) we exec once more, with the
    same fds and state and with injected faults disarmed: the guest resumes
    after a longer pause instead of being lost.
    """
    gc.disable()   # the guest is stopped until resume_guest(), which enables it again
    fd = int(os.environ.pop(EXEC_STATE_ENV))
    t_transfer = int(os.environ.pop(EXEC_T_ENV, "0"))
    fallback = os.environ.pop(FALLBACK_ENV, None) is not None
    timeline = Timeline()
    if t_python:
        timeline.step("new image: Python runs its first line", t_python)
    t_start = timeline.mark("restore")
    timeline.step("new image: resume path imported", t_start)
    os.set_inheritable(fd, False)
    blob = read_memfd(fd)
    state = state_format.loads(blob, "state")
    cpr = state["cpr"]
    all_fds = {name: int(n) for name, n in cpr["fds"].items()}
    for n in all_fds.values():
        os.set_inheritable(n, False)   # received fds never leak into a later exec
    fds = dict(all_fds)
    old_qmp = cpr.get("config", {}).get("qmp")
    config = dict(cpr.get("config", {}), **(overrides or {}))
    console = console_factory(config) if console_factory else None
    faults = Faults(() if fallback else cpr.get("faults", ()))
    timeline.step("new image: state blob loaded")
    from . import prebuild
    built = prebuild.take()
    timeline.step("new image: waited for the prebuilder (joined)")
    early = None
    try:
        faults.check("target-restore")
        shape = state["machine"]
        memory, kvm_parts = _take_prebuilt(shape, fds.pop("ram"), built, timeline)
        if kvm_parts is not None and built.early == 1:
            early = built
            # The guest runs since the prebuilder restored it: that was this image's restore.
            timeline.marks = [["restore", built.t_done_ns]]
        machine = build_machine(shape, -1, config, console, memory=memory, kvm_parts=kvm_parts)
        timeline.step("new image: machine built, vCPU threads parked")
        kept = {name: fds.pop(name) for name in ("qmp",) if name in fds}
        if early is not None:
            machine.adopt_state(state)
            machine.restore_devices(state, fds)
            timeline.step("new image: device state written")
        else:
            restore(machine, state, fds)
            timeline.step("new image: vCPU, VM and device state written")
    except Exception as e:
        if fallback:
            raise
        import sys
        print(f"pyvmm: live update: restore failed in the new image ({e}); "
              "exec'ing again to resume the guest", file=sys.stderr)
        if built is not None and built.early == 1:
            # The guest ran here since the save: the next image restores it as it is now.
            os.close(fd)
            fd = state_format.to_memfd(state_format.dumps(built.capture_early(state)))
        for n in list(all_fds.values()) + [fd]:
            os.set_inheritable(n, True)
        env = dict(os.environ, **{EXEC_STATE_ENV: str(fd), EXEC_T_ENV: str(t_transfer),
                                  FALLBACK_ENV: "1"})
        cmd = resume_command() + [a for k, v in (overrides or {}).items() for a in (f"--{k}", v)]
        os.execve(cmd[0], cmd, env)
    os.close(fd)
    faults.delay("target-slow-restore")
    resume_guest(machine, state, timeline, t_transfer, early)
    from .holder import release
    release(os.environ.pop(HOLDER_ENV, None))
    state_file = (cpr["file"][0], cpr["file"][1], blob) if cpr.get("file") else None
    return machine, config, kept, old_qmp, Arrival("cpr-exec", timeline, None, state_file)


def write_state_file(arrival) -> None:
    """QEMU's `migrate uri=file:PATH` recipe: the state the update carried, written to
    PATH once the guest runs (pyvmm's blob; `python -m vmm.state PATH` prints it)."""
    if arrival.state_file is None:
        return
    path, offset, blob = arrival.state_file
    arrival.state_file = None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.pwrite(fd, blob, offset)
            os.ftruncate(fd, offset + len(blob))
        finally:
            os.close(fd)
    except OSError as e:
        import sys
        print(f"pyvmm: live update: cannot write the state to {path}: {e.strerror}",
              file=sys.stderr)


def _take_prebuilt(shape: dict, ram_fd: int, built, timeline):
    """RAM and (kvm, vm, vcpus) from the prebuilder (csrc/cpr_exec.c), or RAM alone."""
    mem = shape["memory"]
    if built is None:
        return map_ram(shape, ram_fd), None
    if not built.fits(mem["size"], shape["vcpus"]):
        timeline.step(f"prebuilder: nothing usable ({built.error or 'another shape'}); "
                      "building here")
        early = built.early == 1   # (never with a request and a state from one old image)
        built.discard()
        if early:
            raise VmmError("the prebuilder ran a VM of another shape than the saved state's")
        return map_ram(shape, ram_fd), None
    timeline.step("prebuilder (C, before Python's main): started", built.t_start_ns)
    timeline.step("prebuilder: VM, memory slots, irqchip and vCPUs ready", built.t_done_ns)
    if built.early == 1:
        timeline.step("prebuilder: vCPU, VM and irqchip state restored, vCPUs running "
                      "(the guest runs)", built.t_early_ns)
    elif built.early < 0:
        timeline.step(f"prebuilder: early start refused ({built.early_error}); "
                      "Python restores the state")
    from ..machine import create_kvm_parts
    memory = map_ram(shape, ram_fd, built.ram_addr)
    return memory, create_kvm_parts(memory, shape["vcpus"], shape["cpuid"], prebuilt=built)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
