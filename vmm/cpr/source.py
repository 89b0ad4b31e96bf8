"""The old VMM's side of a live update: stop -> notify -> save -> transfer, or roll back.

`Migration.run()` is the whole sequence.  Any failure after the stop (or a
cancel before the point of no return) runs the notifiers with "failed", so each
device takes back what it released, and resumes the guest exactly where it
was: the guest sees a pause and nothing else.

The point of no return ("go") is, in cpr-transfer, the new VMM's claim of the
shared commit word once it has restored everything (vmm/cpr/commit.py: this
process claims the same word only to roll back, and one swap decides), and the
execve itself in cpr-exec.  Before it, the guest stays stopped at most
`downtime-limit` ms waiting for the new VMM: past that we roll back.  After it,
this process never resumes the guest (both would run on the same RAM); without
"running" from the new VMM the update is reported as failed, never completed.
"""

from __future__ import annotations

import os
import sys
import threading

from .. import __version__
from .. import state as state_format
from ..compat import hello_refused, target_problem
from ..errors import VmmError
from . import (DOWNTIME_LIMIT_MS, EXEC_STATE_ENV, EXEC_T_ENV, HOLDER_ENV, resume_command,
               search_path)
from .channel import PROTOCOL, PROTOCOL_VERSION, Channel, ChannelError, ChannelTimeout
from .commit import EARLY, NEW, OLD, OPEN
from .faults import Faults
from .modes import check_migrate_mode
from .timeline import Timeline, now_ns, timeline_info

PREPARE_TIMEOUT = 60.0
# After "go": how long to wait for the new VMM's "running" (s).  It only matters when the
# new VMM is alive but not running (SIGSTOP, a freezer, a debugger): one that dies closes
# the channel at once.  PYVMM_CPR_RUNNING_TIMEOUT overrides it (the tests use 1 s).
RUNNING_TIMEOUT = 30.0
RUNNING_TIMEOUT_ENV = "PYVMM_CPR_RUNNING_TIMEOUT"


