"""pyvmm's saved-state format: versioned, checksummed, self-describing, never pickled.

A blob is a fixed header followed by a UTF-8 JSON body:

    offset  size  field
    0       8     magic  b"PYVMMST\\0"
    8       4     format version (little-endian u32), currently 1
    12      4     CRC-32 of the body
    16      8     body length in bytes
    24      ...   body: JSON; bytes values are {"__bytes__": "<base64>"}

JSON keeps the blob readable (`pyvmm state FILE` prints it), and decoding it
can only ever produce dicts, lists, strings, numbers and bytes: a corrupt or
hostile blob is refused with a clear message, never executed.  Kernel structs
(xsave, LAPIC, irqchip...) are stored as their exact bytes, with their sizes
recorded so that a blob from another kernel is refused rather than misread.
"""

from __future__ import annotations

import binascii
import json
import os
import struct
import zlib

from .errors import VmmError

MAGIC = b"PYVMMST\0"
VERSION = 1
HEADER = struct.Struct("<8sIIQ")
MAX_BODY = 64 << 20


class StateError(VmmError):
    """A state blob that pyvmm will not load."""


def _encode(obj):
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return {"__bytes__": binascii.b2a_base64(bytes(obj), newline=False).decode("ascii")}
    if isinstance(obj, dict):
        for key in obj:
            if not isinstance(key, str):
                raise StateError(f"state key {key!r} is not a string")
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise StateError(f"cannot save a {type(obj).__name__} in pyvmm state")


def _decode_hook(d: dict):
    if len(d) == 1 and "__bytes__" in d:
        try:
            return binascii.a2b_base64(d["__bytes__"], strict_mode=True)
        except (ValueError, TypeError, binascii.Error) as e:
            raise StateError(f"state blob is corrupt: bad bytes field ({e})") from None
    return d


def dumps(state: dict) -> bytes:
    """Serialize a state dict into a blob."""
    body = json.dumps(_encode(state), separators=(",", ":")).encode()
    return HEADER.pack(MAGIC, VERSION, zlib.crc32(body), len(body)) + body


def loads(blob: bytes) -> dict:
    """Check and decode a blob; raise StateError saying exactly what is wrong."""
    if len(blob) < HEADER.size:
        raise StateError(f"state blob is truncated ({len(blob)} bytes, the header alone is "
                         f"{HEADER.size})")
    magic, version, crc, length = HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise StateError("not a pyvmm state blob (bad magic): was it written by pyvmm?")
    if version != VERSION:
        raise StateError(f"state blob has format version {version}; this pyvmm reads "
                         f"version {VERSION}")
    if length > MAX_BODY or HEADER.size + length != len(blob):
        raise StateError(f"state blob is truncated or padded: header says {length} body "
                         f"bytes, found {len(blob) - HEADER.size}")
    body = bytes(blob[HEADER.size:])
    if zlib.crc32(body) != crc:
        raise StateError("state blob is corrupt: checksum mismatch")
    try:
        state = json.loads(body, object_hook=_decode_hook)
    except (ValueError, RecursionError) as e:
        raise StateError(f"state blob is corrupt: {e}") from None
    if not isinstance(state, dict):
        raise StateError("state blob is corrupt: the body is not an object")
    return state


def require(state: dict, path: str, kind: type):
    """Fetch state['a']['b'] for path 'a.b' and check its type, or raise StateError."""
    node = state
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise StateError(f"state blob lacks {path}: it is not a pyvmm machine state")
        node = node[part]
    if not isinstance(node, kind):
        raise StateError(f"state field {path} should be {kind.__name__}, "
                         f"found {type(node).__name__}")
    return node


def encode_tree(obj):
    """A state tree with bytes made JSON-safe (for messages that are not whole blobs)."""
    return _encode(obj)


def decode_tree(obj):
    """The inverse of encode_tree, for a tree that json already parsed."""
    if isinstance(obj, dict):
        obj = {k: decode_tree(v) for k, v in obj.items()}
        return _decode_hook(obj)
    if isinstance(obj, list):
        return [decode_tree(v) for v in obj]
    return obj


def to_memfd(blob: bytes) -> int:
    """Put a state blob in a sealed-size memfd (close-on-exec) for passing."""
    fd = os.memfd_create("pyvmm-cpr-state", os.MFD_CLOEXEC)
    os.write(fd, blob)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def read_memfd(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0)
