"""A QMP-compatible monitor: the socket that tools drive pyvmm through.

The wire protocol follows QEMU's docs/interop/qmp-spec.rst closely enough
that QEMU's own Python library (qemu.qmp) and scripts written for QEMU 10
can drive pyvmm: the greeting, capabilities negotiation, the error classes
and most error messages are QEMU's.  docs/QMP.md lists the commands and where
they differ from QEMU's.

The monitor knows nothing about the machine.  Every command that touches it
calls a method of a duck-typed *controller*; a controller that lacks a method
simply does not have that command (CommandNotFound, and it is left out of
query-commands).  Controller methods run on the monitor thread, one at a time.

One daemon thread serves every client with `selectors`.  Output is queued per
client under a lock so that `emit()` may be called from any thread (vCPU
threads, the migration thread) and events never interleave with replies.

For live update the listening socket can outlive the process: the old pyvmm
hands `listen_fd` to the new one (SCM_RIGHTS for cpr-transfer, inheritance
for cpr-exec), so clients that reconnect meanwhile wait in the listen backlog
instead of finding the path gone.
"""

from __future__ import annotations

import errno
import json
import os
import re
import selectors
import socket
import stat
import threading
import time

from . import __version__
from .errors import VmmError
from .log import get_logger

log = get_logger(__name__)   # (importing logging costs ~9 ms, after a cpr-exec too)

QEMU_VERSION = {"major": 10, "minor": 2, "micro": 0}

#: A client that sends this much without completing a JSON value is cut off.
MAX_INPUT = 1 << 20
#: Deeper nesting than any QMP command needs; also keeps json.loads off the
#: recursion limit.
MAX_NESTING = 256
#: A client that does not read its replies and events is cut off past this.
MAX_OUTPUT = 16 << 20

MIGRATION_MODES = ("normal", "cpr-reboot", "cpr-transfer", "cpr-exec")


class CommandError(Exception):
    """A command failed; sent as {"error": {"class": ..., "desc": ...}}."""

    def __init__(self, desc: str, error_class: str = "GenericError"):
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


# --------------------------------------------------------------------------
# Framing: split a byte stream into JSON texts

_WS = b" \t\r\n"
# Bytes that can never appear in JSON text: control characters other than
# tab/CR/LF, and bytes that never occur in UTF-8.  Like QEMU's lexer, one of
# these throws away the half-read value, which is how a client resyncs
# (qmp-spec.rst: "Forcing the JSON parser into known-good state").
_BAD = rb"\x00-\x08\x0b\x0c\x0e-\x1f\xc0\xc1\xf5-\xff"
_IN_STRING = re.compile(rb'["\\' + _BAD + rb"]")
_IN_VALUE = re.compile(rb'[{}\[\]"' + _BAD + rb"]")
_IN_SCALAR = re.compile(rb'[ \t\r\n{}\[\]"' + _BAD + rb"]")
_BAD_BYTE = re.compile(rb"[" + _BAD + rb"]")


def _no_constant(name):
    raise ValueError(f"invalid keyword '{name}'")


