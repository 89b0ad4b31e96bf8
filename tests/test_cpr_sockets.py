"""The cpr-transfer socket against a stranger: crafted, malformed or foreign peers.

Each test talks to a real waiting `pyvmm run --incoming cpr-transfer:PATH` with a
hand-made client (no old pyvmm), the way a hostile or buggy process on the host would.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest

from conftest import ROOT, need_kvm, pyvmm_cmd

pytestmark = pytest.mark.usefixtures("kvm")

MiB = 1 << 20
RAM = 64 * MiB


@pytest.fixture(scope="module")
def kvm():
    need_kvm()


class Waiting:
    """`pyvmm run --incoming cpr-transfer:SOCK --qmp QMP`, its stderr readable while it runs."""

    def __init__(self, tmp_path, name="new", umask=-1):
        self.sock = tmp_path / f"{name}.cpr"
        self.qmp = tmp_path / f"{name}.qmp"
        self.err_path = tmp_path / f"{name}.stderr"
        self.out_path = tmp_path / f"{name}.stdout"
        with open(self.err_path, "wb") as err, open(self.out_path, "wb") as out:
            self.proc = subprocess.Popen(
                pyvmm_cmd("run", "--incoming", f"cpr-transfer:{self.sock}", "--qmp",
                          str(self.qmp)), cwd=ROOT, stdin=subprocess.DEVNULL,
                stdout=out, stderr=err, umask=umask)
        deadline = time.monotonic() + 15
        while not (self.sock.exists() and self.qmp.exists()):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.stderr()
            time.sleep(0.01)

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def lines(self, n: int, timeout: float = 15.0) -> list[str]:
        """Wait for at least n lines on stderr; return them all."""
        deadline = time.monotonic() + timeout
        while len(self.stderr().splitlines()) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.stderr().splitlines()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def waiting(tmp_path):
    """Start waiting pyvmms with waiting(name); all are stopped at teardown."""
    started = []

    def start(name="new", where=None, **kw):
        w = Waiting(where or tmp_path, name, **kw)
        started.append(w)
        return w
    yield start
    for w in started:
        w.stop()


def b64(data: bytes) -> dict:
    import base64
    return {"__bytes__": base64.b64encode(data).decode()}


def shape(cpuid: bytes, **over) -> dict:
    """A machine shape as the old pyvmm's hello carries it (bytes made JSON-safe)."""
    s = {"arch": "x86_64", "vcpus": 1,
         "memory": {"size": RAM, "name": "pyvmm-ram", "hugetlb": False,
                    "regions": [[0, RAM, 0]]},
         "kernel": None, "cmdline": "", "cpuid": [b64(cpuid)]}
    s.update(over)
    return s


def hello(shape_tree, **over) -> bytes:
    msg = {"msg": "hello", "protocol": "pyvmm-cpr", "version": 1, "shape": shape_tree,
           "config": {}, "faults": []}
    msg.update(over)
    return json.dumps(msg).encode()


