"""The QMP server: a unix socket that serves many clients, within limits, and outlives faults.

One daemon thread serves every client with `selectors`; what a request means
is vmm/qmp/commands.py's business, how its bytes become JSON values
vmm/qmp/framing.py's.  Output is queued per client under a lock so that
`emit()` may be called from any thread (vCPU threads, the migration thread)
and events never interleave with replies.

The socket stays while pyvmm runs: too many clients, a client that does not
read, a shortage of fds (accept() backs off and retries; clients wait in the
backlog) or an unexpected error costs at most one client, never the monitor.

For live update the listening socket can outlive the process: the old pyvmm
hands `listen_fd` to the new one (SCM_RIGHTS for cpr-transfer, inheritance
for cpr-exec), so clients that reconnect meanwhile wait in the listen backlog
instead of finding the path gone.
"""

from __future__ import annotations

import errno
import json
import os
import selectors
import socket
import stat
import threading
import time

from ..errors import VmmError
from ..log import get_logger, log_safely
from ..unix import claim_socket_path, listen_owner_only, someone_listens
from .commands import Commands, error_reply, greeting
from .framing import MAX_INPUT, JsonStream

log = get_logger(__name__)   # (importing logging costs ~9 ms, after a cpr-exec too)

#: A client that does not read its replies and events is cut off past this.
MAX_OUTPUT = 16 << 20
#: At most this many clients are served at once; one more gets an error and
#: is disconnected.
MAX_CLIENTS = 32
#: A client is also refused when accepting it left fewer than this many fds
#: under RLIMIT_NOFILE for the VMM itself (a live update needs a few).
FD_HEADROOM = 16
#: After accept() failed for want of fds or memory, wait this long (seconds)
#: before trying again; meanwhile new clients wait in the listen backlog.
ACCEPT_BACKOFF = 0.5