def _byte_compile() -> None:
    """Make sure pyvmm's .pyc files are current before a cpr-exec: the new image
    imports ~30 modules inside the downtime, and one compiled from source there
    costs ~1-2 ms.  (PYTHONDONTWRITEBYTECODE, set on this project's machines, stops
    Python from caching them by itself; an edited checkout would pay every time.)
    The check reads each .pyc header (source mtime and size) instead of importing
    compileall (~10 ms here, every time in an exec'd image, with the guest running
    and needing the GIL); only a stale file is compiled.  A read-only install is
    left as it is."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tag = sys.implementation.cache_tag
    stale = []
    for top, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if not name.endswith(".py"):
                continue
            src = os.path.join(top, name)
            pyc = os.path.join(top, "__pycache__", f"{name[:-3]}.{tag}.pyc")
            try:
                st = os.stat(src)
                with open(pyc, "rb") as f:
                    header = f.read(16)
            except OSError:
                stale.append(src)
                continue
            if header[4:8] != bytes(4):
                continue   # a hash-based .pyc (PEP 552): Python checks it itself
            if header[8:12] != (int(st.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little") or \
                    header[12:16] != (st.st_size & 0xFFFFFFFF).to_bytes(4, "little"):
                stale.append(src)
    if stale:
        import py_compile
        for src in stale:
            try:
                py_compile.compile(src, doraise=True)
            except (OSError, py_compile.PyCompileError):
                pass


CHECK_TIMEOUT = 30.0


def find_program(name: str) -> str:
    """What execve will run for argv[0] (searched in PATH if it has no slash, as
    QEMU's execvp would), or a VmmError saying why nothing would run."""
    import shutil
    path = name if "/" in name else shutil.which(name)
    if not path or not os.path.exists(path):
        raise VmmError(f"cpr-exec-command: {name!r} not found" +
                       ("" if "/" in name else " in PATH"))
    if os.path.isdir(path) or not os.access(path, os.X_OK):
        raise VmmError(f"cpr-exec-command: {path} is not an executable file")
    return path


def check_exec_command(command: list[str], env: dict, qmp_path: str | None) -> list[str]:
    """Before the stop: will this command take the guest over after the exec?

    After an exec there is no old image to return to, so a command that is not
    a pyvmm (or a wrapper that execs one) would lose the guest.  Dry-run it with
    PYVMM_CPR_EXEC_CHECK set: every pyvmm entry point (vmm.runner.exec_entry)
    answers with its package root, its interpreter and the --console/--qmp it
    would take, or why it could not; anything else is refused here, with the
    guest still running.  When the answer is this very installation, what is
    exec'd is pyvmm's lean resume command with those arguments (the same code,
    without `site` and with the VM prebuilt: every millisecond there is downtime);
    otherwise (another pyvmm: an upgrade) the command as given."""
    import subprocess
    from ..runner import CHECK_ANSWER, CHECK_ENV, CHECK_FROM_ENV
    program = find_program(command[0])
    asking = {CHECK_ENV: qmp_path or "-", CHECK_FROM_ENV: f"{__version__} {PROTOCOL_VERSION}"}
    try:
        r = subprocess.run([program] + command[1:], env=dict(env, **asking),
                           stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=CHECK_TIMEOUT, errors="replace")
    except subprocess.TimeoutExpired:
        raise VmmError(f"cpr-exec-command {command[0]!r} is not a pyvmm: its dry run did not "
                       f"answer within {CHECK_TIMEOUT:.0f} s; the guest was not stopped") from None
    except OSError as e:
        raise VmmError(f"cannot run cpr-exec-command {program}: {e.strerror}") from None
    answer = [line.split() for line in r.stdout.splitlines() if line.startswith(CHECK_ANSWER)]
    if not answer:
        why = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
        raise VmmError(f"cpr-exec-command {command[0]!r} is not a pyvmm that can take the guest "
                       f"over (its dry run gave no answer; {why[:200]}; a pyvmm older than "
                       f"0.2.0 gives none: a downgrade from {__version__} is refused); the "
                       "guest was not stopped")
    words = answer[-1]
    if words[1] != "ok":
        raise VmmError(f"cpr-exec-command {command[0]!r} cannot take the guest over: "
                       f"{' '.join(words[2:])}; the guest was not stopped")
    fields = dict(w.partition("=")[::2] for w in words[2:])
    why = target_problem(fields.get("pyvmm"))
    if why:
        raise VmmError(f"cpr-exec-command {command[0]!r}: {why}")
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if fields.get("root") == here and fields.get("python") == os.path.realpath(sys.executable):
        args = [a for k in ("console", "qmp") if k in fields for a in (f"--{k}", fields[k])]
        return resume_command() + args
    return [program] + command[1:]


def same_interpreter(program: str) -> bool:
    """Is `program` this Python, so that our module search path belongs in its
    PYTHONPATH?  Not when it is another virtual environment's python (another pyvmm
    installation: an upgrade), though both link to the same binary: that path would
    make the new installation import this one's code."""
    def venv(path):
        top = os.path.dirname(os.path.dirname(os.path.abspath(path)))
        return top if os.path.exists(os.path.join(top, "pyvenv.cfg")) else None
    return (os.path.realpath(program) == os.path.realpath(sys.executable) and
            venv(program) in (None, venv(sys.executable)))


class Cancelled(VmmError):
    """migrate_cancel arrived before the point of no return."""


class HandedBack(ChannelError):
    """The new VMM ran the guest early (cpr-transfer's x-early-start), then failed: it
    stopped the guest and sent back its vCPU and VM state as they are now (`state`,
    None if it could not be read: then the guest is lost)."""

    def __init__(self, msg: dict, fds: list[int]):
        desc = str(msg.get("desc", "unknown error"))[:500]
        super().__init__(f"the other pyvmm failed after it ran the guest early, and gave it "
                         f"back: {desc}")
        self.state = None
        try:
            if len(fds) == 1:
                self.state = state_format.loads(state_format.read_memfd(fds[0]), "handback")
        except VmmError:
            self.state = None
        finally:
            for fd in fds:
                os.close(fd)


class Migration:
    """One live update out of this process (what query-migrate reports on)."""

    def __init__(self, machine, mode: str, *, cpr_path: str | None = None,
                 exec_command: list[str] | None = None, faults=(), emit=None,
                 extra_fds: dict[str, int] | None = None, config: dict | None = None,
                 main_addr: dict | None = None,
                 downtime_limit_ms: int = DOWNTIME_LIMIT_MS, early_start: bool = False):
        check_migrate_mode(mode)
        if mode == "cpr-transfer" and not cpr_path:
            raise VmmError("cpr-transfer needs the new pyvmm's cpr socket path")
        self.machine = machine
        self.mode = mode
        self.cpr_path = cpr_path
        self.exec_command = exec_command or resume_command()
        self.exec_file = None   # what execve runs with exec_command as argv, if not argv[0]
        from .faults import check_mode
        check_mode(faults, mode)
        self.faults = Faults(faults)
        self.emit = emit or (lambda name, data=None: None)
        self.extra_fds = extra_fds or {}
        self.config = config or {}
        self.downtime_limit_ms = downtime_limit_ms
        try:
            self.running_timeout = float(os.environ.get(RUNNING_TIMEOUT_ENV, RUNNING_TIMEOUT))
        except ValueError:
            raise VmmError(f"{RUNNING_TIMEOUT_ENV} must be a number of seconds") from None
        self.committed = False   # past "go": the guest is the new VMM's, whatever happens
        self.commit = None       # cpr-transfer: the shared word that decides it (.commit)
        self.handoff = None      # cpr-transfer: the new VMM's handoff page (.handoff), if any
        self.handed_over = False   # ... and the VM and vCPU state written into it
        # cpr-transfer's early start (x-early-start): the new VMM runs the guest as soon
        # as it wrote that state, before its device restore (vmm/cpr/handoff.py).
        self.early_start = early_start and mode == "cpr-transfer"
        self._ours = False       # our claim (OLD) landed: the guest never ran elsewhere
        self._running = None     # the new VMM's "running", if it came while we waited
        self._gone = None        # why the channel broke after the new VMM's claim
        # cpr-exec with QEMU's `file:PATH`: the new image writes the state there (off
        # the downtime; the state itself crosses the exec in a memfd)
        self.state_file = None
        if mode == "cpr-exec" and main_addr and main_addr.get("transport") == "file":
            self.state_file = [os.path.abspath(main_addr["filename"]),
                               main_addr.get("offset", 0)]
        self.timeline = Timeline()
        self.status = "none"
        self.error: str | None = None
        self._cancel = threading.Event()
        self.channel: Channel | None = None
        self.done = threading.Event()
        # Clear while the guest is stopped here (the downtime, or a rollback): the QMP
        # monitor holds off its clients meanwhile (Controller.hold_off).
        self.settled = threading.Event()
        self.settled.set()

    # -- reporting -----------------------------------------------------------------------
    def _set_status(self, status: str) -> None:
        self.status = status
        self.emit("MIGRATION", {"status": status})

    def _mark(self, phase: str) -> None:
        if self.timeline.get(phase) is None:   # (the early start marks "transfer" sooner)
            self.timeline.mark(phase)

    def _mark_at(self, phase: str, t: int) -> None:
        self.timeline.mark(phase, t)

    def info(self) -> dict:
        info = timeline_info(self.timeline, self.mode)
        info["status"] = self.status
        if self.error:
            info["error-desc"] = self.error
        if self.committed:   # past the point of no return: the guest is not here any more
            info["x-after-go"] = True
        return info

    def cancel(self) -> None:
        self._cancel.set()

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise Cancelled("migration cancelled")

    # -- the sequence --------------------------------------------------------------------
    def run(self) -> bool:
        """Run the live update; True once the guest has left this process ("go" sent or
        exec'd: `status` is then completed, or failed if the new VMM never said it runs it).

        While it runs, this thread (preparing, saving) and the vCPU threads (still
        running the guest until the stop, or again after a rollback) share the GIL:
        hand it over every 0.2 ms instead of every 5 ms, or the preparation would
        stall the guest's exits by milliseconds before the stop even starts."""
        interval = sys.getswitchinterval()
        sys.setswitchinterval(min(interval, 0.0002))
        self.raised, self.own_nice = False, os.getpriority(os.PRIO_PROCESS, 0)
        try:
            return self._run()
        finally:
            sys.setswitchinterval(interval)
            self._lower()
            self.settled.set()
            self.done.set()

    def _raise(self) -> None:
        """From the stop until the state has left (with the early start: until the new
        VMM has the vCPU state), run this thread at the vCPU threads' nice (where
        allowed): the guest waits for it.  On two CPUs whatever the update
        wakes (the QMP client, a kernel thread, the new VMM's threads) otherwise lands
        on this CPU and, at equal priority, waited there for a scheduler tick (4 ms) in
        traced updates, or took the CPU from this thread.  A cpr-exec's new image
        inherits it for its start; its C constructor gives the main thread the nice it
        had (`main_nice`).  (PRIO_PROCESS 0 is the calling thread on Linux.)"""
        from ..kvm.ffi import lib
        self.main_nice = os.getpriority(os.PRIO_PROCESS, os.getpid())
        self.raised = lib.pyvmm_vcpu_thread_nice() == 0

    def _lower(self) -> None:
        """Back to this thread's own nice: the state has left (or the update is over),
        and the guest's vCPU, wherever it runs now, must not share its level with us."""
        if self.raised:
            os.setpriority(os.PRIO_PROCESS, 0, self.own_nice)
            self.raised = False

    def _run(self) -> bool:
        m = self.machine
        self._set_status("setup")
        self._warm_up()
        self.holder = None
        self.prebuild_fd = -1
        if self.mode == "cpr-exec":
            try:
                self._prepare_exec()
            except Exception as e:
                return self._failed(e, stopped=False)
        if self.mode == "cpr-transfer":
            self._mark("setup")
            try:
                self.faults.check("prepare")
                self._prepare_target()
                self._check_cancel()
            except Exception as e:
                return self._failed(e, stopped=False)

        # (1) stop: from here on, any failure resumes the guest.
        was_running = self.was_running = m.running   # a paused guest stays paused (QEMU)
        self.settled.clear()   # (first: "active" is then queued, not sent: see emit)
        self._set_status("active")
        self._raise()
        self._mark("stop")
        m.pause()
        if was_running:
            self.emit("STOP")
        try:
            self._mark("quiesce")
            m.quiesce_devices()
            self.faults.check("after-stop")
            # (2) notify: every device releases what it owns.
            self._mark("notify")
            m.notify_devices("setup")
            self.faults.check("notify")
            self._check_cancel()
            # (3) save.
            self._mark("save")
            fds = m.cpr_fds()
            fds.update(self.extra_fds)
            blob = self._save(fds)
            self.faults.check("save")
            self._check_cancel()
            # (4) transfer.
            self._mark("transfer")
            self._set_status("device")
            if self.mode == "cpr-transfer":
                self._transfer(blob, fds)
            else:
                self._exec(blob, fds)    # returns only on failure
        except Exception as e:
            return self._failed(e, stopped=True, was_running=was_running)
        return self._committed()

    def _warm_up(self) -> None:
        """Run the save path once before the stop where it can run with the guest going
        (VM-wide state and the serializer): a first run is the slow one."""
        self.machine.vm.get_state()   # (never a vCPU ioctl here: it would wait for KVM_RUN)
        for vcpu in self.machine.vcpus:
            vcpu.warm_up()
        fake = {"machine": self.machine.shape(), "vcpus": [{"xsave": bytes(4096),
                "lapic": bytes(1024), "msrs": bytes(16 * 48)}]}
        os.close(state_format.to_memfd(state_format.dumps(fake)))

    def _prepare_exec(self) -> None:
        """Before the stop: check the command, the holder that keeps the old VM and mm out
        of execve, the new image's environment and (when exec'ing our own resume
        command) its prebuild request."""
        from .holder import Holder
        m = self.machine
        # The new image's environment, all but the state memfd's number and the time
        # (PYTHONPATH: for a command on this interpreter like `python -S -m vmm`).
        self.exec_env = dict(os.environ)
        if same_interpreter(find_program(self.exec_command[0])):
            self.exec_env["PYTHONPATH"] = os.pathsep.join(search_path())
        if self.exec_command != resume_command():
            self.exec_command = check_exec_command(self.exec_command, self.exec_env,
                                                   self.config.get("qmp"))
        _byte_compile()
        self.holder = Holder(m.kvm_fds())
        if self.exec_command[:len(resume_command())] == resume_command():
            from . import prebuild
            self.prebuild_fd = prebuild.request(m.memory, len(m.vcpus))
            if self.prebuild_fd >= 0:
                launch = prebuild.launcher()   # (argv stays the resume command)
                if launch:
                    self.exec_file = launch[0]
                self.exec_env.update(prebuild.exec_env(self.prebuild_fd,
                                                       launch[1] if launch else None))

    def _prepare_target(self) -> None:
        """Before the stop: the new VMM maps RAM and builds an empty VM (off the downtime)."""
        from .commit import CommitWord
        m = self.machine
        self.channel = Channel.connect(self.cpr_path)
        self.commit = CommitWord.create()
        # (the early start's offer only when asked: a hello without it is the one every
        # pyvmm since 0.2.0 takes, and the handoff alone, without the early start, saves
        # nothing on this host: docs/BENCHMARKS.md, "Tried and dropped")
        early = {"handoff": True, "early": True} if self.early_start else {}
        self.channel.send({"msg": "hello", "protocol": PROTOCOL, "version": PROTOCOL_VERSION,
                           "pyvmm": __version__,
                           "shape": state_format.encode_tree(m.shape()), "config": self.config,
                           "faults": self.faults.for_target(), "commit": True, **early},
                          [m.memory.fd, self.commit.fd])
        self.timeline.step("old: hello and RAM memfd sent")
        try:
            prepared, fds = self.channel.expect("prepared", timeout=PREPARE_TIMEOUT)
        except ChannelError as e:
            raise ChannelError(hello_refused(str(e))) from None
        self.timeline.step("old: \"prepared\" received")
        if prepared.get("handoff") is True and len(fds) == 1:
            from .handoff import Page
            try:
                self.handoff = Page(fds.pop(), len(m.vcpus))
                self.handoff.warm_up(m)
            except (OSError, VmmError):
                self.handoff = None   # (a broken page: the blob alone carries the state)
        for fd in fds:
            os.close(fd)
        why = target_problem(prepared.get("pyvmm"))
        if why:
            self.channel.send({"msg": "error", "desc": why})
            raise VmmError(why)

    def _save(self, fds: dict[str, int]) -> bytes:
        if self.handoff is None:
            state = self.saved = self.machine.save_state()
            self.timeline.step("old: vCPU, VM and device state read")
        else:   # the new VMM writes the VM and vCPUs (and may run the guest) meanwhile
            kernel = self.machine.save_kernel_state()
            self.timeline.step("old: vCPU and VM state read")
            t = self.handoff.post(self.machine, kernel, corrupt="early-state" in self.faults.armed)
            self.handed_over = True
            self.timeline.step("old: VM and vCPU state handed over", t)
            if self.early_start:   # the new VMM may run the guest from here: the transfer
                self._mark_at("transfer", t)
                self._lower()   # (the guest's vCPU is the new VMM's now: not beside it)
            state = self.saved = self.machine.add_device_state(kernel)
            self.timeline.step("old: device state read")
        state["cpr"] = {"pyvmm": __version__, "protocol": PROTOCOL_VERSION,
                        "mode": self.mode, "timeline": self.timeline.marks,
                        "steps": self.timeline.steps,
                        "fds": fds, "config": self.config,
                        "faults": self.faults.for_target(),
                        "running": self.was_running}
        if self.state_file:
            state["cpr"]["file"] = self.state_file
        return state_format.dumps(state)

    def _transfer(self, blob: bytes, fds: dict[str, int]) -> None:
        self.faults.check("transfer")
        names = list(fds)
        state_fd = state_format.to_memfd(blob)
        # Stamped before sendmsg, not after it returns: once the fds are sent the new
        # VMM may run first, and a later stamp would put the send after its receipt.
        # (It travels with the state, so that the new VMM's trace has it.)
        self.timeline.step("old: state memfd and device fds sent")
        try:
            self.channel.send({"msg": "state", "fds": ["state"] + names,
                               "t_transfer": self.timeline.get("transfer"),
                               "steps": self.timeline.steps[-1:],
                               "handoff": self.handed_over},
                              [state_fd] + [fds[n] for n in names])
        finally:
            os.close(state_fd)
        self._lower()
        self._wait_claimed()
        # (the monitor's clients wait on until the new VMM says it runs the guest)

    def _take_back(self, why: Exception) -> None:
        """Claim the guest back for a rollback and raise `why`; if the new VMM's claim
        landed first, the guest is its own: mark the update committed and return.  A
        new VMM that ran the guest early (EARLY) and then gave it back (OLD) sends its
        state: raise HandedBack with it (the rollback restores it)."""
        if self.commit.holder() == OPEN and self.commit.claim(OLD):
            self._ours = True
            raise why
        if self.commit.holder() == OLD:   # not our claim: the new VMM's hand-back
            self._expect_running(self.running_timeout)   # raises HandedBack (or gone)
        self.committed = True

    def _expect_running(self, timeout: float):
        """The new VMM's "running" (and its fds); HandedBack when it sends the guest back
        instead (after an early start), ChannelError when it failed or went away."""
        msg, fds = self.channel.recv(timeout)
        if msg["msg"] == "handback":
            raise HandedBack(msg, fds)
        for fd in fds:
            os.close(fd)
        if msg["msg"] != "running":
            raise ChannelError(f"expected 'running' from the other pyvmm, got {msg['msg']!r}")
        return msg

    def _wait_claimed(self) -> None:
        """Until the new VMM has claimed the guest (its "running", or the word says so),
        or we take it back: at downtime-limit after the stop, on a cancel (seen within
        50 ms), on the new VMM's refusal or when it goes away.  Once it runs the guest
        early (EARLY) neither a cancel nor downtime-limit can take it back (the guest
        runs): we wait for its "running", or for the guest handed back."""
        deadline = self.timeline.get("stop") + self.downtime_limit_ms * 1_000_000
        early_until = None
        while not self.committed:
            if self.commit.holder() == EARLY:
                early_until = early_until or now_ns() + int(self.running_timeout * 1e9)
                left = (early_until - now_ns()) / 1e9
                if left <= 0:   # it runs the guest and says nothing: it is its guest now
                    self.committed = True
                    return
            else:
                left = (deadline - now_ns()) / 1e9
                if left <= 0:
                    return self._take_back(VmmError(
                        f"the new pyvmm had not restored the guest within downtime-limit "
                        f"({self.downtime_limit_ms} ms) of the stop; rolled back (raise it "
                        "with migrate-set-parameters downtime-limit=MS)"))
            try:
                self._running = self._expect_running(timeout=min(left, 0.05))
                self.committed = True
            except HandedBack:
                raise
            except ChannelTimeout:
                holder = self.commit.holder()
                if holder == NEW:
                    self.committed = True
                elif self._cancel.is_set() and holder != EARLY:
                    self._take_back(Cancelled("migration cancelled"))
            except ChannelError as e:   # refused, or gone: ours again unless it claimed
                self._gone = e
                self._take_back(e)

    def _exec(self, blob: bytes, fds: dict[str, int]) -> None:
        program = self.exec_file or self.exec_command[0]
        state_fd = state_format.to_memfd(blob)
        passed = list(fds.values()) + [state_fd]
        env = dict(self.exec_env, **{EXEC_STATE_ENV: str(state_fd),
                                     EXEC_T_ENV: str(self.timeline.get("transfer")),
                                     HOLDER_ENV: self.holder.for_exec()})
        if self.prebuild_fd >= 0:
            passed.append(self.prebuild_fd)
            if self.was_running:   # the new image's prebuilder runs the guest before Python
                from . import prebuild
                # (console output early only to a console the new image keeps)
                uart = "--console" not in self.exec_command[len(resume_command()):]
                if prebuild.write_early(self.prebuild_fd, self.machine, self.saved, uart=uart,
                                        corrupt="early-state" in self.faults.armed):
                    self.timeline.step("old: vCPU and VM state written for the early start")
        if self.prebuild_fd >= 0 and self.raised:   # (see _raise)
            from .prebuild import NICE_WAS_ENV
            env[NICE_WAS_ENV] = str(self.main_nice)
        try:
            for fd in passed:
                os.set_inheritable(fd, True)
            self.faults.check("exec")
            sys.stdout.flush()
            sys.stderr.flush()
            os.execve(program, self.exec_command, env)
        except OSError as e:
            raise VmmError(f"cannot exec {program}: {e.strerror}") from None
        finally:  # only reached when exec failed: take the fds back
            for fd in passed:
                if fd not in (state_fd, self.prebuild_fd):
                    os.set_inheritable(fd, False)
            os.close(state_fd)

    def _committed(self) -> bool:
        """Past "go": the guest is the new VMM's and is never resumed here.  Only its
        "running" makes this update completed; without it the update failed (the guest
        went with a new VMM that died, or is frozen with one that does not answer)."""
        try:
            if self._gone is not None:
                raise self._gone
            msg = self._running
            if msg is None:
                msg = self._expect_running(self.running_timeout)
            self.timeline.marks = [list(x) for x in msg.get("timeline", self.timeline.marks)]
            self.timeline.steps = [list(x) for x in msg.get("steps", self.timeline.steps)]
        except ChannelTimeout:
            self.error = (f"after \"go\", the new pyvmm did not report running within "
                          f"{self.running_timeout:g} s (stopped or hung?): it may still run the "
                          "guest; this pyvmm cannot take it back")
        except VmmError as e:
            self.error = (f"after \"go\", the new pyvmm went away before it reported running "
                          f"({e}): the guest went with it")
        self.channel.close()
        self.commit.close()
        self._close_handoff()
        self.machine.notify_devices("done")
        self._set_status("failed" if self.error else "completed")
        return True

    def _close_handoff(self) -> None:
        if self.handoff is not None:
            self.handoff.close()
            self.handoff = None

    def _resolve_early(self, error: Exception) -> Exception:
        """A failure here after the handoff of an early start: the new VMM may run the
        guest already.  Take it back if it does not (OPEN: our claim lands first);
        else tell the new VMM and wait for the guest handed back (HandedBack, the error
        to roll back with).  If the new VMM goes away with it instead, the guest went
        with it: self.committed."""
        if self._ours or self.commit is None or self.channel is None or \
                not (self.early_start and self.handed_over) or isinstance(error, HandedBack):
            return error
        if self.commit.holder() == OPEN and self.commit.claim(OLD):
            self._ours = True
            return error
        if self.commit.holder() == EARLY:
            try:
                self.channel.send({"msg": "error", "desc": str(error)})
            except VmmError:
                pass
        try:
            self._expect_running(self.running_timeout)
        except HandedBack as e:
            return e
        except VmmError:
            pass
        # (a thread that claimed the guest but could not start it gives the word back,
        # OPEN, before its VMM says anything: then the guest never ran there)
        if self.commit.holder() == OPEN and self.commit.claim(OLD):
            self._ours = True
            return error
        self.committed = True
        return error

    def _restore_handback(self, back: dict) -> None:
        """The guest's vCPU and VM state from the new VMM that ran it early: written
        into our (paused) vCPUs and VM, the TSC moved on by the time since it was read,
        as a restore does."""
        m = self.machine
        for vcpu in m.vcpus:
            vcpu.adopt_state({}, written_elsewhere=True)
        m.restore_state({"machine": m.shape(), "vm": back["vm"], "vcpus": back["vcpus"],
                         "time": back["time"]})
        self.timeline.step("old: the guest's state handed back, written into our vCPUs")

    def _failed(self, error: Exception, *, stopped: bool, was_running: bool = True) -> bool:
        """Roll back: devices re-acquired, guest resumed as if nothing happened."""
        if stopped:
            error = self._resolve_early(error)
        back = error.state if isinstance(error, HandedBack) else None
        if back is not None:
            try:
                self._restore_handback(back)
            except VmmError as e:   # (a state that does not fit this machine)
                error.state = back = None
                error = HandedBack({"desc": f"{error}; its state does not fit here: {e}"}, [])
        if self.committed or (isinstance(error, HandedBack) and back is None):
            # The guest ran in the new VMM, which went away with it (or gave it back
            # unreadable): nothing here may run it again.
            self.committed = True
            self.error = (f"the new pyvmm ran the guest (early start) and then failed "
                          f"({error}): the guest went with it")
            for closer in (self.channel, self.commit):
                if closer is not None:
                    closer.close()
            self.channel = self.commit = None
            self._close_handoff()
            self._set_status("failed")
            return True
        self.error = str(error)
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.commit is not None:
            self.commit.close()
            self.commit = None
        self._close_handoff()
        if getattr(self, "holder", None) is not None:
            self.holder.cancel()
            self.holder = None
        if getattr(self, "prebuild_fd", -1) >= 0:
            os.close(self.prebuild_fd)
            self.prebuild_fd = -1
        if stopped:
            if self.machine.roll_back(was_running=was_running, released=True,
                                      mmio_writes=back["mmio_writes"] if back else ()):
                self.emit("RESUME")
            self.timeline.mark("rollback")
        self._set_status("cancelled" if isinstance(error, Cancelled) else "failed")
        return False
