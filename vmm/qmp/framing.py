"""QMP framing: cut a client's byte stream into JSON values, as QEMU's json-streamer does.

A value may arrive in pieces and needs no newline; a malformed one costs only
itself; nesting and size are bounded so that one client cannot make the
monitor recurse or buffer without end (docs/QMP.md, "Limits").
"""

from __future__ import annotations

import json
import re

#: A client that sends this much without completing a JSON value is cut off.
MAX_INPUT = 1 << 20
#: Deeper nesting than any QMP command needs; also keeps json.loads off the
#: recursion limit.
MAX_NESTING = 256

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

    Nesting deeper than MAX_NESTING is refused as soon as it is reached,
    with QEMU's message; then, as QEMU's json-streamer does, the rest of that
    value is skipped (not kept, no more errors) until its brackets balance
    or a byte that cannot occur in JSON resets the stream.
    """

    def __init__(self, limit: int = MAX_INPUT):
        self.limit = limit
        self._buf = bytearray()
        self._pos = 0          # scanned up to here (relative to _buf)
        self._depth = 0
        self._in_string = False
        self._scalar = False   # a bare top-level token (number, keyword)
        self._skipping = False  # past MAX_NESTING: eat the value, report nothing

    @property
    def overflow(self) -> bool:
        """True when a partial value has grown past the limit."""
        return len(self._buf) > self.limit

    def _reset(self):
        self._depth = 0
        self._in_string = self._scalar = self._skipping = False

    def feed(self, data: bytes) -> list:
        buf = self._buf
        buf += data
        out = []
        n = len(buf)
        i = self._pos
        start = 0  # start of the value being read

        def finish(end):
            if not self._skipping:
                try:
                    out.append((parse_json(bytes(buf[start:end])), None))
                except ValueError as e:
                    out.append((None, f"JSON parse error, {e}"))
            self._reset()
            return end

        def stray(at):
            if not self._skipping:
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
                    if self._depth > MAX_NESTING and not self._skipping:
                        out.append((None, "JSON nesting depth limit exceeded"))
                        self._skipping = True
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
        if self._skipping:
            start = i    # what was scanned of a refused value is not kept
        del buf[:start]
        self._pos = i - start
        return out
