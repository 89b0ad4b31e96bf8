"""A small synchronous QMP client for pyvmm's client side.

`pyvmm cpr` and `pyvmm state` (and the benchmarks, the labs, the tests) need a
few blocking calls and an event wait; qemu.qmp is asyncio-based and a heavier
import than the CLI should pay for.  This client speaks plain QMP, so it works
against QEMU as well as against pyvmm's monitor.
"""

from __future__ import annotations

import errno
import json
import socket
import sys
import time

# A VMM just started with `&` may not listen yet: how long the CLI waits for it.
START_WAIT_S = 5.0


class QmpError(Exception):
    """The server answered a command with an error (or broke the protocol)."""

    def __init__(self, desc: str, error_class: str = "GenericError"):
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


class QmpClient:
    """Connect to a QMP unix socket, read the greeting and negotiate.

    Events that arrive while waiting for a reply are kept for events() and
    wait_event(), so none is lost between two commands.
    """

    def __init__(self, path: str, timeout: float | None = 10.0, *, negotiate: bool = True,
                 wait: float = 0.0):
        """`wait`: while the socket is not there yet (or nobody accepts on it), try
        again for that many seconds (a VMM started a moment ago with `&`), saying so
        on stderr after the first second."""
        self.path = path
        self.timeout = timeout
        self._buf = bytearray()
        self._events: list[dict] = []
        self._next_id = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout)
            try:
                connect_when_there(self._sock, path, wait, "QMP socket")
            except OSError as e:
                waited = f"waited {wait:g} s: " if wait else ""
                raise OSError(e.errno, f"cannot connect to the QMP socket {path}: "
                              f"{e.strerror} ({waited}is pyvmm running with --qmp {path}?)"
                              ) from None
            self.greeting = self._recv(self._deadline(timeout))
            if "QMP" not in self.greeting:
                raise QmpError(f"not a QMP greeting: {self.greeting!r}")
            if negotiate:
                self.execute("qmp_capabilities")
        except BaseException:
            self._sock.close()
            raise

    def close(self):
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @staticmethod
    def _deadline(timeout):
        return None if timeout is None else time.monotonic() + timeout

    def _recv(self, deadline) -> dict:
        """Read one message (one line) before the deadline."""
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[:nl + 1]
                if not line.strip():
                    continue
                try:
                    msg = json.loads(line)
                except ValueError as e:
                    raise QmpError(f"malformed message from the server: {e}") from None
                if not isinstance(msg, dict):
                    raise QmpError(f"malformed message from the server: {line!r}")
                return msg
            if deadline is None:
                self._sock.settimeout(None)
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no answer from QMP server {self.path}")
                self._sock.settimeout(left)
            try:
                data = self._sock.recv(65536)
            except socket.timeout:
                raise TimeoutError(f"no answer from QMP server {self.path}") from None
            if not data:
                raise ConnectionError(f"QMP server {self.path} closed the connection")
            self._buf += data

    def execute(self, cmd: str, arguments: dict | None = None, **args):
        """Run a command and return its "return" value; raise QmpError.

        Keyword names use '_' for '-' (max_bandwidth= for max-bandwidth);
        pass arguments={...} for names that are not identifiers.
        """
        merged = dict(arguments or {})
        merged.update({k.replace("_", "-"): v for k, v in args.items()})
        self._next_id += 1
        req_id = self._next_id
        msg = {"execute": cmd, "id": req_id}
        if merged:
            msg["arguments"] = merged
        self._sock.settimeout(self.timeout)
        self._sock.sendall(json.dumps(msg).encode() + b"\n")
        deadline = self._deadline(self.timeout)
        while True:
            reply = self._recv(deadline)
            if "event" in reply:
                self._events.append(reply)
                continue
            if "id" in reply and reply["id"] != req_id:
                continue  # a reply to someone else's request: qmp-spec says drop it
            if "error" in reply:
                err = reply["error"]
                raise QmpError(err.get("desc", "unknown error"), err.get("class", "GenericError"))
            if "return" in reply:
                return reply["return"]
            raise QmpError(f"unexpected message from the server: {reply!r}")

    def events(self) -> list[dict]:
        """Return (and forget) the events received so far, without blocking."""
        self._sock.setblocking(False)
        try:
            while True:
                try:
                    data = self._sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    break
                if not data:
                    break
                self._buf += data
        finally:
            self._sock.settimeout(self.timeout)
        while b"\n" in self._buf:
            msg = self._recv(None)
            if "event" in msg:
                self._events.append(msg)
        events, self._events = self._events, []
        return events

    def wait_event(self, name: str, timeout: float | None = None, data: dict | None = None) -> dict:
        """Wait for the event `name` (whose data contains `data`, if given).

        Events that do not match stay buffered for events().  timeout=None
        means the client's own timeout; raises TimeoutError.
        """
        def matches(ev):
            if ev.get("event") != name:
                return False
            got = ev.get("data") or {}
            return all(got.get(k) == v for k, v in (data or {}).items())

        for i, ev in enumerate(self._events):
            if matches(ev):
                return self._events.pop(i)
        deadline = self._deadline(self.timeout if timeout is None else timeout)
        while True:
            msg = self._recv(deadline)
            if "event" not in msg:
                continue  # a stray reply: nothing is waiting for it
            if matches(msg):
                return msg
            self._events.append(msg)


def connect_when_there(sock, path: str, wait: float, what: str) -> None:
    """connect(path), trying again while the path does not exist or nobody accepts
    on it, for up to `wait` seconds (a note once a second has gone by, when stderr is
    a terminal: an error stays one line for scripts)."""
    deadline = time.monotonic() + wait
    told = not sys.stderr.isatty()
    while True:
        try:
            sock.connect(path)
            return
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ECONNREFUSED) or \
                    time.monotonic() >= deadline:
                raise
        if not told and time.monotonic() >= deadline - wait + 1.0:
            print(f"pyvmm: waiting for the {what} {path} ...", file=sys.stderr)
            told = True
        time.sleep(0.05)


def wait_for_path(path: str, wait: float, what: str) -> bool:
    """Until `path` exists (at most `wait` seconds, a note after the first second when
    stderr is a terminal); whether it does.  (Only looks: a connection would be taken
    for a peer by a server that accepts just one.)"""
    import os
    deadline = time.monotonic() + wait
    told = not sys.stderr.isatty()
    while not os.path.exists(path):
        if time.monotonic() >= deadline:
            return False
        if not told and time.monotonic() >= deadline - wait + 1.0:
            print(f"pyvmm: waiting for the {what} {path} ...", file=sys.stderr)
            told = True
        time.sleep(0.05)
    return True