class _Client:
    """One connection: its input parser, output queue and QMP state (the session
    vmm/qmp/commands.py reads and sets: negotiated, oob)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.stream = JsonStream()
        self.out = bytearray()
        self.negotiated = False
        self.oob = False
        self.closing = False   # close once the loop gets to it
        self.eof = False       # the peer sent EOF: close once its replies are out
        self.deaf = False      # the peer cannot receive: drop its output, keep reading
        self.mask = selectors.EVENT_READ

    def fileno(self):
        return self.sock.fileno()


class Monitor:
    """The QMP server.  See the module docstring and docs/QMP.md."""

    def __init__(self, path: str, controller, *, listen_fd: int | None = None):
        self.path = path
        self._lock = threading.RLock()
        self._clients: list[_Client] = []
        self._held: list[dict] = []   # events stamped, not yet sent (emit, wake=False)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False
        self._unlink = True
        self._keep_listener = False
        self._kick_clients = threading.Event()
        self._clients_closed = threading.Event()
        self._accept_after = None   # monotonic time to listen again after a shortage
        self._accept_failing = False
        self._last_fault = ("", 0.0)
        self._commands = Commands(controller)
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
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # 0600: QMP can run anything as us (docs/QMP.md); the path appears accepting
            listen_owner_only(sock, path, 16)
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

    @property
    def controller(self):
        """What the commands drive (see vmm/qmp/commands.py)."""
        return self._commands.controller

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
            if not thread.is_alive():
                self._cleanup()   # (a no-op when _run did it)
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

    def emit(self, name: str, data: dict | None = None, *, wake: bool = True):
        """Send an event to every negotiated client.  Any thread may call this.

        Like QEMU, an event without data has no "data" member.  With wake=False the
        event is only held, stamped: it is encoded and goes out, in order, at the
        next flush().  A live update's events inside its downtime are held so:
        sending them there wakes the client's process, and waking this thread takes
        the GIL from the update (~0.1-0.2 ms per event in a cpr-transfer's stop
        phase, measured with `pyvmm cpr --trace`); encoding one took another
        30-60 us of the stop.
        """
        now = time.time()
        seconds = int(now)
        msg = {"event": name}
        if data is not None:
            msg["data"] = data
        msg["timestamp"] = {"seconds": seconds, "microseconds": int((now - seconds) * 1e6)}
        with self._lock:
            self._held.append(msg)
        if wake:
            self.flush()

    def flush(self) -> None:
        """Send what emit() holds: to each client that has negotiated by now."""
        with self._lock:
            held, self._held = self._held, []
            for msg in held:
                line = self._encode(msg)
                for client in self._clients:
                    if client.negotiated and not (client.closing or client.eof):
                        self._queue(client, line)
        if threading.current_thread() is not self._thread:
            self._wake()   # (the loop sends what a socket did not take at once)

    # -- the loop ------------------------------------------------------------

    def _wake(self):
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # full (a wakeup is already pending) or closed

    def _run(self):
        # The socket outlives anything that goes wrong in here: the VMM can
        # still be updated or quit.  Only close() ends the loop and removes it.
        try:
            while not self._stopping:
                try:
                    self._serve()
                except Exception as e:
                    self._fault(f"unexpected {type(e).__name__}: {e}; still serving")
                    time.sleep(0.1)   # an error that repeats must not spin
        finally:
            if self._stopping:
                self._cleanup()

    def _serve(self):
        """One round: wait for sockets, serve what is ready, reap."""
        timeout = None
        if self._accept_after is not None:
            timeout = self._accept_after - time.monotonic()
            if timeout <= 0:
                self._accept_after = None
                timeout = None
                self._sel.register(self._listener, selectors.EVENT_READ, "listener")
        ready = self._sel.select(timeout)
        hold_off = getattr(self.controller, "hold_off", None)
        if ready and hold_off is not None:
            hold_off()   # not inside a live update's downtime (see Controller.hold_off)
        for key, mask in ready:
            try:
                self._ready(key, mask)
            except Exception as e:
                if not isinstance(key.data, _Client):
                    raise
                # Whatever it was, it concerns this client only: drop it.
                self._fault(f"unexpected {type(e).__name__} serving a client: {e}; "
                            "disconnecting it")
                key.data.closing = True
            if self._stopping:
                return
        if self._kick_clients.is_set():
            self._kick_clients.clear()
            with self._lock:
                for client in self._clients:
                    client.closing = True
            self._reap()
            self._clients_closed.set()
        self._reap()

    def _fault(self, text):
        """Log one line about a fault, but not the same one again and again."""
        now = time.monotonic()
        last, when = self._last_fault
        if text != last or now - when > 10:
            self._last_fault = (text, now)
            log_safely(log, "error", "QMP monitor: %s", text)

    def _ready(self, key, mask):
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
            if mask & selectors.EVENT_READ and not (client.closing or client.eof):
                self._read(client)

    def _accept(self):
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno == errno.ECONNABORTED:
                    continue   # that client gave up already
                # EMFILE, ENFILE, ENOBUFS, ENOMEM: no fd or memory for it now.
                # Stop watching the listener for a while (it would stay
                # readable: a busy loop); the client waits in the backlog.
                if not self._accept_failing:
                    self._accept_failing = True   # said once, until an accept works
                    log_safely(log, "warning",
                               "QMP: cannot accept a client: %s; retrying every %s s",
                               e.strerror, ACCEPT_BACKOFF)
                self._sel.unregister(self._listener)
                self._accept_after = time.monotonic() + ACCEPT_BACKOFF
                return
            self._accept_failing = False
            refusal = self._refusal(sock)
            if refusal:
                try:
                    sock.setblocking(False)
                    sock.send(self._encode(error_reply(refusal)))
                except OSError:
                    pass
                sock.close()
                continue
            sock.setblocking(False)
            client = _Client(sock)
            with self._lock:
                self._clients.append(client)
                self._sel.register(sock, client.mask, client)
                self._queue(client, self._encode(greeting()))

    def _refusal(self, sock) -> str | None:
        """Why a new connection is not served, or None."""
        if len(self._clients) >= MAX_CLIENTS:
            return (f"Too many QMP clients: at most {MAX_CLIENTS} are served at once; "
                    "try again later")
        # Fds are handed out lowest first: this one's number is how many are
        # in use at least.
        limit = os.sysconf("SC_OPEN_MAX")
        if 0 < limit <= sock.fileno() + FD_HEADROOM:
            return (f"Too few file descriptors left for another QMP client "
                    f"(RLIMIT_NOFILE is {limit}); try again later")
        return None

    def _read(self, client):
        try:
            data = client.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            client.eof = True   # _reap closes it once its replies are out
            return
        # Every command received runs, in order, also when its reply cannot
        # be delivered (as QEMU does for a client that closed without reading).
        for value, error in client.stream.feed(data):
            if error is not None:
                self._reply(client, error_reply(error))
            else:
                self._handle(client, value)
            if client.closing or self._stopping:
                return
        if client.stream.overflow:
            self._reply(client, error_reply(
                f"JSON input exceeds {MAX_INPUT} bytes without a complete object"))
            client.closing = True

    def _reap(self):
        """Close the clients marked closing; update what the others wait for."""
        with self._lock:
            keep = []
            for client in self._clients:
                if client.eof and not client.out:
                    client.closing = True
                if client.closing:
                    self._flush(client)
                    self._drop(client)
                    continue
                keep.append(client)
                # After EOF only the rest of the output is waited for.
                mask = 0 if client.eof else selectors.EVENT_READ
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
                            not someone_listens(self.path):
                        os.unlink(self.path)
                except OSError:
                    pass

    # -- output --------------------------------------------------------------

    @staticmethod
    def _encode(msg) -> bytes:
        return (json.dumps(msg, allow_nan=False) + "\r\n").encode()

    def _queue(self, client, line: bytes, send: bool = True):
        """Append to a client's output and send what the socket takes now (with send;
        without, the loop sends it once woken).  Caller holds the lock."""
        if client.closing or client.deaf:
            return
        if len(client.out) + len(line) > MAX_OUTPUT:
            log_safely(log, "warning", "QMP client not reading its output; disconnecting it")
            client.out.clear()
            client.closing = True
            return
        client.out += line
        if send:
            self._flush(client)

    def _flush(self, client):
        while client.out:
            try:
                sent = client.sock.send(client.out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # The peer cannot take replies any more (it closed, or shut
                # its read side); its input is still read and run until EOF.
                client.out.clear()
                client.deaf = True
                if client.eof:
                    client.closing = True
                return
            del client.out[:sent]

    def _reply(self, client, msg):
        try:
            line = self._encode(msg)
        except (TypeError, ValueError) as e:
            log_safely(log, "error", "QMP reply not serializable: %s", e)
            err = error_reply(f"internal error: reply is not JSON: {e}")
            line = self._encode({**err, **({"id": msg["id"]} if "id" in msg else {})})
        with self._lock:
            self._queue(client, line)

    def _handle(self, client, request):
        """Run one request (its reply goes out before any work the command left for after)."""
        reply, after = self._commands.handle(client, request)
        self._reply(client, reply)
        if after is not None:
            try:
                after()
            except Exception:
                log_safely(log, "error", "QMP command failed after its reply", exc_info=True)
