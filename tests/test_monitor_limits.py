"""The QMP server under abuse: too many clients, too few fds, deep nesting,
clients that close without reading or stop reading, a broken server loop.

The fd and pipelining cases run a real pyvmm (a ticker guest on KVM) with the
limits a user can hit (`ulimit -n 64`); the framing cases use the in-process
monitor with test_monitor's recording controller and raw sockets, since no
QMP library sends such input.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from test_monitor import Raw, Recorder
from vmm.monitor import MAX_NESTING, JsonStream, Monitor

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
