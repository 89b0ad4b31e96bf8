"""The QMP monitor, driven by QEMU's own client library (qemu.qmp).

The controller here only records calls: what is under test is the wire
protocol and the server (framing, negotiation, errors, events, several
clients, the listening-fd handoff).  Raw sockets cover the garbage cases a
well-behaved library will not send.
"""

import asyncio
import json
import os
import shutil
import socket
import tempfile
import threading
import time

import pytest

from vmm.errors import VmmError
from vmm.client import QmpClient, QmpError
from vmm.qmp.framing import MAX_INPUT, JsonStream
from vmm.qmp.server import Monitor

qmp = pytest.importorskip("qemu.qmp")
from qemu.qmp import ExecuteError, QMPClient  # noqa: E402
from qemu.qmp.legacy import QEMUMonitorProtocol  # noqa: E402


class Recorder:
    """A controller that records every call and plays a tiny VM state."""

    def __init__(self):
        self.calls = []
        self.status = "running"
        self.params = {"mode": "normal"}

    def query_status(self):
        return {"status": self.status, "running": self.status == "running"}

    def stop(self):
        self.calls.append(("stop",))
        self.status = "paused"

    def cont(self):
        self.calls.append(("cont",))
        self.status = "running"

    def quit(self):
        self.calls.append(("quit",))

    def set_migrate_parameters(self, params):
        self.calls.append(("set_migrate_parameters", params))
        self.params.update(params)

    def query_migrate_parameters(self):
        return dict(self.params)

    def migrate(self, main_addr, cpr_addr):
        self.calls.append(("migrate", main_addr, cpr_addr))
        if main_addr.get("path") == "/fail":
            raise VmmError("cannot connect to /fail")

    def query_migrate(self):
        return {"status": "active", "total-time": 5, "x-phases": {"setup": 1}}

    def migrate_cancel(self):
        self.calls.append(("migrate_cancel",))


