"""The QMP server under abuse: too many clients, too few fds, deep nesting,
clients that close without reading or stop reading, a broken server loop.

The fd and pipelining cases run a real pyvmm (a ticker guest on KVM) with the
limits a user can hit (`ulimit -n 64`); the framing cases use the in-process
monitor with test_monitor's recording controller and raw sockets, since no
QMP library sends such input.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from conftest import ROOT, need_kvm, pyvmm_cmd
from test_monitor import Raw, Recorder
from vmm.qmp.framing import MAX_NESTING, JsonStream
from vmm.qmp.server import MAX_CLIENTS, MAX_OUTPUT, Monitor
from vmm.qmp_client import QmpClient

NESTING_ERROR = {"error": {"class": "GenericError", "desc": "JSON nesting depth limit exceeded"}}


@pytest.fixture
def sockdir():
    d = tempfile.mkdtemp(prefix="qmpl", dir="/tmp")   # sun_path is short
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def mon(sockdir):
    m = Monitor(os.path.join(sockdir, "qmp.sock"), Recorder())
    m.start()
    yield m
    m.close()


def read_line(sock) -> dict | None:
    """One QMP line from a raw socket, or None at EOF."""
    buf = b""
    while not buf.endswith(b"\n"):
        try:
            data = sock.recv(1)
        except ConnectionResetError:
            data = b""
        if not data:
            return None
        buf += data
    return json.loads(buf)


def is_socket(path) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def connect_qmp(path, timeout=15.0) -> QmpClient:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return QmpClient(path, timeout=5).__enter__()
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Pyvmm:
    """A real `pyvmm run` of the ticker guest with a QMP socket, optionally
    under an open-file limit (set in the child before exec, as `ulimit -n`)."""

    def __init__(self, guests, sockdir, nofile=None):
        need_kvm()
        self.path = os.path.join(sockdir, "vmm.qmp")
        self.err_path = os.path.join(sockdir, "stderr")

        def limit():
            if nofile:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        with open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                pyvmm_cmd("run", "--kernel", str(guests / "ticker.elf"),
                          "--cmdline", "period_us=100000", "--qmp", self.path),
                stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL, cwd=ROOT,
                preexec_fn=limit)
        c = connect_qmp(self.path)
        c.close()

    @property
    def stderr(self) -> str:
        with open(self.err_path) as f:
            return f.read()

    def status(self) -> str:
        with QmpClient(self.path, 5) as c:
            return c.execute("query-status")["status"]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def pyvmm(guests, sockdir):
    started = []

    def start(**kw):
        p = Pyvmm(guests, sockdir, **kw)
        started.append(p)
        return p
    yield start
    for p in started:
        p.stop()


# -- clients and file descriptors ---------------------------------------------------------

@pytest.mark.parametrize("nofile, refusal", [
    (64, "Too many QMP clients"),              # MAX_CLIENTS comes first
    (40, "Too few file descriptors left"),     # FD_HEADROOM comes first
])
def test_ulimit_and_60_clients(pyvmm, nofile, refusal):
    """Past the client limit a client gets an error and is closed; the VMM keeps
    serving, the socket stays, and a client is served again once some leave."""
    vmm = pyvmm(nofile=nofile)
    greeted, refused = [], []
    for _ in range(60):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(vmm.path)
        msg = read_line(s)
        if msg is not None and "QMP" in msg:
            greeted.append(s)
        else:
            refused.append((s, msg))
    assert is_socket(vmm.path)
    assert 1 <= len(greeted) <= MAX_CLIENTS
    assert len(refused) == 60 - len(greeted) > 0
    for s, msg in refused:
        assert msg is not None and msg["error"]["class"] == "GenericError", msg
        assert refusal in msg["error"]["desc"] and "try again later" in msg["error"]["desc"], msg
        assert read_line(s) is None          # and then closed
        s.close()
    # The clients it took are served normally.
    for s in greeted[:3]:
        s.sendall(b'{"execute": "qmp_capabilities"}{"execute": "query-status"}')
        assert read_line(s) == {"return": {}}
        assert read_line(s)["return"]["status"] == "running"
    # Some leave; a new client is served (once the server has seen them go).
    for s in greeted[:5]:
        s.close()
    del greeted[:5]
    client = connect_qmp(vmm.path, timeout=10)
    assert client.execute("query-status")["status"] == "running"
    assert is_socket(vmm.path)
    assert vmm.proc.poll() is None
    client.execute("quit")
    client.close()
    assert vmm.proc.wait(15) == 0
    for s in greeted:
        s.close()
    assert not os.path.exists(vmm.path)      # a real exit removes it
    assert "Traceback" not in vmm.stderr, vmm.stderr


_FD_EXHAUSTION = r"""
import os, resource, sys
from vmm.qmp.server import Monitor

