"""pyvmm's saved-state format: versioned, checksummed, self-describing, never pickled.

A blob is a fixed header followed by a tagged binary body:

    offset  size  field
    0       8     magic  b"PYVMMST\\0"
    8       4     format version (little-endian u32), currently 3
    12      4     CRC-32 of the body
    16      8     body length in bytes
    24      ...   body: one value, encoded as below

Every value starts with a one-byte tag, so the body describes itself:

    N  None          T / F  True / False
    q  int, 8 bytes signed      Q  int, 8 bytes unsigned     L  int: u32 n, n bytes signed
    d  float, 8 bytes           s  str: u32 n, n bytes UTF-8  b  bytes: u32 n, n bytes
    l  list: u32 n, n values    m  map: u32 n, n (str key without its tag, value) pairs

Decoding can only ever produce dicts, lists, strings, numbers and bytes: a
corrupt or hostile blob is refused with a message saying what is wrong, never
executed.  (Version 1 was JSON; a binary body keeps `json`, and with it `re`
and `enum`, out of the cpr-exec image, whose every import is downtime.)
`python -m vmm.state FILE` prints a blob as JSON for people to read.

Kernel structs (xsave, LAPIC, irqchip...) are stored as their exact bytes, and
their sizes are checked on load, so a blob from another kernel is refused
rather than misread.
"""

from __future__ import annotations

import os
import struct
import zlib

from .errors import VmmError

MAGIC = b"PYVMMST\0"
VERSION = 3   # 3: a vCPU's MSRs are one bytes value (struct kvm_msr_entry array)
HEADER = struct.Struct("<8sIIQ")
MAX_BODY = 64 << 20
MAX_DEPTH = 64

_U32 = struct.Struct("<I")
_Q = struct.Struct("<q")
_UQ = struct.Struct("<Q")
_D = struct.Struct("<d")


class StateError(VmmError):
    """A state blob that pyvmm will not load."""


# -- encoding -----------------------------------------------------------------------
_PLAIN = frozenset((bytes, int, str, dict, list, type(None), bool, float))


def _plain(obj):
    """(obj as one of the _PLAIN types: a tuple is a list, a bytearray or memoryview is
    bytes, a subclass is its base; or StateError)"""
    for kind in (bool, int, float, str, dict):
        if isinstance(obj, kind):
            return kind(obj)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj)
    if isinstance(obj, (list, tuple)):
        return list(obj)
    raise StateError(f"cannot save a {type(obj).__name__} in pyvmm state")


