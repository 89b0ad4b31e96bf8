"""The cpr-transfer channel: small JSON messages with fds attached (SCM_RIGHTS).

A SOCK_SEQPACKET unix socket keeps message boundaries, so every message and
its fds arrive together or not at all.  Large data (the state blob) travels in
a memfd passed as one of the fds, never inline.
"""

from __future__ import annotations

import json
import os
import socket

from ..errors import VmmError

PROTOCOL = "pyvmm-cpr"
PROTOCOL_VERSION = 1
MAX_MESSAGE = 64 * 1024
MAX_FDS = 64


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
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            for fd in fds:
                os.close(fd)
            raise ChannelError("cpr message truncated")
        try:
            msg = json.loads(data)
        except ValueError:
            msg = None
        if not isinstance(msg, dict) or not isinstance(msg.get("msg"), str):
            for fd in fds:
                os.close(fd)
            raise ChannelError("garbage on the cpr channel: not a pyvmm live update peer")
        if msg["msg"] == "error":
            for fd in fds:
                os.close(fd)
            raise ChannelError(f"the other pyvmm failed: {msg.get('desc', 'unknown error')}")
        return msg, fds

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


def listen(path: str) -> socket.socket:
    """The new VMM's end: a listening SEQPACKET socket at path."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        s.bind(path)
    except OSError as e:
        s.close()
        raise ChannelError(f"cannot listen on {path}: {e.strerror}") from None
    s.listen(1)
    return s
