"""Unix sockets only their owner can reach: the QMP and cpr-transfer sockets.

Whoever can connect to the QMP socket can run any command as this VMM's user
(`cpr-exec-command`, as in QEMU), and whoever can connect to a waiting cpr
socket can hand it a guest.  So both are created mode 0600, whatever the
umask, with no moment where they are more open, and the cpr socket also checks
its peer's credentials (a socket moved, re-moded or inherited elsewhere).
Neither ever replaces a socket that a live process still serves.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct

from .errors import VmmError

OWNER_ONLY = 0o600


def bind_owner_only(sock: socket.socket, path: str) -> None:
    """bind() `sock` at `path` as a node of mode 0600.

    On Linux the node takes the mode of the socket's own inode (masked by the
    umask), so fchmod'ing the still unbound socket makes the node 0600 from the
    instant it exists: no window where another user could connect."""
    os.fchmod(sock.fileno(), OWNER_ONLY)
    sock.bind(path)
    if os.stat(path).st_mode & 0o077:   # (another kernel that ignores the inode's mode)
        os.chmod(path, OWNER_ONLY)      # still before listen(): nobody can connect yet


def listen_owner_only(sock: socket.socket, path: str, backlog: int) -> None:
    """bind_owner_only() and listen(), so that `path` appears only once it accepts.

    A client that waits for the path to exist and then connects (a script, the old
    VMM of a cpr-transfer) must not find a socket that is bound but not listening
    yet: that connect() fails with ECONNREFUSED.  So the socket is bound and put in
    listen state under a temporary name beside `path`, then hard-linked to `path`
    (which, unlike rename, never replaces what may have appeared there meanwhile)."""
    tmp = f"{path}.{os.getpid()}~"
    if len(os.fsencode(tmp)) >= 108:   # (no room for the longer name in sun_path)
        bind_owner_only(sock, path)
        sock.listen(backlog)
        return
    try:
        os.unlink(tmp)                  # (left by a process of our pid that died)
    except FileNotFoundError:
        pass
    bind_owner_only(sock, tmp)
    try:
        sock.listen(backlog)
        os.link(tmp, path)
    finally:
        os.unlink(tmp)


def peer_cred(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end (SO_PEERCRED: as it was at connect)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)


def stranger(pid: int, uid: int) -> str | None:
    """Why a peer (peer_cred) may not use this VMM (another user, not root), or None."""
    if uid in (os.geteuid(), 0):
        return None
    return f"process {pid} runs as uid {uid}, this pyvmm as uid {os.geteuid()}"


def someone_listens(path: str) -> bool:
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
    if someone_listens(path):
        raise VmmError(f"{what} socket {path} is in use by a running process")
    os.unlink(path)