@pytest.fixture
def sockdir():
    # Short: sun_path is limited to 108 bytes and pytest's tmp_path can be longer.
    d = tempfile.mkdtemp(prefix="qmp", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def ctl():
    return Recorder()


@pytest.fixture
def mon(sockdir, ctl):
    m = Monitor(os.path.join(sockdir, "qmp.sock"), ctl)
    m.start()
    yield m
    m.close()


@pytest.fixture
def legacy(mon):
    q = QEMUMonitorProtocol(mon.path)
    q.connect()
    yield q
    q.close()


class Raw:
    """A raw socket client for the cases a QMP library will not produce."""

    def __init__(self, path, negotiate=True):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self.buf = b""
        self.greeting = self.recv()
        if negotiate:
            self.send(b'{"execute": "qmp_capabilities"}')
            assert self.recv() == {"return": {}}

    def send(self, data: bytes):
        self.sock.sendall(data)

    def recv(self):
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        assert line.endswith(b"\r"), "QMP lines end in CRLF like QEMU's"
        return json.loads(line)

    def close(self):
        self.sock.close()


def run_async(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


# -- greeting and negotiation -------------------------------------------------

def test_greeting_and_negotiation_with_qemu_qmp(mon):
    async def go():
        client = QMPClient("test")
        await client.connect(mon.path)
        try:
            greeting = client.greeting
            assert greeting.QMP.version["qemu"]["major"] == 10
            assert greeting.QMP.version["package"].startswith("pyvmm ")
            assert "oob" in greeting.QMP.capabilities
            version = await client.execute("query-version")
            assert version["qemu"] == {"major": 10, "minor": 2, "micro": 0}
            names = {c["name"] for c in await client.execute("query-commands")}
            assert {"qmp_capabilities", "query-status", "stop", "cont", "quit", "migrate",
                    "migrate-set-parameters", "query-migrate-parameters", "query-migrate",
                    "migrate_cancel"} <= names
            # The recorder has no query_state, so the command does not exist.
            assert "x-query-state" not in names
            with pytest.raises(ExecuteError) as err:
                await client.execute("x-query-state")
            assert err.value.error_class == "CommandNotFound"
            with pytest.raises(ExecuteError) as err:
                await client.execute("qmp_capabilities")
            assert err.value.error_class == "CommandNotFound"
            assert "already complete" in str(err.value)
        finally:
            await client.disconnect()
    run_async(go())


def test_commands_before_negotiation_are_refused(mon):
    raw = Raw(mon.path, negotiate=False)
    assert raw.greeting["QMP"]["capabilities"] == ["oob"]
    raw.send(b'{"execute": "query-status", "id": 7}')
    assert raw.recv() == {"id": 7, "error": {
        "class": "CommandNotFound",
        "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}
    raw.send(b'{"execute": "qmp_capabilities", "arguments": {"enable": ["nope"]}, "id": 8}')
    reply = raw.recv()
    assert reply["error"]["class"] == "GenericError" and reply["id"] == 8
    raw.send(b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}')
    assert raw.recv() == {"return": {}}
    raw.send(b'{"execute": "query-status", "id": "a"}')
    assert raw.recv() == {"return": {"status": "running", "running": True}, "id": "a"}
    # With oob enabled exec-oob is understood, but no pyvmm command is OOB.
    raw.send(b'{"exec-oob": "query-status", "id": "b"}')
    assert raw.recv()["error"]["desc"] == "The command query-status does not support OOB"
    raw.close()


# -- commands reach the controller --------------------------------------------

def test_query_status_stop_cont(legacy, ctl):
    assert legacy.cmd("query-status") == {"status": "running", "running": True}
    assert legacy.cmd("stop") == {}
    assert legacy.cmd("query-status") == {"status": "paused", "running": False}
    assert legacy.cmd("cont") == {}
    assert ctl.calls == [("stop",), ("cont",)]


def test_quit_replies_before_the_controller_acts(legacy, ctl):
    assert legacy.cmd("quit") == {}
    deadline = time.monotonic() + 5
    while ("quit",) not in ctl.calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ctl.calls == [("quit",)]


def test_migrate_with_channels(legacy, ctl):
    assert legacy.cmd("migrate-set-parameters", **{
        "mode": "cpr-transfer", "downtime-limit": 300}) == {}
    assert ctl.calls[-1] == ("set_migrate_parameters", {"mode": "cpr-transfer",
                                                        "downtime-limit": 300})
    assert legacy.cmd("query-migrate-parameters")["mode"] == "cpr-transfer"
    channels = [
        {"channel-type": "main",
         "addr": {"transport": "socket", "type": "unix", "path": "/tmp/main.sock"}},
        {"channel-type": "cpr",
         "addr": {"transport": "socket", "type": "unix", "path": "/tmp/cpr.sock"}},
    ]
    assert legacy.cmd("migrate", channels=channels) == {}
    assert ctl.calls[-1] == ("migrate",
                             {"transport": "socket", "type": "unix", "path": "/tmp/main.sock"},
                             {"transport": "socket", "type": "unix", "path": "/tmp/cpr.sock"})
    file_main = [{"channel-type": "main",
                  "addr": {"transport": "file", "filename": "/tmp/state", "offset": 4096}}]
    assert legacy.cmd("migrate", channels=file_main, detach=False) == {}   # (accepted, ignored)
    assert ctl.calls[-1] == ("migrate", {"transport": "file", "filename": "/tmp/state",
                                         "offset": 4096}, None)
    assert legacy.cmd("query-migrate")["status"] == "active"
    assert legacy.cmd("migrate_cancel") == {}
    assert ctl.calls[-1] == ("migrate_cancel",)


@pytest.mark.parametrize("uri, addr", [
    ("unix:/tmp/m.sock", {"transport": "socket", "type": "unix", "path": "/tmp/m.sock"}),
    ("file:/tmp/img", {"transport": "file", "filename": "/tmp/img"}),
    ("file:/tmp/img,offset=0x1000", {"transport": "file", "filename": "/tmp/img",
                                     "offset": 4096}),
    ("tcp:127.0.0.1:4444", {"transport": "socket", "type": "inet", "host": "127.0.0.1",
                            "port": "4444"}),
    ("tcp:[::1]:4444", {"transport": "socket", "type": "inet", "host": "::1", "port": "4444"}),
    ("fd:migfd", {"transport": "socket", "type": "fd", "str": "migfd"}),
    ("exec:cat > /dev/null", {"transport": "exec",
                              "args": ["/bin/sh", "-c", "cat > /dev/null"]}),
    ("exec:", {"transport": "exec", "args": ["/bin/sh", "-c", ""]}),
])
def test_migrate_with_uri(legacy, ctl, uri, addr):
    assert legacy.cmd("migrate", uri=uri) == {}
    assert ctl.calls[-1] == ("migrate", addr, None)


@pytest.mark.parametrize("args, desc", [
    ({}, "neither 'uri' or 'channels'"),
    ({"uri": "unix:/a", "channels": []}, "mutually exclusive"),
    ({"uri": "bogus:/a"}, "unknown migration protocol: bogus:/a"),
    ({"channels": []}, "missing 'main' migration channel"),
    ({"channels": [{"channel-type": "cpr", "addr": {"transport": "file", "filename": "/f"}}]},
     "missing 'main' migration channel"),
    ({"channels": [{"channel-type": "main", "addr": {"transport": "file", "filename": "/f"}},
                   {"channel-type": "main", "addr": {"transport": "file", "filename": "/g"}}]},
     "Channel list has more than one main entry"),
    ({"channels": [{"channel-type": "side", "addr": {}}]},
     "Parameter 'channels[0].channel-type' does not accept value 'side'"),
    ({"channels": [{"channel-type": "main",
                    "addr": {"transport": "socket", "type": "unix"}}]},
     "Parameter 'channels[0].addr.path' is missing"),
    ({"channels": [{"channel-type": "main",
                    "addr": {"transport": "socket", "type": "unix", "path": 5}}]},
     "Invalid parameter type for 'channels[0].addr.path', expected: string"),
    ({"channels": [{"channel-type": "main",
                    "addr": {"transport": "file", "filename": "/f", "extra": 1}}]},
     "Parameter 'channels[0].addr.extra' is unexpected"),
    ({"uri": 5}, "Invalid parameter type for 'uri', expected: string"),
    ({"uri": "unix:/a", "bogus": True}, "Parameter 'bogus' is unexpected"),
    ({"uri": "unix:/fail"}, "cannot connect to /fail"),
])
def test_migrate_bad_arguments(legacy, ctl, args, desc):
    reply = legacy.cmd_raw("migrate", args)
    assert reply["error"]["class"] == "GenericError"
    assert desc in reply["error"]["desc"]
    assert all(c[0] != "migrate" or c[1].get("path") == "/fail" for c in ctl.calls)


def test_migrate_set_parameters_checks_types(legacy, ctl):
    for args, desc in [
        ({"mode": "warp"}, "Parameter 'mode' does not accept value 'warp'"),
        ({"cpr-exec-command": "pyvmm"},
         "Invalid parameter type for 'cpr-exec-command', expected: array"),
        ({"cpr-exec-command": ["pyvmm", 1]},
         "Invalid parameter type for 'cpr-exec-command[1]', expected: string"),
        ({"max-bandwidth": True}, "Invalid parameter type for 'max-bandwidth', expected: integer"),
        ({"multifd": True}, "Parameter 'multifd' is unexpected"),
    ]:
        assert legacy.cmd_raw("migrate-set-parameters", args)["error"]["desc"] == desc
    assert ctl.calls == []
    legacy.cmd("migrate-set-parameters", **{"mode": "cpr-exec",
                                            "cpr-exec-command": ["pyvmm", "run"]})
    assert ctl.calls == [("set_migrate_parameters",
                          {"mode": "cpr-exec", "cpr-exec-command": ["pyvmm", "run"]})]
    # pyvmm's fault-injection extension takes "a,b" or ["a", "b"].
    legacy.cmd("migrate-set-parameters", **{"x-fault": ["after-save"]})
    legacy.cmd("migrate-set-parameters", **{"x-fault": "a,b"})
    assert ctl.calls[-2:] == [("set_migrate_parameters", {"x-fault": ["after-save"]}),
                              ("set_migrate_parameters", {"x-fault": "a,b"})]
    assert "expected: string" in legacy.cmd_raw("migrate-set-parameters",
                                                 {"x-fault": [1]})["error"]["desc"]


def test_controller_exceptions_become_generic_errors(sockdir):
    class Broken(Recorder):
        def stop(self):
            raise RuntimeError("vCPU 0 would not pause")

        def query_state(self):
            return {"regs": [{"rip": 0x1000}], "bad": object()}

    m = Monitor(os.path.join(sockdir, "b.sock"), Broken())
    m.start()
    try:
        with QmpClient(m.path, 5) as c:
            with pytest.raises(QmpError) as err:
                c.execute("stop")
            assert err.value.desc == "vCPU 0 would not pause"
            assert err.value.error_class == "GenericError"
            with pytest.raises(QmpError, match="not JSON"):
                c.execute("x-query-state")
            assert c.execute("query-status")["status"] == "running"
    finally:
        m.close()


def test_x_query_state_when_the_controller_has_it(sockdir):
    class WithState(Recorder):
        def query_state(self):
            return {"vcpus": [{"rip": 4096}], "memory": [], "devices": []}

    m = Monitor(os.path.join(sockdir, "s.sock"), WithState())
    m.start()
    try:
        with QmpClient(m.path, 5) as c:
            assert c.execute("x-query-state")["vcpus"] == [{"rip": 4096}]
            assert {"name": "x-query-state"} in c.execute("query-commands")
    finally:
        m.close()


# -- events --------------------------------------------------------------------

def test_events_reach_negotiated_clients(mon):
    async def go():
        client = QMPClient("events")
        await client.connect(mon.path)
        try:
            with client.listener() as listener:
                # From another thread, as the vCPU and migration threads do.
                threading.Thread(target=lambda: (
                    mon.emit("STOP"),
                    mon.emit("MIGRATION", {"status": "completed"}))).start()
                stop = await listener.get()
                mig = await listener.get()
            assert stop["event"] == "STOP" and "data" not in stop
            assert mig["event"] == "MIGRATION"
            assert mig["data"] == {"status": "completed"}
            assert abs(mig["timestamp"]["seconds"] - time.time()) < 60
            assert 0 <= mig["timestamp"]["microseconds"] < 1_000_000
        finally:
            await client.disconnect()
    run_async(go())


def test_no_events_before_negotiation(mon):
    raw = Raw(mon.path, negotiate=False)
    mon.emit("RESUME")
    raw.send(b'{"execute": "qmp_capabilities"}')
    assert raw.recv() == {"return": {}}
    mon.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
    ev = raw.recv()
    assert ev["event"] == "SHUTDOWN" and ev["data"]["reason"] == "host-qmp-quit"
    raw.close()


# -- malformed input -----------------------------------------------------------

def test_input_needs_no_newlines_and_may_be_split(mon):
    raw = Raw(mon.path)
    raw.send(b'{"execute": "query-status", "id": 1}{"execute": "stop", "id": 2}{"exec')
    assert raw.recv()["id"] == 1
    assert raw.recv()["id"] == 2
    raw.send(b'ute": "cont",')
    time.sleep(0.05)
    raw.send(b' "id": 3}')
    assert raw.recv() == {"return": {}, "id": 3}
    raw.close()


def test_malformed_input_gets_errors_and_the_server_keeps_serving(mon):
    raw = Raw(mon.path)
    cases = [
        (b'{"execute": }', "GenericError", "JSON parse error"),
        (b"\xff", "GenericError", "JSON parse error"),
        (b'{"execute": "query-status", "id": 1, "x": nan}', "GenericError", "JSON parse error"),
        (b"[1, 2]", "GenericError", "QMP input must be a JSON object"),
        (b'"hello"', "GenericError", "QMP input must be a JSON object"),
        (b"42 ", "GenericError", "QMP input must be a JSON object"),
        (b'{"arguments": {}}', "GenericError", "QMP input lacks member 'execute'"),
        (b'{"execute": 1}', "GenericError", "QMP input member 'execute' must be a string"),
        (b'{"execute": "stop", "arguments": []}', "GenericError",
         "QMP input member 'arguments' must be an object"),
        (b'{"execute": "stop", "bogus": 1}', "GenericError",
         "QMP input member 'bogus' is unexpected"),
        (b'{"exec-oob": "stop"}', "GenericError", "QMP input member 'exec-oob' is unexpected"),
        (b'{"execute": "stop", "arguments": {"now": true}}', "GenericError",
         "Parameter 'now' is unexpected"),
        (b'{"execute": "frobnicate"}', "CommandNotFound",
         "The command frobnicate has not been found"),
    ]
    for data, cls, desc in cases:
        raw.send(data)
        reply = raw.recv()
        assert reply["error"]["class"] == cls, data
        assert desc in reply["error"]["desc"], (data, reply)
    # A half-sent value is thrown away by a control character (the qmp-spec
    # way to resync), and the next command works.
    raw.send(b'{"execute": "query-status", "arguments": {"a": [\x01')
    assert "JSON parse error" in raw.recv()["error"]["desc"]
    raw.send(b'{"execute": "query-status", "id": "after"}')
    assert raw.recv() == {"return": {"status": "running", "running": True}, "id": "after"}
    raw.close()
    # The server is still fine for a real client.
    with QmpClient(mon.path, 5) as c:
        assert c.execute("query-status")["running"] is True


def test_errors_keep_the_request_id(mon):
    raw = Raw(mon.path)
    raw.send(b'{"execute": "nope", "id": {"tag": [1]}}')
    assert raw.recv()["id"] == {"tag": [1]}
    raw.send(b'{"execute": 5, "id": 9}')
    assert raw.recv()["id"] == 9
    raw.close()


def test_oversized_input_closes_only_that_client(mon):
    other = Raw(mon.path)
    big = Raw(mon.path)
    big.send(b'{"execute": "query-status", "arguments": {"x": "' + b"a" * (MAX_INPUT + 10))
    reply = big.recv()
    assert reply["error"]["class"] == "GenericError"
    assert "exceeds" in reply["error"]["desc"]
    with pytest.raises((EOFError, ConnectionResetError, BrokenPipeError)):
        while True:
            big.recv()
    big.close()
    other.send(b'{"execute": "query-status", "id": 1}')
    assert other.recv()["id"] == 1
    other.close()


def test_abrupt_disconnects_do_not_hurt(mon):
    for _ in range(5):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(mon.path)
        s.send(b'{"execute": "qmp_capabilities"}{"execute": "query-status"}')
        s.close()
    with QmpClient(mon.path, 5) as c:
        assert c.execute("query-status")["status"] == "running"


# -- several clients, lifecycle ------------------------------------------------

def test_two_clients_at_once(mon, ctl):
    async def go():
        a, b = QMPClient("a"), QMPClient("b")
        await a.connect(mon.path)
        await b.connect(mon.path)
        try:
            with a.listener() as la, b.listener() as lb:
                await a.execute("stop")
                assert (await b.execute("query-status"))["status"] == "paused"
                results = await asyncio.gather(*(c.execute("query-status")
                                                 for c in (a, b) for _ in range(20)))
                assert all(r["status"] == "paused" for r in results)
                mon.emit("STOP")
                assert (await la.get())["event"] == "STOP"
                assert (await lb.get())["event"] == "STOP"
        finally:
            await a.disconnect()
            await b.disconnect()
    run_async(go())
    assert ctl.calls == [("stop",)]


def test_close_unlinks_and_refuses_new_clients(sockdir, ctl):
    path = os.path.join(sockdir, "c.sock")
    m = Monitor(path, ctl)
    m.start()
    c = QmpClient(path, 5)
    m.close()
    assert not os.path.exists(path)
    with pytest.raises((ConnectionError, OSError)):
        c.execute("query-status")
    c.close()


def test_stale_socket_is_replaced_but_a_live_one_is_not(sockdir, ctl):
    path = os.path.join(sockdir, "stale.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # leaves the path behind, nobody listening
    m = Monitor(path, ctl)
    m.start()
    try:
        with pytest.raises(VmmError, match="in use"):
            Monitor(path, ctl)
        with QmpClient(path, 5) as c:
            assert c.execute("query-status")["running"]
    finally:
        m.close()
    regular = os.path.join(sockdir, "file")
    open(regular, "w").close()
    with pytest.raises(VmmError, match="not a socket"):
        Monitor(regular, ctl)
    assert os.path.exists(regular)


def test_listen_fd_handoff(sockdir, ctl):
    """A live update hands the listening fd on; clients never see the path go."""
    path = os.path.join(sockdir, "h.sock")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(8)
    old = Monitor(path, ctl, listen_fd=lsock.detach())
    assert not os.get_inheritable(old.listen_fd)
    old.start()
    with QmpClient(path, 5) as c:
        c.execute("stop")
    fd = old.listen_fd
    old.close_clients()
    old.close(keep_listener=True)
    assert os.path.exists(path)
    # Between the two processes a client's connect still succeeds (backlog).
    waiting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    waiting.connect(path)
    new_ctl = Recorder()
    new = Monitor(path, new_ctl, listen_fd=fd)
    new.start()
    try:
        waiting.settimeout(5)
        assert b'"QMP"' in waiting.recv(4096)
        with QmpClient(path, 5) as c:
            c.execute("cont")
        assert new_ctl.calls == [("cont",)] and ctl.calls == [("stop",)]
    finally:
        waiting.close()
        new.close()
    assert not os.path.exists(path)


def test_old_process_close_leaves_the_path_to_the_new_one(sockdir, ctl):
    """cpr-transfer: the new process got a copy of the fd (SCM_RIGHTS); the old
    one then closes normally and must not unlink the path it no longer owns."""
    path = os.path.join(sockdir, "t.sock")
    old = Monitor(path, ctl)
    old.start()
    passed = os.dup(old.listen_fd)  # what SCM_RIGHTS gives the new process
    new_ctl = Recorder()
    new = Monitor(path, new_ctl, listen_fd=passed)
    old.close_clients()
    old.close()
    new.start()
    try:
        assert os.path.exists(path)
        with QmpClient(path, 5) as c:
            c.execute("stop")
        assert new_ctl.calls == [("stop",)]
    finally:
        new.close()
    assert not os.path.exists(path)


def test_close_clients_keeps_serving(mon):
    c = QmpClient(mon.path, 5)
    mon.close_clients()
    with pytest.raises((ConnectionError, OSError)):
        c.execute("query-status")
    c.close()
    with QmpClient(mon.path, 5) as c2:
        assert c2.execute("query-status")["running"]


def test_close_from_a_command_handler(sockdir):
    """quit's controller may shut the monitor down from the monitor thread."""
    class Quitter(Recorder):
        def quit(self):
            super().quit()
            self.monitor.close()

    ctl = Quitter()
    path = os.path.join(sockdir, "quit.sock")
    m = Monitor(path, ctl)
    ctl.monitor = m
    m.start()
    with QmpClient(path, 5) as c:
        assert c.execute("quit") == {}
    m._thread.join(5)
    assert not m._thread.is_alive()
    assert not os.path.exists(path)


# -- the CLI's client ----------------------------------------------------------

def test_qmp_client_execute_and_events(mon, ctl):
    with QmpClient(mon.path, 5) as c:
        assert c.greeting["QMP"]["version"]["qemu"]["major"] == 10
        assert c.execute("query-status") == {"status": "running", "running": True}
        c.execute("migrate-set-parameters", mode="cpr-exec",
                  arguments={"cpr-exec-command": ["pyvmm", "resume"]})
        assert ctl.calls[-1] == ("set_migrate_parameters",
                                 {"mode": "cpr-exec", "cpr-exec-command": ["pyvmm", "resume"]})
        c.execute("migrate_cancel")
        with pytest.raises(QmpError) as err:
            c.execute("frobnicate")
        assert err.value.error_class == "CommandNotFound"

        mon.emit("STOP")
        mon.emit("MIGRATION", {"status": "setup"})
        mon.emit("MIGRATION", {"status": "completed"})
        ev = c.wait_event("MIGRATION", 5, data={"status": "completed"})
        assert ev["data"] == {"status": "completed"}
        names = [(e["event"], e.get("data")) for e in c.events()]
        assert names == [("STOP", None), ("MIGRATION", {"status": "setup"})]
        assert c.events() == []
        # An event that comes while a command runs is kept, not lost.
        threading.Timer(0.01, mon.emit, ("RESUME",)).start()
        time.sleep(0.1)
        c.execute("query-status")
        assert c.wait_event("RESUME", 5)["event"] == "RESUME"
        with pytest.raises(TimeoutError):
            c.wait_event("SHUTDOWN", 0.2)


def test_qmp_client_without_server(sockdir):
    with pytest.raises(OSError):
        QmpClient(os.path.join(sockdir, "none.sock"), 1)


# -- the framing on its own ----------------------------------------------------

def test_json_stream_framing():
    s = JsonStream()
    out = s.feed(b' {"a": "}{\\"", "b": [1, {"c": null}]}\n[2')
    assert out == [({"a": '}{"', "b": [1, {"c": None}]}, None)]
    assert s.feed(b"]true ") == [([2], None), (True, None)]
    out = s.feed(b"[" * 1000 + b"]" * 1000)
    assert out == [(None, "JSON nesting depth limit exceeded")]   # QEMU's words
    out = s.feed(b'{"k": 1, "k": 2} ] {"ok": 1}')
    assert "duplicate key" in out[0][1] and "stray" in out[1][1] and out[2] == ({"ok": 1}, None)
    assert not s.overflow


def test_random_bytes_never_stop_the_server(mon):
    """Bounded fuzz: random chunks, then the same connection still resyncs."""
    import random
    rng = random.Random(1234)
    alphabet = b'{}[]":,\\ \n\rabc01-\x00\x01\xff'
    raw = Raw(mon.path)
    for _ in range(200):
        raw.send(bytes(rng.choice(alphabet) for _ in range(rng.randrange(1, 64))))
    # A control byte resets any half-read value; then a real command works.
    raw.send(b'\x01{"execute": "query-status", "id": "fuzz-end"}')
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        reply = raw.recv()
        if reply.get("id") == "fuzz-end" and "return" in reply:
            break
    else:
        pytest.fail("no reply after the fuzz")
    raw.close()
    assert mon._thread.is_alive()
    with QmpClient(mon.path, 5) as c:
        assert c.execute("query-status")["running"]