def _unique_keys(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key '{key}'")
        obj[key] = value
    return obj


def parse_json(text: bytes):
    """Parse one JSON text strictly (no NaN, no duplicate keys), QEMU-style."""
    try:
        return json.loads(text, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        raise ValueError(e.msg) from None
    except UnicodeDecodeError:
        raise ValueError("invalid UTF-8 sequence") from None
    except RecursionError:
        raise ValueError("too many nested data structures") from None


class JsonStream:
    """Cut a byte stream into JSON values without needing newlines.

    Only brackets, quotes and escapes are tracked; each complete value is
    then handed to json.loads.  That way a malformed value costs exactly
    itself: the next value parses normally, as with QEMU's json-streamer.
    feed() returns a list of (value, None) or (None, error message) pairs.
    """

    def __init__(self, limit: int = MAX_INPUT):
        self.limit = limit
        self._buf = bytearray()
        self._pos = 0          # scanned up to here (relative to _buf)
        self._depth = 0
        self._in_string = False
        self._scalar = False   # a bare top-level token (number, keyword)
        self._too_deep = False

    @property
    def overflow(self) -> bool:
        """True when a partial value has grown past the limit."""
        return len(self._buf) > self.limit

    def _reset(self):
        self._depth = 0
        self._in_string = self._scalar = self._too_deep = False

    def feed(self, data: bytes) -> list:
        buf = self._buf
        buf += data
        out = []
        n = len(buf)
        i = self._pos
        start = 0  # start of the value being read

        def finish(end):
            text = bytes(buf[start:end])
            if self._too_deep:
                out.append((None, "JSON parse error, too many nested data structures"))
            else:
                try:
                    out.append((parse_json(text), None))
                except ValueError as e:
                    out.append((None, f"JSON parse error, {e}"))
            self._reset()
            return end

        def stray(at):
            out.append((None, f"JSON parse error, stray '\\x{buf[at]:02x}'"))
            self._reset()
            return at + 1

        while i < n:
            if self._in_string:
                m = _IN_STRING.search(buf, i)
                if m is None:
                    i = n
                    break
                i = m.start()
                c = buf[i]
                if c == 0x5C:  # backslash: skip the escaped character
                    if i + 1 >= n:
                        break  # wait for it
                    if _BAD_BYTE.match(buf, i + 1):
                        i = start = stray(i + 1)
                    else:
                        i += 2
                elif c == 0x22:
                    self._in_string = False
                    i += 1
                    if self._depth == 0:
                        start = finish(i)
                else:
                    i = start = stray(i)
            elif self._depth > 0:
                m = _IN_VALUE.search(buf, i)
                if m is None:
                    i = n
                    break
                i = m.start()
                c = buf[i]
                if c == 0x22:
                    self._in_string = True
                    i += 1
                elif c in b"{[":
                    self._depth += 1
                    if self._depth > MAX_NESTING:
                        self._too_deep = True
                    i += 1
                elif c in b"}]":
                    self._depth -= 1
                    i += 1
                    if self._depth == 0:
                        start = finish(i)
                else:
                    i = start = stray(i)
            elif self._scalar:
                m = _IN_SCALAR.search(buf, i)
                if m is None:
                    i = n
                    break
                i = start = finish(m.start())
            else:
                c = buf[i]
                if c in _WS:
                    i = start = i + 1
                elif c in b"{[":
                    self._depth = 1
                    i += 1
                elif c == 0x22:
                    self._in_string = True
                    i += 1
                elif c in b"}]":
                    out.append((None, f"JSON parse error, stray '{chr(c)}'"))
                    i = start = i + 1
                elif _BAD_BYTE.match(buf, i):
                    i = start = stray(i)
                else:
                    self._scalar = True
                    i += 1
        del buf[:start]
        self._pos = i - start
        return out


# --------------------------------------------------------------------------
# Argument checking, with QEMU's wording

_TYPE_NAMES = {str: "string", bool: "boolean", int: "integer", list: "array", dict: "object"}


def _check_type(value, kind, name):
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise CommandError(f"Invalid parameter type for '{name}', expected: {_TYPE_NAMES[kind]}")
    return value


def _check_enum(value, choices, name):
    _check_type(value, str, name)
    if value not in choices:
        raise CommandError(f"Parameter '{name}' does not accept value '{value}'")
    return value


def _check_str_list(value, name):
    _check_type(value, list, name)
    for i, item in enumerate(value):
        _check_type(item, str, f"{name}[{i}]")
    return list(value)


def check_args(args: dict, spec: dict, prefix: str = "") -> dict:
    """Validate `args` against `spec` {name: (checker, required)}.

    A checker is a type (str, bool, int, list, dict), a tuple of allowed
    strings (an enum), or a function (value, full_name) -> value.
    Returns a new dict holding only the arguments that were given.
    """
    for key in args:
        if key not in spec:
            raise CommandError(f"Parameter '{prefix}{key}' is unexpected")
    out = {}
    for key, (checker, required) in spec.items():
        name = prefix + key
        if key not in args:
            if required:
                raise CommandError(f"Parameter '{name}' is missing")
            continue
        value = args[key]
        if isinstance(checker, type):
            out[key] = _check_type(value, checker, name)
        elif isinstance(checker, tuple):
            out[key] = _check_enum(value, checker, name)
        else:
            out[key] = checker(value, name)
    return out


# --------------------------------------------------------------------------
# Migration addresses (QAPI MigrationAddress / SocketAddress)

_SOCKET_SPECS = {
    "unix": {"path": (str, True), "abstract": (bool, False), "tight": (bool, False)},
    "inet": {"host": (str, True), "port": (str, True), "numeric": (bool, False),
             "to": (int, False), "ipv4": (bool, False), "ipv6": (bool, False),
             "keep-alive": (bool, False)},
    "vsock": {"cid": (str, True), "port": (str, True)},
    "fd": {"str": (str, True)},
}
_TRANSPORT_SPECS = {
    "file": {"filename": (str, True), "offset": (int, False)},
    "exec": {"args": (_check_str_list, True)},
    "rdma": {"host": (str, True), "port": (str, True)},
}


def check_migration_address(addr, name: str = "addr") -> dict:
    """Validate a QAPI MigrationAddress into a plain dict of its members."""
    _check_type(addr, dict, name)
    prefix = name + "."
    transport = addr.get("transport")
    if transport is None:
        raise CommandError(f"Parameter '{prefix}transport' is missing")
    _check_enum(transport, ("socket", "exec", "rdma", "file"), prefix + "transport")
    rest = {k: v for k, v in addr.items() if k != "transport"}
    if transport == "socket":
        kind = rest.pop("type", None)
        if kind is None:
            raise CommandError(f"Parameter '{prefix}type' is missing")
        _check_enum(kind, tuple(_SOCKET_SPECS), prefix + "type")
        members = check_args(rest, _SOCKET_SPECS[kind], prefix)
        return {"transport": "socket", "type": kind, **members}
    members = check_args(rest, _TRANSPORT_SPECS[transport], prefix)
    return {"transport": transport, **members}


def parse_migration_uri(uri: str) -> dict:
    """Turn a legacy migrate URI into the MigrationAddress it stands for."""
    scheme, sep, rest = uri.partition(":")
    if sep and scheme == "unix" and rest:
        return {"transport": "socket", "type": "unix", "path": rest}
    if sep and scheme == "fd" and rest:
        return {"transport": "socket", "type": "fd", "str": rest}
    if sep and scheme == "exec":
        return {"transport": "exec", "args": ["/bin/sh", "-c", rest]}
    if sep and scheme in ("tcp", "rdma") and rest:
        m = re.fullmatch(r"\[([^\]]+)\]:(\w+)|([^:\[\]]*):(\w+)", rest)
        if m:
            host = m.group(1) if m.group(1) is not None else m.group(3)
            port = m.group(2) or m.group(4)
            if scheme == "rdma":
                return {"transport": "rdma", "host": host, "port": port}
            return {"transport": "socket", "type": "inet", "host": host, "port": port}
        raise CommandError(f"Invalid migration URI '{uri}': expected {scheme}:HOST:PORT")
    if sep and scheme == "file" and rest:
        filename, comma, option = rest.partition(",")
        addr = {"transport": "file", "filename": filename}
        if comma:
            key, _, value = option.partition("=")
            try:
                if key != "offset":
                    raise ValueError
                addr["offset"] = int(value, 0)
            except ValueError:
                raise CommandError(f"Invalid migration URI '{uri}': "
                                   "the only option is offset=N") from None
        return addr
    raise CommandError(f"unknown migration protocol: {uri}")


def _check_faults(value, name):
    """x-fault (pyvmm): fault points to arm, "a,b" or ["a", "b"]."""
    if isinstance(value, str):
        return value
    return _check_str_list(value, name)


MIGRATION_CAPABILITY_NAMES = (
    "xbzrle", "rdma-pin-all", "auto-converge", "events", "postcopy-ram", "x-colo",
    "release-ram", "return-path", "pause-before-switchover", "multifd", "dirty-bitmaps",
    "postcopy-blocktime", "late-block-activate", "x-ignore-shared", "validate-uuid",
    "background-snapshot", "zero-copy-send", "postcopy-preempt", "switchover-ack",
    "dirty-limit", "mapped-ram")


def _check_capabilities(value, name):
    """migrate-set-capabilities: a list of MigrationCapabilityStatus."""
    _check_type(value, list, name)
    return [check_args(_check_type(cap, dict, f"{name}[{i}]"),
                       {"capability": (MIGRATION_CAPABILITY_NAMES, True),
                        "state": (bool, True)}, f"{name}[{i}].")
            for i, cap in enumerate(value)]


def _check_channels(value, name):
    _check_type(value, list, name)
    found = {}
    for i, chan in enumerate(value):
        cname = f"{name}[{i}]"
        _check_type(chan, dict, cname)
        chan = check_args(chan, {"channel-type": (("main", "cpr"), True),
                                 "addr": (dict, True)}, cname + ".")
        kind = chan["channel-type"]
        if kind in found:
            raise CommandError(f"Channel list has more than one {kind} entry")
        found[kind] = check_migration_address(chan["addr"], cname + ".addr")
    return found


# --------------------------------------------------------------------------
# Commands

def _someone_listens(path: str) -> bool:
    """True if a process accepts connections on the unix socket at path."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)  # a full backlog makes connect() wait
    try:
        probe.connect(path)
    except socket.timeout:
        return True
    except OSError as e:
        # EPROTOTYPE: a live socket of another type (a waiting pyvmm's cpr socket)
        return e.errno == errno.EPROTOTYPE
    finally:
        probe.close()
    return True


def claim_socket_path(path: str, what: str) -> None:
    """Make way for a new listening socket at path: remove a stale socket left by a
    dead process, but refuse (VmmError) to replace anything else: a file that is
    not a socket, or a socket a live process (another pyvmm, a QEMU) serves."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise VmmError(f"{what} path {path} exists and is not a socket")
    if _someone_listens(path):
        raise VmmError(f"{what} socket {path} is in use by a running process")
    os.unlink(path)


class _Command:
    """One QMP command: argument spec, the handler, and the controller
    method it needs (None when the monitor handles it alone)."""

    def __init__(self, name, handler, spec=None, needs=None, after_reply=False):
        self.name = name
        self.handler = handler
        self.spec = spec or {}
        self.needs = needs
        # Run the controller call after the reply has gone out (quit: the
        # process may be gone before it could answer otherwise).
        self.after_reply = after_reply


class _Client:
    """One connection: its input parser, output queue and QMP state."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.stream = JsonStream()
        self.out = bytearray()
        self.negotiated = False
        self.oob = False
        self.closing = False   # close once the loop gets to it
        self.mask = selectors.EVENT_READ

    def fileno(self):
        return self.sock.fileno()


class Monitor:
    """The QMP server.  See the module docstring and docs/QMP.md."""

    def __init__(self, path: str, controller, *, listen_fd: int | None = None):
        self.path = path
        self.controller = controller
        self._lock = threading.RLock()
        self._clients: list[_Client] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False
        self._unlink = True
        self._keep_listener = False
        self._kick_clients = threading.Event()
        self._clients_closed = threading.Event()
        self._commands = self._make_commands()
        if listen_fd is None:
            self._listener = self._bind(path)
        else:
            self._listener = self._adopt(listen_fd)
        self._listener.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, "listener")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")

    # -- setup ---------------------------------------------------------------

    @staticmethod
    def _bind(path):
        claim_socket_path(path, "monitor")
        from .unix import bind_owner_only
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            bind_owner_only(sock, path)   # 0600: QMP can run anything as us (docs/QMP.md)
            sock.listen(16)
        except OSError as e:
            sock.close()
            raise VmmError(f"cannot listen on monitor socket {path}: {e.strerror}") from None
        return sock

    @staticmethod
    def _adopt(fd):
        try:
            sock = socket.socket(fileno=fd)
        except OSError as e:
            raise VmmError(f"monitor listen fd {fd} is not a socket: {e.strerror}") from None
        if sock.type != socket.SOCK_STREAM:
            sock.detach()
            raise VmmError(f"monitor listen fd {fd} is not a stream socket")
        os.set_inheritable(fd, False)
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            sock.listen(16)
        return sock

    def client_count(self) -> int:
        """How many clients are connected now."""
        with self._lock:
            return sum(1 for c in self._clients if not c.closing)

    @property
    def listen_fd(self) -> int:
        """The listening socket's fd (close-on-exec), to hand to a new process."""
        return self._listener.fileno()

    # -- lifecycle -----------------------------------------------------------

    def start(self):
        """Serve clients on a daemon thread."""
        if self._thread is not None or self._closed:
            raise RuntimeError("monitor already started or closed")
        self._thread = threading.Thread(target=self._run, name="qmp-monitor", daemon=True)
        self._thread.start()

    def close(self, *, unlink: bool = True, keep_listener: bool = False):
        """Stop serving and close every client.

        unlink=False leaves the socket path in place (another process serves
        it now).  keep_listener=True also leaves the listening fd open for
        the caller to pass on (it implies unlink=False); connections made
        meanwhile wait in its backlog.  Safe to call from a command handler.
        """
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            self._unlink = unlink and not keep_listener
            self._keep_listener = keep_listener
        thread = self._thread
        if thread is None:
            self._cleanup()
        elif thread is not threading.current_thread():
            self._wake()
            thread.join(5.0)
        # else: called from a handler; _run cleans up when the handler returns

    def close_clients(self, timeout: float = 5.0):
        """Disconnect every client (flushing what is queued) but keep serving."""
        running = self._thread is not None and self._thread.is_alive() and not self._stopping
        if not running or self._thread is threading.current_thread():
            with self._lock:
                for client in self._clients:
                    client.closing = True
            if not running:
                self._reap()
            return
        self._clients_closed.clear()
        self._kick_clients.set()
        self._wake()
        self._clients_closed.wait(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- events --------------------------------------------------------------

    def emit(self, name: str, data: dict | None = None):
        """Send an event to every negotiated client.  Any thread may call this.

        Like QEMU, an event without data has no "data" member.
        """
        now = time.time()
        seconds = int(now)
        msg = {"event": name}
        if data is not None:
            msg["data"] = data
        msg["timestamp"] = {"seconds": seconds, "microseconds": int((now - seconds) * 1e6)}
        line = self._encode(msg)
        with self._lock:
            for client in self._clients:
                if client.negotiated and not client.closing:
                    self._queue(client, line)
        if threading.current_thread() is not self._thread:
            self._wake()

    # -- the loop ------------------------------------------------------------

    def _wake(self):
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # full (a wakeup is already pending) or closed

    def _run(self):
        try:
            while not self._stopping:
                for key, mask in self._sel.select():
                    if key.data == "listener":
                        self._accept()
                    elif key.data == "wake":
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except OSError:
                            pass
                    else:
                        client = key.data
                        if mask & selectors.EVENT_WRITE:
                            with self._lock:
                                self._flush(client)
                        if mask & selectors.EVENT_READ and not client.closing:
                            self._read(client)
                    if self._stopping:
                        break
                if self._kick_clients.is_set():
                    self._kick_clients.clear()
                    with self._lock:
                        for client in self._clients:
                            client.closing = True
                    self._reap()
                    self._clients_closed.set()
                self._reap()
        except Exception:
            log.exception("QMP monitor thread failed")
        finally:
            self._cleanup()

    def _accept(self):
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("QMP accept failed: %s", e)
                return
            sock.setblocking(False)
            client = _Client(sock)
            with self._lock:
                self._clients.append(client)
                self._sel.register(sock, client.mask, client)
                self._queue(client, self._encode(self._greeting()))

    def _read(self, client):
        try:
            data = client.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            client.closing = True
            return
        for value, error in client.stream.feed(data):
            if error is not None:
                self._reply(client, {"error": {"class": "GenericError", "desc": error}})
            else:
                self._handle(client, value)
            if client.closing or self._stopping:
                return
        if client.stream.overflow:
            self._reply(client, {"error": {"class": "GenericError", "desc":
                        f"JSON input exceeds {MAX_INPUT} bytes without a complete object"}})
            client.closing = True

    def _reap(self):
        """Close the clients marked closing; update what the others wait for."""
        with self._lock:
            keep = []
            for client in self._clients:
                if client.closing:
                    self._flush(client)
                    self._drop(client)
                    continue
                keep.append(client)
                mask = selectors.EVENT_READ
                if client.out:
                    mask |= selectors.EVENT_WRITE
                if mask != client.mask:
                    client.mask = mask
                    self._sel.modify(client.sock, mask, client)
            self._clients = keep

    def _drop(self, client):
        try:
            self._sel.unregister(client.sock)
        except (KeyError, ValueError):
            pass
        try:
            client.sock.close()
        except OSError:
            pass

    def _cleanup(self):
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for client in self._clients:
                self._flush(client)
                self._drop(client)
            self._clients = []
            self._sel.close()
            if self._keep_listener:
                # Let go of the fd without closing it, now and when this
                # socket object is garbage collected.
                self._listener.detach()
            else:
                self._listener.close()
            self._wake_r.close()
            self._wake_w.close()
            # After a live update the new process serves the same listening
            # socket (it got the fd), so the path is only removed when nobody
            # answers on it any more.
            if self._unlink and self.path and not self._keep_listener:
                try:
                    if stat.S_ISSOCK(os.lstat(self.path).st_mode) and \
                            not _someone_listens(self.path):
                        os.unlink(self.path)
                except OSError:
                    pass

    # -- output --------------------------------------------------------------

    @staticmethod
    def _encode(msg) -> bytes:
        return (json.dumps(msg, allow_nan=False) + "\r\n").encode()

    def _queue(self, client, line: bytes):
        """Append to a client's output and send what the socket takes now.
        Caller holds the lock."""
        if client.closing:
            return
        if len(client.out) + len(line) > MAX_OUTPUT:
            log.warning("QMP client not reading its output; disconnecting it")
            client.out.clear()
            client.closing = True
            return
        client.out += line
        self._flush(client)

    def _flush(self, client):
        while client.out:
            try:
                sent = client.sock.send(client.out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                client.out.clear()
                client.closing = True
                return
            del client.out[:sent]

    def _reply(self, client, msg):
        try:
            line = self._encode(msg)
        except (TypeError, ValueError) as e:
            log.error("QMP reply not serializable: %s", e)
            err = {"class": "GenericError", "desc": f"internal error: reply is not JSON: {e}"}
            line = self._encode({"error": err, **({"id": msg["id"]} if "id" in msg else {})})
        with self._lock:
            self._queue(client, line)

    # -- dispatch ------------------------------------------------------------

    def _greeting(self):
        return {"QMP": {"version": {"qemu": dict(QEMU_VERSION), "package": f"pyvmm {__version__}"},
                        "capabilities": ["oob"]}}

    def _handle(self, client, request):
        reply = {}
        after = None
        try:
            after = self._dispatch(client, request, reply)
        except CommandError as e:
            reply = {"error": {"class": e.error_class, "desc": e.desc}}
        except Exception as e:  # a controller failed: report, keep serving
            if not isinstance(e, VmmError):
                log.exception("QMP command failed")
            desc = str(e) or type(e).__name__
            reply = {"error": {"class": getattr(e, "qmp_class", "GenericError"), "desc": desc}}
        if isinstance(request, dict) and "id" in request:
            reply["id"] = request["id"]
        self._reply(client, reply)
        if after is not None:
            try:
                after()
            except Exception:
                log.exception("QMP command failed after its reply")

    def _dispatch(self, client, request, reply):
        """Run one request; fill reply["return"], or raise CommandError."""
        if not isinstance(request, dict):
            raise CommandError("QMP input must be a JSON object")
        exec_key = None
        for key, value in request.items():
            if key == "execute" or (key == "exec-oob" and client.oob):
                if not isinstance(value, str):
                    raise CommandError(f"QMP input member '{key}' must be a string")
                if exec_key:
                    raise CommandError(f"QMP input member '{key}' clashes with '{exec_key}'")
                exec_key = key
            elif key == "arguments":
                if not isinstance(value, dict):
                    raise CommandError("QMP input member 'arguments' must be an object")
            elif key != "id":
                raise CommandError(f"QMP input member '{key}' is unexpected")
        if exec_key is None:
            raise CommandError("QMP input lacks member 'execute'")
        name = request[exec_key]
        cmd = self._commands.get(name)
        if not client.negotiated and name != "qmp_capabilities":
            raise CommandError("Expecting capabilities negotiation with 'qmp_capabilities'",
                               "CommandNotFound")
        if cmd is None or (cmd.needs and not callable(getattr(self.controller, cmd.needs, None))):
            raise CommandError(f"The command {name} has not been found", "CommandNotFound")
        if exec_key == "exec-oob":
            raise CommandError(f"The command {name} does not support OOB")
        args = check_args(request.get("arguments", {}), cmd.spec)
        if cmd.after_reply:
            reply["return"] = {}
            return lambda: cmd.handler(client, args)
        result = cmd.handler(client, args)
        if callable(result):
            # The controller wants work done once the reply is out (migrate: a
            # cpr-exec may replace this process before the reply could be sent).
            reply["return"] = {}
            return result
        reply["return"] = {} if result is None else result
        return None

    def _make_commands(self):
        ctl = lambda: self.controller  # noqa: E731  (looked up per call)
        cmds = [
            _Command("qmp_capabilities", self._qmp_capabilities,
                     {"enable": (lambda v, n: [_check_enum(x, ("oob",), f"{n}[{i}]")
                                               for i, x in enumerate(_check_type(v, list, n))],
                                 False)}),
            _Command("query-version", lambda c, a: self._greeting()["QMP"]["version"]),
            _Command("query-commands", self._query_commands),
            _Command("query-status", lambda c, a: ctl().query_status(), needs="query_status"),
            _Command("stop", lambda c, a: ctl().stop(), needs="stop"),
            _Command("cont", lambda c, a: ctl().cont(), needs="cont"),
            _Command("quit", lambda c, a: ctl().quit(), needs="quit", after_reply=True),
            _Command("migrate-set-parameters", lambda c, a: ctl().set_migrate_parameters(a),
                     {"mode": (MIGRATION_MODES, False),
                      "cpr-exec-command": (_check_str_list, False),
                      "downtime-limit": (int, False),
                      "max-bandwidth": (int, False),
                      "x-fault": (_check_faults, False)},
                     needs="set_migrate_parameters"),
            _Command("query-migrate-parameters", lambda c, a: ctl().query_migrate_parameters(),
                     needs="query_migrate_parameters"),
            _Command("migrate-set-capabilities",
                     lambda c, a: ctl().set_migrate_capabilities(a["capabilities"]),
                     {"capabilities": (_check_capabilities, True)},
                     needs="set_migrate_capabilities"),
            _Command("query-migrate-capabilities",
                     lambda c, a: ctl().query_migrate_capabilities(),
                     needs="query_migrate_capabilities"),
            _Command("migrate", self._migrate,
                     {"uri": (str, False), "channels": (_check_channels, False),
                      "detach": (bool, False), "resume": (bool, False)},
                     needs="migrate"),
            _Command("migrate-incoming", self._migrate_incoming,
                     {"uri": (str, False), "channels": (_check_channels, False),
                      "exit-on-error": (bool, False)},
                     needs="migrate_incoming"),
            _Command("query-migrate", lambda c, a: ctl().query_migrate(), needs="query_migrate"),
            _Command("migrate_cancel", lambda c, a: ctl().migrate_cancel(),
                     needs="migrate_cancel"),
            _Command("x-query-state", lambda c, a: ctl().query_state(), needs="query_state"),
            _Command("query-cpus-fast", lambda c, a: ctl().query_cpus_fast(),
                     needs="query_cpus_fast"),
            _Command("query-name", lambda c, a: ctl().query_name(), needs="query_name"),
            _Command("query-kvm", lambda c, a: ctl().query_kvm(), needs="query_kvm"),
            _Command("query-memory-size-summary",
                     lambda c, a: ctl().query_memory_size_summary(),
                     needs="query_memory_size_summary"),
            _Command("system_reset", lambda c, a: ctl().system_reset(), needs="system_reset"),
            _Command("system_powerdown", lambda c, a: ctl().system_powerdown(),
                     needs="system_powerdown"),
        ]
        return {c.name: c for c in cmds}

    def _qmp_capabilities(self, client, args):
        if client.negotiated:
            raise CommandError("Capabilities negotiation is already complete, command ignored",
                               "CommandNotFound")
        client.oob = "oob" in args.get("enable", [])
        client.negotiated = True

    def _query_commands(self, client, args):
        return [{"name": c.name} for c in self._commands.values()
                if not c.needs or callable(getattr(self.controller, c.needs, None))]

    def _migrate(self, client, args):
        if args.get("resume"):
            raise CommandError("pyvmm does not support postcopy recovery (resume)")
        uri, channels = args.get("uri"), args.get("channels")
        if uri is not None and channels is not None:
            raise CommandError("'uri' and 'channels' arguments are mutually exclusive; exactly "
                               "one of the two should be present in 'migrate' qmp command")
        if channels is not None:
            if "main" not in channels:
                raise CommandError("missing 'main' migration channel")
            main, cpr = channels["main"], channels.get("cpr")
        elif uri is not None:
            main, cpr = parse_migration_uri(uri), None
        else:
            raise CommandError("neither 'uri' or 'channels' argument are specified in "
                               "'migrate' qmp command")
        started = self.controller.migrate(main, cpr, args.get("detach", True))
        return started if callable(started) else {}

    def _migrate_incoming(self, client, args):
        uri, channels = args.get("uri"), args.get("channels")
        if (uri is None) == (channels is None):
            raise CommandError("need either 'uri' or 'channels' argument")
        if channels is not None:
            if list(channels) != ["main"]:
                raise CommandError("Channel list must have only one entry, for type 'main'")
            main = channels["main"]
        else:
            main = parse_migration_uri(uri)
        if args.get("exit-on-error") is False:
            raise CommandError("pyvmm always exits when an incoming live update fails "
                               "(exit-on-error must be true)")
        self.controller.migrate_incoming(main)
