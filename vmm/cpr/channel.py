"""The cpr-transfer channel: small JSON messages with fds attached (SCM_RIGHTS).

A SOCK_SEQPACKET unix socket keeps message boundaries, so every message and
its fds arrive together or not at all.  Large data (the state blob) travels in
a memfd passed as one of the fds, never inline.
"""

from __future__ import annotations

import json
import os
import socket

from ..compat import PROTOCOL as PROTOCOL_VERSION  # noqa: F401 (for source, target)
from ..compat import peer_problem
from ..errors import VmmError

PROTOCOL = "pyvmm-cpr"
MAX_MESSAGE = 64 * 1024
MAX_FDS = 64
HELLO_TIMEOUT = 10.0   # a peer that connects says hello at once (the new VMM waits for it)


class ChannelError(VmmError):
    """The other side of a live update went away or sent nonsense."""


class ChannelTimeout(ChannelError):
    """Nothing arrived from the other side in time (it may still be alive)."""


class Channel:
    """One end of the cpr-transfer socket."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    @classmethod
    def connect(cls, path: str, timeout: float = 10.0) -> "Channel":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        s.settimeout(timeout)
        try:
            s.connect(path)
        except OSError as e:
            s.close()
            raise ChannelError(f"cannot connect to the new pyvmm at {path}: {e.strerror} "
                               "(start it first with `pyvmm run --incoming cpr-transfer:"
                               f"{path}`)") from None
        return cls(s)

    def send(self, msg: dict, fds: list[int] = ()) -> None:
        data = json.dumps(msg).encode()
        if len(data) > MAX_MESSAGE:
            raise ChannelError("cpr message too large")
        try:
            socket.send_fds(self.sock, [data], list(fds))
        except OSError as e:
            raise ChannelError(f"the other pyvmm went away: {e.strerror}") from None

    def recv(self, timeout: float | None = None) -> tuple[dict, list[int]]:
        """Next message and its fds (already close-on-exec); ChannelError on EOF/garbage."""
        self.sock.settimeout(timeout)
        try:
            data, fds, flags, _ = socket.recv_fds(self.sock, MAX_MESSAGE, MAX_FDS,
                                                  socket.MSG_CMSG_CLOEXEC)
        except socket.timeout:
            raise ChannelTimeout("timed out waiting for the other pyvmm") from None
        except OSError as e:
            raise ChannelError(f"the other pyvmm went away: {e.strerror}") from None
        if not data:
            for fd in fds:
                os.close(fd)
            raise ChannelError("the other pyvmm closed the connection")
        try:
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise ChannelError("cpr message truncated")
            return parse(data), fds
        except ChannelError:
            for fd in fds:
                os.close(fd)
            raise

    def expect(self, name: str, timeout: float | None = None) -> tuple[dict, list[int]]:
        msg, fds = self.recv(timeout)
        if msg["msg"] != name:
            for fd in fds:
                os.close(fd)
            raise ChannelError(f"expected {name!r} from the other pyvmm, got {msg['msg']!r}")
        return msg, fds

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def parse(data: bytes) -> dict:
    """One message as received: a JSON map with a string "msg"; an "error" from the
    other side becomes a ChannelError with its description."""
    try:
        msg = json.loads(data)
    except (ValueError, RecursionError):
        msg = None
    if not isinstance(msg, dict) or not isinstance(msg.get("msg"), str):
        raise ChannelError("garbage on the cpr channel: not a pyvmm live update peer")
    if msg["msg"] == "error":
        desc = str(msg.get("desc", "unknown error"))[:500]
        raise ChannelError(f"the other pyvmm failed: {desc}")
    return msg


def check_hello(msg: dict, fds: list[int]) -> dict:
    """The machine shape a `hello` (and its one fd, the RAM memfd) asks for, checked
    whole against vmm/schema.py; ChannelError/StateError saying what is wrong."""
    from .. import state as state_format
    from ..schema import check
    if msg.get("protocol") != PROTOCOL:
        raise ChannelError("the peer is not a pyvmm live update")
    why = peer_problem(msg.get("pyvmm"), msg.get("version"))   # another release's?
    if why:
        raise ChannelError(why)
    check("hello", msg)
    want = 2 if msg.get("commit") else 1   # (pyvmm 0.1.0 sends no commit page)
    if len(fds) != want:
        raise ChannelError(f"expected the RAM memfd{' and the commit page' if want == 2 else ''}"
                           f", got {len(fds)} fds")
    return check("shape", state_format.decode_tree(msg["shape"]))


def accept(listener: socket.socket, check, *, timeout: float = HELLO_TIMEOUT, log=None):
    """Wait for the old VMM: (channel, hello, its fds, check(hello, fds)).

    A peer of another user (SO_PEERCRED: not ours, not root) is closed on before
    anything is read from it (its fds never enter this process); one of ours that
    closes, sends nothing within `timeout`, sends garbage or a `hello` that `check`
    refuses is told why.  Each costs one line to `log` and we go on listening."""
    from .. import unix
    log = log or _log_stderr
    while True:
        try:
            conn, _ = listener.accept()
        except OSError as e:
            raise ChannelError(f"cannot accept on the cpr socket: {e.strerror}") from None
        channel = Channel(conn)
        pid, uid, _ = unix.peer_cred(conn)
        who = f"process {pid} (uid {uid})"
        why = unix.stranger(pid, uid)
        if why:
            channel.close()
            log(f"pyvmm: cpr socket: refused {who}: not this pyvmm's user ({why}); "
                "still waiting")
            continue
        try:
            msg, fds = channel.expect("hello", timeout)
            try:
                return channel, msg, fds, check(msg, fds)
            except Exception:
                for fd in fds:
                    os.close(fd)
                raise
        except VmmError as e:
            try:
                channel.send({"msg": "error", "desc": str(e)})
            except VmmError:
                pass
            channel.close()
            log(f"pyvmm: cpr socket: refused {who}: {e}; still waiting")


def _log_stderr(line: str) -> None:
    import sys
    print(line, file=sys.stderr, flush=True)


def listen(path: str) -> socket.socket:
    """The new VMM's end: a listening SEQPACKET socket at path, mode 0600 (never
    replacing a file, or a socket that a live process serves)."""
    from ..unix import claim_socket_path, listen_owner_only
    claim_socket_path(path, "--incoming")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        listen_owner_only(s, path, 1)   # the path appears already accepting
    except OSError as e:
        s.close()
        raise ChannelError(f"cannot listen on {path}: {e.strerror}") from None
    return s
