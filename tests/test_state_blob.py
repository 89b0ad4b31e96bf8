"""The saved-state blob (vmm/state.py): what it encodes, and every way a blob is refused.

A live update's new VMM reads a blob the old one wrote; whatever arrives, the only way
out of `loads` is the state or a StateError saying what is wrong (the fuzzers below try
arbitrary bodies behind valid checksums).  Whether a decoded state fits a machine is the
schema's business (test_schema.py) and the restore code's (test_boot.py).
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import ROOT, fuzz
from vmm import state as state_format
from vmm.errors import VmmError
from vmm.state import HEADER, MAGIC, VERSION, StateError, dumps, loads

# what a machine's state holds: kernel structs as bytes, MSR values past 2**63, names...
SAMPLE = {"vcpus": [{"regs": bytes(range(144)), "msrs": [[16, 2**63 + 1]]}],
          "name": "ticker ✓", "n": -5, "f": 1.5, "z": None, "ok": True, "no": False,
          "big": 2**70, "small": -2**70, "nested": {"list": [1, [2, [3, {}]]], "empty": []}}
DEEP: list = []
for _ in range(state_format.MAX_DEPTH + 2):
    DEEP = [DEEP]


def blob_with_body(body: bytes) -> bytes:
    """A header that is right for `body` (magic, version, checksum, length)."""
    return HEADER.pack(MAGIC, VERSION, zlib.crc32(body), len(body)) + body


def test_round_trip_keeps_every_type():
    assert loads(dumps(SAMPLE)) == SAMPLE
    # tuples come back as lists, bytearrays and memoryviews as bytes
    assert loads(dumps({"t": (1, 2), "ba": bytearray(b"x"), "mv": memoryview(b"y")})) == \
        {"t": [1, 2], "ba": b"x", "mv": b"y"}


@pytest.mark.parametrize("bad,why", [
    ({1: "x"}, "is not a string"),
    ({"s": {1, 2}}, "cannot save a set"),
    ({"deep": DEEP}, "nests too deeply"),
])
def test_encoding_refuses_what_it_cannot_save(bad, why):
    with pytest.raises(StateError, match=why):
        dumps(bad)


def test_corrupt_state_is_refused():
    blob = dumps(SAMPLE)
    flipped = bytearray(blob)
    flipped[100] ^= 0xFF
    with pytest.raises(StateError, match="checksum"):
        loads(bytes(flipped))
    with pytest.raises(StateError, match="version"):
        loads(blob[:8] + (99).to_bytes(4, "little") + blob[12:])
    with pytest.raises(StateError, match="magic"):
        loads(b"GARBAGE!" + blob[8:])
    with pytest.raises(StateError, match="truncated"):
        loads(blob[:-10])
    with pytest.raises(StateError, match="truncated"):
        loads(blob[:HEADER.size - 1])
    with pytest.raises(StateError, match="padded"):
        loads(blob + b"\0")


@pytest.mark.parametrize("body,why", [
    (b"m\x01\x00\x00\x00\x01\x00\x00\x00aq\x01", "runs past the end"),
    (b"N" + b"N", "left over"),
    (b"l\x00\x00\x00\x00", "not a map"),
    (b"m\x01\x00\x00\x00\x01\x00\x00\x00aZ", "unknown tag b'Z' at byte 10"),
    (b"m\x01\x00\x00\x00\x01\x00\x00\x00as\x01\x00\x00\x00\xff", "not UTF-8"),
    (b"m\xff\xff\xff\xff", "runs past the end"),
    (b"l\x01\x00\x00\x00" * 70 + b"N", "nests too deeply"),
])
def test_corrupt_bodies_are_refused_saying_why(body, why):
    with pytest.raises(StateError, match=why):
        loads(blob_with_body(body))


def test_state_decoder_refuses_garbage_with_valid_checksums():
    """Corrupt bodies that still pass the CRC: the decoder itself must refuse them cleanly."""
    good = dumps({"vcpus": [{"regs": bytes(144), "msrs": [[16, 2**63 + 1]]}],
                  "name": "x", "n": -5, "f": 1.5, "z": None, "ok": True})
    body = good[HEADER.size:]
    rng = random.Random(1234)
    for _ in range(3000):
        b = bytearray(body)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        if rng.random() < 0.3:
            b = b[:rng.randrange(len(b))]
        try:
            out = loads(blob_with_body(bytes(b)))
        except StateError:
            continue
        assert isinstance(out, dict)


def refused_cleanly(fn, *args):
    try:
        return fn(*args)
    except VmmError:
        return None


@fuzz
@given(st.binary(max_size=256))
def test_fuzz_blob_body(body):
    """Any body behind a header with the right length and checksum: the decoder
    refuses cleanly (no struct.error, no RecursionError, no UnicodeDecodeError)."""
    refused_cleanly(loads, blob_with_body(body), "state")


@fuzz
@given(st.binary(min_size=1, max_size=8), st.integers(0, 1 << 16))
def test_fuzz_blob_bytes_flipped(junk, at):
    """A real blob with bytes overwritten and the checksum fixed up."""
    body = bytearray(dumps(SAMPLE)[HEADER.size:])
    at %= len(body)
    body[at:at + len(junk)] = junk
    refused_cleanly(loads, blob_with_body(bytes(body)), "state")


def test_blob_travels_in_a_memfd():
    blob = dumps(SAMPLE)
    fd = state_format.to_memfd(blob)
    try:
        assert not os.get_inheritable(fd)          # close-on-exec: passed on purpose only
        assert state_format.read_memfd(fd) == blob
    finally:
        os.close(fd)


def test_print_a_blob_as_json(tmp_path):
    """`python -m vmm.state FILE`: a blob as JSON for people; a bad one is one line."""
    path = tmp_path / "state"
    msrs = struct.pack("<IIQ", 0x10, 0, 12345)
    path.write_bytes(dumps({"vcpus": [{"msrs": msrs, "regs": bytes(100)}], "n": 1}))
    r = subprocess.run([sys.executable, "-m", "vmm.state", str(path)], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["vcpus"][0]["msrs"] == {"0x10": 12345}
    assert out["vcpus"][0]["regs"]["bytes"] == 100 and out["n"] == 1
    path.write_bytes(b"not a blob at all, long enough for a header")
    r = subprocess.run([sys.executable, "-m", "vmm.state", str(path)], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 1
    assert r.stderr.splitlines() == ["pyvmm: error: not a pyvmm state blob (bad magic): was it "
                                     "written by pyvmm?"]