def ram_memfd() -> int:
    fd = os.memfd_create("test-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, RAM)
    return fd


def send_hello(sock_path, data: bytes, fds=None):
    """Connect, send one message (with a RAM memfd) and return the reply (or None on EOF)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(20)
    s.connect(str(sock_path))
    own = fds is None
    fds = [ram_memfd()] if own else fds
    try:
        socket.send_fds(s, [data], fds)
        try:
            reply = s.recv(65536)
        except OSError:
            reply = b""
        return json.loads(reply) if reply else None
    finally:
        s.close()
        if own:
            for fd in fds:
                os.close(fd)


def crafted_cpuid() -> bytes:
    """nent says 1 entry (48 bytes); the bytes go on for 200 more entries."""
    return (1).to_bytes(4, "little") + bytes(4) + bytes(40 * 201)


def test_crafted_cpuid_hello_is_refused_without_a_crash(waiting):
    """CPUID bytes longer than their `nent` once overflowed an 8-byte cffi allocation
    (free(): invalid next size, SIGABRT): now a one-line refusal naming the CPUID."""
    new = waiting()
    reply = send_hello(new.sock, hello(shape(crafted_cpuid())))
    assert reply is not None and reply["msg"] == "error", reply
    assert "cpuid" in reply["desc"].lower(), reply
    lines = new.lines(1)
    time.sleep(0.3)
    rc = new.proc.poll()
    assert rc is None or rc >= 0, f"pyvmm killed by signal {-rc}: {new.stderr()}"
    assert len(lines) == 1 and "cpuid" in lines[0].lower(), new.stderr()
    assert "Traceback" not in new.stderr()


# -- a state or shape that passes the checksum but not the schema ---------------------------
@pytest.fixture(scope="module")
def saved(kvm):
    """(shape, state) of a real, freshly created 64 MiB machine, as the old pyvmm saves them."""
    from vmm.machine import Machine, MachineConfig
    m = Machine(MachineConfig(memory=RAM, console=lambda data: None))
    try:
        m.create()
        state = m.save_state()
        return m.shape(), state
    finally:
        m.close()


def tree(shape_dict) -> dict:
    from vmm.state import encode_tree
    return encode_tree(shape_dict)


def with_cpr(state, mode="cpr-transfer", fds=None) -> dict:
    return dict(state, cpr={"mode": mode, "timeline": [["stop", 1]], "steps": [],
                            "fds": fds or {"ram": 3}, "config": {}, "faults": []})


def mutated(state, path: str, value=KeyError):
    """A deep copy of `state` with the field at dotted `path` replaced (or removed)."""
    import copy
    out = copy.deepcopy(state)
    *parents, last = path.split(".")
    node = out
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if value is KeyError:
        del node[last]
    else:
        node[int(last) if isinstance(node, list) else last] = value
    return out


class Client:
    """A hand-made old VMM: hello (+RAM memfd), then whatever state it is given."""

    def __init__(self, sock_path, shape_dict):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.s.settimeout(30)
        self.s.connect(str(sock_path))
        ram = ram_memfd()
        try:
            socket.send_fds(self.s, [hello(tree(shape_dict))], [ram])
        finally:
            os.close(ram)

    def reply(self):
        data = self.s.recv(65536)
        return json.loads(data) if data else None

    def send_state(self, state) -> dict | None:
        from vmm.state import dumps, to_memfd
        fd = to_memfd(dumps(state))
        try:
            socket.send_fds(self.s, [json.dumps({"msg": "state", "fds": ["state"],
                                                 "t_transfer": 1}).encode()], [fd])
        finally:
            os.close(fd)
        return self.reply()

    def close(self):
        self.s.close()


@pytest.mark.parametrize("path,value,expect", [
    ("devices.serial.state.lsr", KeyError, "state: devices.serial.state.lsr: missing"),
    ("vm.clock_ns", "12", "state: vm.clock_ns: expected int, got str"),
    ("vcpus.0.lapic", b"\0" * 8,
     "state: vcpus[0].lapic: expected 1024 bytes, got 8 (a state from another kernel "
     "or pyvmm version?)"),
    ("machine.memory.size", "64M", "state: machine.memory.size: expected int, got str"),
    ("cpr.fds", [], "state: cpr.fds: expected map, got list"),
])
def test_state_missing_or_mistyped_field_is_refused_naming_it(waiting, saved, path, value,
                                                              expect):
    """A state blob with a good checksum but a missing or mistyped field: the old VMM is
    told which field, and the new one says the same in one line (no traceback)."""
    shape_dict, state = saved
    new = waiting()
    c = Client(new.sock, shape_dict)
    try:
        assert c.reply()["msg"] == "prepared"
        reply = c.send_state(mutated(with_cpr(state), path, value))
    finally:
        c.close()
    assert reply == {"msg": "error", "desc": expect}
    assert new.proc.wait(15) == 1
    err = new.stderr()
    assert err.strip().splitlines() == [f"pyvmm: error: {expect}"], err


@pytest.mark.parametrize("path,value,expect", [
    ("memory", "64M", "shape: memory: expected map, got str"),
    ("memory.size", "64M", "shape: memory.size: expected int, got str"),
    ("vcpus", KeyError, "shape: vcpus: missing"),
    ("cpuid.0", (1 << 31).to_bytes(4, "little") + bytes(4),
     "shape: cpuid[0]: 2147483648 entries, at most 256"),
])
def test_shape_missing_or_mistyped_field_is_refused_naming_it(waiting, saved, path, value,
                                                              expect):
    """The same for the shape in a `hello`: refused before KVM is touched, one line,
    and the pyvmm goes on waiting."""
    shape_dict, _ = saved
    new = waiting()
    c = Client(new.sock, mutated(shape_dict, path, value))
    try:
        assert c.reply() == {"msg": "error", "desc": expect}
    finally:
        c.close()
    lines = new.lines(1)
    assert lines == [f"pyvmm: cpr socket: refused process {os.getpid()} (uid {os.getuid()}): "
                     f"{expect}; still waiting"], new.stderr()
    assert new.alive()


def exec_resume_with(blob: bytes, tmp_path) -> subprocess.CompletedProcess:
    """The cpr-exec new image (its real resume command) started on this state blob."""
    from vmm.cpr import EXEC_STATE_ENV, resume_command
    fd = os.memfd_create("test-state", 0)
    ram = ram_memfd()
    try:
        os.write(fd, blob)
        os.set_inheritable(ram, True)
        env = dict(os.environ, **{EXEC_STATE_ENV: str(fd)})
        env.pop("PYVMM_CPR_FAULT", None)
        return subprocess.run(resume_command(), env=env, pass_fds=(fd, ram), cwd=tmp_path,
                              capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL), ram
    finally:
        os.close(fd)
        os.close(ram)


@pytest.mark.parametrize("path,value,expect", [
    ("devices.serial.state.lsr", KeyError, "state: devices.serial.state.lsr: missing"),
    ("vm.clock_ns", "12", "state: vm.clock_ns: expected int, got str"),
    ("cpr.fds.ram", KeyError, "state: cpr: fds: no RAM fd named \"ram\""),
])
def test_cpr_exec_state_blob_is_checked_too(saved, tmp_path, path, value, expect):
    """cpr-exec's state memfd (PYVMM_CPR_EXEC_STATE) goes through the same schema: the
    new image says which field in one line instead of a traceback."""
    from vmm.state import dumps
    _, state = saved
    blob_state = with_cpr(state, "cpr-exec", {"ram": 99})
    p, _ = exec_resume_with(dumps(mutated(blob_state, path, value)), tmp_path)
    assert p.returncode == 1, p.stderr
    assert p.stderr.strip().splitlines() == [
        f"pyvmm: error: live update failed in the new process: {expect}"], p.stderr


# -- who may connect ------------------------------------------------------------------------
def test_sockets_are_owner_only_whatever_the_umask(waiting):
    """Both the cpr and the QMP socket are 0600 even under umask 0."""
    new = waiting(umask=0)
    for path in (new.sock, new.qmp):
        mode = os.stat(path).st_mode & 0o777
        assert mode == 0o600, f"{path.name} is {mode:o}"


def test_refused_peers_leave_it_waiting_and_a_real_update_completes(guests, vmm_procs,
                                                                   waiting, tmp_path):
    """A connect-and-close, garbage, a wrong protocol version and a hello without its RAM
    memfd each cost one line on stderr; the same waiting pyvmm then takes a real update."""
    from test_cpr import cpr_transfer, new_info, start_ticker
    old, old_qmp = start_ticker(vmm_procs, tmp_path)
    old.wait_for(r"tick 3 ")
    new = waiting()

    def connect():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.settimeout(15)
        s.connect(str(new.sock))
        return s

    connect().close()                                        # connect-and-close
    assert "closed the connection" in new.lines(1)[-1], new.stderr()
    s = connect()
    s.send(b"\\x00\\xffnot json")                             # garbage
    assert json.loads(s.recv(65536))["msg"] == "error"
    s.close()
    assert "garbage" in new.lines(2)[-1], new.stderr()
    reply = send_hello(new.sock, hello({}, version=99))      # another protocol version
    assert "protocol 99" in reply["desc"], reply
    assert "protocol 99" in new.lines(3)[-1], new.stderr()
    reply = send_hello(new.sock, hello({}), fds=[])         # no RAM memfd
    assert reply["msg"] == "error", reply
    lines = new.lines(4)
    assert len(lines) == 4 and all(line.endswith("still waiting") for line in lines), lines
    assert new.alive()

    info = cpr_transfer(old_qmp, new.sock)    # None: the old VMM went away at once
    assert info is None or info["status"] == "completed", info
    assert old.wait(15) == 0                 # old exits only after the new one runs
    assert new_info(new.qmp)["status"] == "completed"
    deadline = time.monotonic() + 15
    while "tick" not in new.out_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "tick" in new.out_path.read_text()
    assert len(new.stderr().splitlines()) == 4, new.stderr()


@pytest.fixture
def shared_dir():
    """A directory another user can traverse (pytest's tmp_path is 0700)."""
    import shutil
    import tempfile
    d = tempfile.mkdtemp(prefix="pyvmm-sockets-", dir="/tmp")
    os.chmod(d, 0o755)
    from pathlib import Path
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


NOBODY = 65534
STRANGER = """
import json, os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.settimeout(15)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print(json.dumps({"connect": e.strerror}))
    raise SystemExit
ram = os.memfd_create("ram")
os.ftruncate(ram, int(sys.argv[2]))
try:
    socket.send_fds(s, [sys.stdin.buffer.read()], [ram])
except BrokenPipeError:
    pass   # refused at once: the refusal still waits in our queue
try:
    data = s.recv(65536)
except ConnectionResetError:
    data = b""
print(json.dumps({"reply": json.loads(data) if data else None}))
"""


def as_nobody(sock_path, data: bytes) -> dict:
    import shutil
    python = shutil.which("python3", path="/usr/bin:/bin")   # (this venv is under /root, 0700)
    if python is None:
        pytest.skip("no system python3 for the other user to run")
    p = subprocess.run([python, "-I", "-S", "-c", STRANGER, str(sock_path), str(RAM)],
                       input=data, capture_output=True, timeout=30, user=NOBODY,
                       group=NOBODY, extra_groups=[])
    assert p.returncode == 0, p.stderr.decode()
    return json.loads(p.stdout)


def test_another_user_is_kept_out(waiting, saved, shared_dir):
    """Another user cannot connect (0600), and if the socket is opened up anyway
    (chmod) its hello is refused on SO_PEERCRED; the pyvmm goes on waiting for its own."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as another user")
    shape_dict, _ = saved
    new = waiting(where=shared_dir)
    data = hello(tree(shape_dict))
    assert as_nobody(new.sock, data) == {"connect": "Permission denied"}
    os.chmod(new.sock, 0o666)
    assert as_nobody(new.sock, data) == {"reply": None}      # closed on, without a word
    lines = new.lines(1)
    assert len(lines) == 1 and "uid 65534" in lines[0] and "still waiting" in lines[0], lines
    c = Client(new.sock, shape_dict)       # its own user's old VMM is still welcome
    try:
        assert c.reply()["msg"] == "prepared"
    finally:
        c.close()


def test_a_silent_peer_does_not_hold_the_socket(waiting, saved):
    """A peer of ours that connects and says nothing is dropped after the hello timeout
    (10 s); the old VMM that connected meanwhile is then served."""
    shape_dict, _ = saved
    new = waiting()
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    silent.connect(str(new.sock))
    try:
        c = Client(new.sock, shape_dict)       # queued behind the silent one
        try:
            assert c.reply()["msg"] == "prepared"
        finally:
            c.close()
    finally:
        silent.close()
    lines = new.lines(1)
    assert len(lines) == 1 and "timed out" in lines[0] and "still waiting" in lines[0], lines


def test_a_socket_path_appears_only_once_it_accepts(tmp_path):
    """A client that waits for the path and connects at once (a script's `while [ ! -S
    ...]`, the old VMM of a cpr-transfer, a benchmark) is never refused: the cpr and
    the QMP socket are listening before their paths exist (a bound, not yet listening
    socket answers ECONNREFUSED; a benchmark under load hit it)."""
    for rep in range(8):
        sock, qmp = tmp_path / f"n{rep}.cpr", tmp_path / f"n{rep}.qmp"
        p = subprocess.Popen(pyvmm_cmd("run", "--incoming", f"cpr-transfer:{sock}", "--qmp",
                                       str(qmp)), cwd=ROOT, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            pending = {sock: socket.SOCK_SEQPACKET, qmp: socket.SOCK_STREAM}
            deadline = time.monotonic() + 15
            while pending:
                assert p.poll() is None and time.monotonic() < deadline
                for path, kind in list(pending.items()):
                    if os.path.exists(path):    # connect the instant it appears
                        with socket.socket(socket.AF_UNIX, kind) as c:
                            c.connect(str(path))     # ECONNREFUSED here is the bug
                        del pending[path]
        finally:
            p.terminate()
            p.wait(10)
