"""The migration stream: a header, then framed sections, each with its CRC-32C.

    stream header   8 bytes magic b"PYVMMIG\\0", u32 version (little-endian)
    section         4-byte tag, u32 CRC-32C of the payload, u64 payload length, payload

Tags (source to destination): HELO (the machine's shape and the pages pass 1
sends, a state blob), PAGE (RAM pages, csrc/migrate.h), PASS (end of a pass),
STAT (device, vCPU and VM state, a state blob), GO!! (resume now).  Destination
to source: REDY (machine built, pass 1's pages allocated: send them), PACK
(every page of precopy pass N, a u64, is in RAM here), RSTD (restored, waiting
for GO!!), RUNS (the guest runs here), FAIL (why not, UTF-8).  A blob is vmm/state.py's format (never pickle).  Anything else (a
foreign stream, a bad CRC, a section cut short, an unknown tag) is refused
with a one-line StreamError.  The CRC is CRC-32C, computed in C with SSE4.2's
crc32 instruction (csrc/migrate.c): zlib's CRC-32 ran at a third of the link's
speed here, in the middle of every pass.
"""

from __future__ import annotations

import socket
import struct

from ..errors import VmmError
from ..kvm.ffi import ffi, lib

MAGIC = b"PYVMMIG\0"
VERSION = 4   # 2: PACK after each precopy pass; 3: HELO's "populated", REDY;
              # 4: a PAGE section's index before its pages (csrc/migrate.h)
STREAM_HEADER = struct.Struct("<8sI")
SECTION = struct.Struct("<4sIQ")
TAGS = (b"HELO", b"REDY", b"PAGE", b"PASS", b"STAT", b"GO!!", b"PACK", b"RSTD", b"RUNS", b"FAIL")
MAX_PAYLOAD = 64 << 20   # a PAGE section is at most ~1 MiB, a state blob a few


class StreamError(VmmError):
    """A migration stream that is corrupt, truncated, foreign or closed."""


def crc32c(data) -> int:
    """CRC-32C of a buffer (bytes, bytearray, memoryview, a cffi buffer), no copy."""
    return lib.pyvmm_crc32c(0, ffi.from_buffer("uint8_t[]", data), len(data))


def send_header(sock: socket.socket) -> None:
    sock.sendall(STREAM_HEADER.pack(MAGIC, VERSION))


def recv_header(sock: socket.socket) -> None:
    raw = recv_exact(sock, STREAM_HEADER.size, "the stream header")
    magic, version = STREAM_HEADER.unpack(raw)
    if magic != MAGIC:
        raise StreamError("not a pyvmm migration stream (bad magic): is the source a pyvmm "
                          "migrating with uri=tcp:HOST:PORT?")
    if version != VERSION:
        raise StreamError(f"migration stream version {version}, this pyvmm reads {VERSION}: "
                          "migrate between the same pyvmm versions")


def send_section(sock: socket.socket, tag: bytes, payload=b"") -> int:
    """Send one section (payload: bytes or a buffer, sent without a copy); returns
    the bytes put on the wire."""
    view = memoryview(payload).cast("B")
    head = SECTION.pack(tag, crc32c(view), len(view))
    sent = sock.sendmsg([head, view])
    if sent < len(head) + len(view):   # a short send: the rest, in order
        rest = (head + bytes(view))[sent:] if sent < len(head) else view[sent - len(head):]
        sock.sendall(rest)
    return len(head) + len(view)


def recv_section(sock: socket.socket, head: bytes | None = None) -> tuple[bytes, memoryview]:
    """One section: (tag, payload), its CRC checked.  With `head`, its header was read
    already (by the C loop that takes PAGE sections, pages.Applier.receive)."""
    if head is None:
        head = recv_exact(sock, SECTION.size, "a section header")
    tag, crc, length = SECTION.unpack(head)
    if tag not in TAGS:
        raise StreamError(f"migration stream is corrupt: unknown section {tag!r}")
    if length > MAX_PAYLOAD:
        raise StreamError(f"migration stream is corrupt: a {tag.decode()} section of "
                          f"{length} bytes")
    view = memoryview(bytearray(length))
    recv_into_exact(sock, view, f"a {tag.decode()} section")
    if crc32c(view) != crc:
        raise StreamError(f"migration stream is corrupt: the {tag.decode()} section's "
                          "CRC-32C does not match")
    return tag, view


def recv_exact(sock: socket.socket, n: int, what: str) -> bytes:
    buf = bytearray(n)
    recv_into_exact(sock, memoryview(buf), what)
    return bytes(buf)


def recv_into_exact(sock: socket.socket, view: memoryview, what: str) -> None:
    got = 0
    while got < len(view):
        try:
            n = sock.recv_into(view[got:])
        except socket.timeout:
            raise StreamError(f"migration stream stalled while reading {what}") from None
        except OSError as e:
            raise StreamError(f"migration connection failed while reading {what}: "
                              f"{e.strerror or e}") from None
        if n == 0:
            raise StreamError(f"migration stream truncated: the peer closed the connection "
                              f"in {what}")
        got += n


def expect(sock: socket.socket, tag: bytes) -> memoryview:
    """The next section, which must be `tag` (a FAIL from the peer raises its reason)."""
    got, payload = recv_section(sock)
    if got != tag:
        expect_failed(got, payload, tag)
    return payload


def expect_failed(got: bytes, payload, tag: bytes):
    """Raise why section `got` came where `tag` was expected."""
    if got == b"FAIL":
        raise StreamError(f"the destination refused the migration: "
                          f"{bytes(payload).decode(errors='replace')}")
    raise StreamError(f"migration stream out of order: {got.decode()} where "
                      f"{tag.decode()} was expected")