class Ctl:
    def query_status(self):
        return {"status": "running", "running": True}

m = Monitor(sys.argv[1], Ctl())
m.start()
print("logging" in sys.modules, flush=True)   # False: the lazy import is still to come
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
fill = []
try:
    while True:
        fill.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
print("full", flush=True)
sys.stdin.readline()
for fd in fill:
    os.close(fd)
print("freed", flush=True)
sys.stdin.readline()
"""


def cpu_seconds(pid) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_accept_without_fds_backs_off_and_recovers(sockdir):
    """accept() failing with EMFILE (the fds are used up elsewhere in the
    process, logging not yet imported): the monitor neither dies nor spins,
    the client waits in the backlog and is served once fds are free again."""
    path = os.path.join(sockdir, "qmp.sock")
    proc = subprocess.Popen([sys.executable, "-c", _FD_EXHAUSTION, path], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "False"
        assert proc.stdout.readline().strip() == "full"
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(path)        # waits in the backlog: the server has no fd for it
        time.sleep(0.3)
        before = cpu_seconds(proc.pid)
        time.sleep(1.0)            # two retries at least
        spent = cpu_seconds(proc.pid) - before
        assert spent < 0.3, f"the monitor spins on EMFILE ({spent:.2f} s CPU in 1 s)"
        assert is_socket(path)
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "freed"
        assert "QMP" in read_line(s)
        s.sendall(b'{"execute": "qmp_capabilities"}{"execute": "query-status", "id": 1}')
        assert read_line(s) == {"return": {}}
        assert read_line(s) == {"return": {"status": "running", "running": True}, "id": 1}
        s.close()
    finally:
        proc.stdin.close()
        proc.wait(10)
    err = proc.stderr.read()
    assert "Traceback" not in err, err
    # Said once (on stderr: logging could not even be imported), not per retry.
    assert err.count("Too many open files") == 1, err


def test_an_unexpected_error_in_the_loop_keeps_the_monitor_and_its_socket(mon, monkeypatch):
    real_accept = mon._accept
    calls = []

    def broken_once():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected")
        real_accept()
    monkeypatch.setattr(mon, "_accept", broken_once)
    raw = Raw(mon.path)           # the first accept fails; the retry greets it
    raw.send(b'{"execute": "query-status", "id": 1}')
    assert raw.recv()["id"] == 1
    assert mon._thread.is_alive() and is_socket(mon.path)
    raw.close()


# -- nesting ----------------------------------------------------------------------------

def test_nesting_limit_is_reported_when_reached():
    s = JsonStream()
    assert s.feed(b"[" * MAX_NESTING) == []
    assert s.feed(b"[") == [(None, NESTING_ERROR["error"]["desc"])]
    # Like QEMU's json-streamer: the rest of that value is eaten, without
    # further errors and without being kept, until the brackets balance.
    assert s.feed(b'[{"a": "]]]"}' * 50000) == []
    assert len(s._buf) < 100
    assert s.feed(b"]" * (50000 + MAX_NESTING + 1) + b' {"ok": 1}') == [({"ok": 1}, None)]


def test_deep_unclosed_nesting_gets_an_error_at_once_and_the_client_recovers(mon):
    raw = Raw(mon.path)
    raw.send(b'{"execute": "query-status", "arguments": ' + b"[" * 100000)
    assert raw.recv() == NESTING_ERROR
    raw.send(b"]" * 100000 + b"}")           # the value ends: back to normal
    raw.send(b'{"execute": "query-status", "id": 2}')
    assert raw.recv() == {"return": {"status": "running", "running": True}, "id": 2}
    # A control character ends the recovery too (qmp-spec's way to resync).
    raw.send(b"{" * 1000)
    assert raw.recv() == NESTING_ERROR
    raw.send(b'\x01{"execute": "query-status", "id": 3}')
    assert raw.recv()["id"] == 3
    raw.close()


# -- clients that do not read ---------------------------------------------------------------

def test_pipelined_commands_run_though_the_client_closed_without_reading(pyvmm):
    """QEMU runs every command it received before EOF; so must pyvmm, even
    when a reply cannot be delivered."""
    vmm = pyvmm()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(vmm.path)
    s.shutdown(socket.SHUT_RD)     # every reply to it fails (EPIPE), from the first
    s.sendall(b'{"execute": "qmp_capabilities"}{"execute": "bad-command"}{"execute": "stop"}')
    s.close()
    deadline = time.monotonic() + 10
    while vmm.status() != "paused":
        assert time.monotonic() < deadline, "stop after a failed reply was lost"
        time.sleep(0.05)
    # The plain way: send, close, never read.
    with QmpClient(vmm.path, 5) as c:
        c.execute("cont")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(vmm.path)
    s.sendall(b'{"execute": "qmp_capabilities"}{"execute": "bad-command"}'
              b'{"execute": "query-status"}{"execute": "stop"}')
    s.close()
    deadline = time.monotonic() + 10
    while vmm.status() != "paused":
        assert time.monotonic() < deadline, "stop after a failed reply was lost"
        time.sleep(0.05)
    assert vmm.proc.poll() is None


def test_half_closed_client_gets_every_reply(mon):
    """`socat` style: send the commands, shut the write side, read until EOF.
    Replies beyond what the socket buffers must not be thrown away."""
    n = 4000
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(mon.path)
    s.sendall(b'{"execute": "qmp_capabilities"}'
              + b"".join(b'{"execute": "query-commands", "id": %d}' % i for i in range(n)))
    s.shutdown(socket.SHUT_WR)
    time.sleep(0.5)                # a slow reader: the server sees EOF long before
    data = b""
    while True:
        chunk = s.recv(1 << 16)
        if not chunk:
            break
        data += chunk
    s.close()
    lines = data.splitlines()
    assert len(data) > 1 << 20     # far more than a socket buffer (208 KiB) holds
    assert len(lines) == n + 2     # greeting, capabilities, n replies
    assert json.loads(lines[-1])["id"] == n - 1


def test_client_that_never_reads_is_dropped_alone(mon):
    lazy = Raw(mon.path)
    other = Raw(mon.path)
    request = b'{"execute": "query-commands"}' * 1000
    sent = 0
    deadline = time.monotonic() + 60
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        while time.monotonic() < deadline:
            lazy.sock.sendall(request)
            sent += len(request)
    lazy.close()
    assert sent < 4 * MAX_OUTPUT     # replies are far bigger than requests
    other.send(b'{"execute": "query-status", "id": 1}')
    assert other.recv()["id"] == 1
    other.close()


def test_events_to_a_client_that_never_reads_are_bounded(mon):
    lazy = Raw(mon.path)
    lazy.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stop = threading.Event()

    def flood():
        data = {"blob": "x" * 4096}
        while not stop.is_set():
            mon.emit("TEST", data)
    t = threading.Thread(target=flood, daemon=True)
    t.start()
    try:
        # Dropped once its queue passes MAX_OUTPUT: recv reaches EOF.
        deadline = time.monotonic() + 60
        got = 0
        while time.monotonic() < deadline:
            time.sleep(0.5)
            if not mon._clients:
                break
        assert not mon._clients
        lazy.sock.settimeout(5)
        while True:
            chunk = lazy.sock.recv(1 << 16)
            if not chunk:
                break
            got += len(chunk)
        assert got < 2 * MAX_OUTPUT
    finally:
        stop.set()
        t.join()
    lazy.close()
    with QmpClient(mon.path, 5) as c:
        assert c.execute("query-status")["running"]