def _enc(obj, out: list, depth: int = 0) -> None:
    """(the exact types by identity, the commonest first, and a bytes value appended
    as it is, not copied: it runs inside a live update's downtime, where a ticker
    guest's 104 values took 65 us this way against 44)"""
    if depth > MAX_DEPTH:
        raise StateError("state nests too deeply")
    t = type(obj)
    if t not in _PLAIN:
        obj = _plain(obj)
        t = type(obj)
    if t is bytes:
        out.append(b"b" + _U32.pack(len(obj)))
        out.append(obj)
    elif t is int:
        if -(1 << 63) <= obj < (1 << 63):
            out.append(b"q" + _Q.pack(obj))
        elif 0 <= obj < (1 << 64):
            out.append(b"Q" + _UQ.pack(obj))
        else:
            raw = obj.to_bytes((obj.bit_length() + 8) // 8, "little", signed=True)
            out.append(b"L" + _U32.pack(len(raw)) + raw)
    elif t is str:
        raw = obj.encode()
        out.append(b"s" + _U32.pack(len(raw)) + raw)
    elif t is dict:
        out.append(b"m" + _U32.pack(len(obj)))
        for key, value in obj.items():
            if not isinstance(key, str):
                raise StateError(f"state key {key!r} is not a string")
            raw = key.encode()
            out.append(_U32.pack(len(raw)) + raw)
            _enc(value, out, depth + 1)
    elif t is list:
        out.append(b"l" + _U32.pack(len(obj)))
        for item in obj:
            _enc(item, out, depth + 1)
    elif obj is None:
        out.append(b"N")
    elif t is bool:
        out.append(b"T" if obj else b"F")
    else:   # float
        out.append(b"d" + _D.pack(obj))


def dumps(state: dict) -> bytes:
    """Serialize a state dict into a blob."""
    parts: list[bytes] = []
    _enc(state, parts)
    body = b"".join(parts)
    return HEADER.pack(MAGIC, VERSION, zlib.crc32(body), len(body)) + body


# -- decoding -----------------------------------------------------------------------
_PAST_END = "state blob is corrupt: a value runs past the end"


def _decode(buf: bytes):
    """The body's one value.  Written as one closure with positions passed along
    (not a reader object), lengths read inline and the commonest tags first: it
    runs inside a live update's downtime (a ticker guest's 104-value state: 98 ->
    78 us here)."""
    size = len(buf)
    u32, q, uq, d = _U32.unpack_from, _Q.unpack_from, _UQ.unpack_from, _D.unpack_from

    def value(pos, depth):
        if pos >= size:
            raise StateError(_PAST_END)
        tag = buf[pos]
        pos += 1
        if tag == 0x71:                                    # q
            if pos + 8 > size:
                raise StateError(_PAST_END)
            return q(buf, pos)[0], pos + 8
        if tag == 0x62 or tag == 0x73:                     # b s
            if pos + 4 > size:
                raise StateError(_PAST_END)
            end = pos + 4 + u32(buf, pos)[0]
            if end > size:
                raise StateError(_PAST_END)
            return (buf[pos + 4:end] if tag == 0x62 else buf[pos + 4:end].decode()), end
        if tag == 0x6D or tag == 0x6C:                     # m l
            if pos + 4 > size:
                raise StateError(_PAST_END)
            n = u32(buf, pos)[0]
            pos += 4
            if n > size - pos:   # (each item is at least one byte)
                raise StateError(_PAST_END)
            if n and depth >= MAX_DEPTH:
                raise StateError("state blob is corrupt: it nests too deeply")
            if tag == 0x6C:
                out = []
                append = out.append
                for _ in range(n):
                    v, pos = value(pos, depth + 1)
                    append(v)
                return out, pos
            out = {}
            for _ in range(n):
                if pos + 4 > size:
                    raise StateError(_PAST_END)
                end = pos + 4 + u32(buf, pos)[0]
                if end > size:
                    raise StateError(_PAST_END)
                out[buf[pos + 4:end].decode()], pos = value(end, depth + 1)
            return out, pos
        if tag == 0x51 or tag == 0x64:                     # Q d
            if pos + 8 > size:
                raise StateError(_PAST_END)
            return (uq if tag == 0x51 else d)(buf, pos)[0], pos + 8
        if tag == 0x4E:                                    # N
            return None, pos
        if tag == 0x54:                                    # T
            return True, pos
        if tag == 0x46:                                    # F
            return False, pos
        if tag == 0x4C:                                    # L
            if pos + 4 > size:
                raise StateError(_PAST_END)
            end = pos + 4 + u32(buf, pos)[0]
            if end > size:
                raise StateError(_PAST_END)
            return int.from_bytes(buf[pos + 4:end], "little", signed=True), end
        raise StateError(f"state blob is corrupt: unknown tag {bytes([tag])!r} at byte {pos - 1}")

    return value(0, 0)


def loads(blob: bytes, schema: str | None = None) -> dict:
    """Check and decode a blob; raise StateError saying exactly what is wrong.

    With `schema` ("state": a live update's blob, "saved": a machine's own
    save_state(); see vmm/schema.py), the decoded tree must also have every field
    the restore code reads, of the type it expects, or it is refused naming it.  A
    live update's tree saved by another pyvmm version is first converted into this
    version's (vmm/compat.py), or refused naming both versions."""
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
        state, end = _decode(body)
    except UnicodeDecodeError:
        raise StateError("state blob is corrupt: a string is not UTF-8") from None
    except struct.error as e:
        raise StateError(f"state blob is corrupt: {e}") from None
    if end != len(body):
        raise StateError("state blob is corrupt: bytes left over after the body")
    if not isinstance(state, dict):
        raise StateError("state blob is corrupt: the body is not a map")
    if schema == "state" and not _own(state):   # another pyvmm's: convert it (or refuse)
        from .compat import to_current
        state = to_current(state)
    if schema is not None:
        from .schema import check
        check(schema, state)
    return state


def _own(state: dict) -> bool:
    """A live update's state saved by this very version (no vmm.compat import then:
    the cpr-exec resume path runs this inside the downtime)."""
    from . import __version__
    cpr = state.get("cpr")
    return isinstance(cpr, dict) and cpr.get("pyvmm") == __version__


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


# -- JSON-safe trees (the cpr-transfer channel's small messages) ----------------------
def encode_tree(obj):
    """A tree with bytes made JSON-safe as {"__bytes__": base64}."""
    import binascii
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return {"__bytes__": binascii.b2a_base64(bytes(obj), newline=False).decode("ascii")}
    if isinstance(obj, dict):
        for key in obj:
            if not isinstance(key, str):
                raise StateError(f"state key {key!r} is not a string")
        return {k: encode_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [encode_tree(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise StateError(f"cannot send a {type(obj).__name__}")


def decode_tree(obj, depth: int = 0):
    """The inverse of encode_tree, for a tree that json already parsed."""
    import binascii
    if depth > MAX_DEPTH:
        raise StateError("corrupt tree: it nests too deeply")
    if isinstance(obj, dict):
        if len(obj) == 1 and "__bytes__" in obj:
            try:
                return binascii.a2b_base64(obj["__bytes__"], strict_mode=True)
            except (ValueError, TypeError, binascii.Error) as e:
                raise StateError(f"corrupt bytes field ({e})") from None
        return {k: decode_tree(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_tree(v, depth + 1) for v in obj]
    return obj


# -- blobs in memfds (how state travels to the new VMM) -------------------------------
def to_memfd(blob: bytes) -> int:
    """Put a state blob in a memfd (close-on-exec) for passing."""
    fd = os.memfd_create("pyvmm-cpr-state", os.MFD_CLOEXEC)
    view = memoryview(blob)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def read_memfd(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0)


def _msrs_as_json(raw: bytes) -> dict:
    """A vCPU's saved MSRs (struct kvm_msr_entry: u32 index, u32 pad, u64 value) by index."""
    if len(raw) % 16:
        return _as_json(raw)
    return {f"{index:#x}": value for index, _, value in struct.iter_unpack("<IIQ", raw)}


def _as_json(obj):
    if isinstance(obj, bytes):
        return {"bytes": len(obj), "hex": obj[:64].hex() + ("..." if len(obj) > 64 else "")}
    if isinstance(obj, dict):
        return {k: _msrs_as_json(v) if k == "msrs" and isinstance(v, bytes) else _as_json(v)
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [_as_json(v) for v in obj]
    return obj


def main(argv=None) -> int:
    """`python -m vmm.state FILE`: print a saved state blob as JSON."""
    import json
    import sys
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m vmm.state FILE", file=sys.stderr)
        return 2
    with open(args[0], "rb") as f:
        try:
            state = loads(f.read())
        except StateError as e:
            print(f"pyvmm: error: {e}", file=sys.stderr)
            return 1
    json.dump(_as_json(state), sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
