"""Fuzz what a live update reads from the other side: the cpr channel's messages
(vmm/cpr/channel.py: parse, check_hello) and the schema (vmm/schema.py), with
Hypothesis.  (The state blob's decoder, vmm/state.py, is fuzzed in test_state_blob.py.)

Whatever arrives, the only way out is a clean refusal (a VmmError, which the
CLI prints as one line and the channel sends back); any other exception is a
bug.  A state that the schema accepts must also restore into a real machine
without any other exception: the schema covers everything the restore code reads.

In the suite each target runs a few hundred examples (a few seconds); run it
longer with e.g. `PYVMM_FUZZ_EXAMPLES=100000 pytest tests/test_fuzz_cpr.py`.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from conftest import fuzz
from vmm import state as state_format
from vmm.cpr.channel import check_hello, parse
from vmm.errors import VmmError
from vmm.schema import check

# Any value a decoder can produce (JSON or the blob's tags), nested a little.
leaf = (st.none() | st.booleans() | st.integers() | st.integers(-2**70, 2**70)
        | st.floats(allow_nan=True) | st.text(max_size=20) | st.binary(max_size=64))
value = st.recursive(leaf, lambda kids: st.lists(kids, max_size=4)
                     | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=12)
json_value = st.recursive(st.none() | st.booleans() | st.integers() | st.floats()
                          | st.text(max_size=20),
                          lambda kids: st.lists(kids, max_size=4)
                          | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                          max_leaves=12)

SHAPE = {"arch": "x86_64", "vcpus": 1,
         "memory": {"size": 64 << 20, "name": "pyvmm-ram", "hugetlb": False,
                    "regions": [[0, 64 << 20, 0]]},
         "kernel": None, "cmdline": "", "cpuid": [b"\0" * 8]}


def paths(tree, prefix=()):
    """Every path into a tree of dicts and lists."""
    yield prefix
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from paths(v, prefix + (i,))


@st.composite
def mutation(draw, tree, values=value):
    """`tree` with one field (a few, sometimes) replaced by any of `values`, or removed."""
    out = copy.deepcopy(tree)
    for _ in range(draw(st.integers(1, 3))):
        every = list(paths(out))
        path = draw(st.sampled_from(every[1:] or every))
        if not path:
            return draw(values)
        node = out
        for p in path[:-1]:
            node = node[p]
        if draw(st.booleans()) and isinstance(node, dict):
            del node[path[-1]]
        else:
            node[path[-1]] = draw(values)
    return out


def refused_cleanly(fn, *args):
    try:
        return fn(*args)
    except VmmError:
        return None


def hello_bytes(shape) -> bytes:
    return json.dumps({"msg": "hello", "protocol": "pyvmm-cpr", "version": 1,
                       "shape": state_format.encode_tree(shape), "config": {},
                       "faults": []}).encode()


def test_valid_hello_passes():
    """(the fuzzers below start from a hello that is accepted)"""
    assert check_hello(parse(hello_bytes(SHAPE)), [3]) == SHAPE


def test_deep_nesting_is_refused_cleanly():
    """Every depth up to past json's own limit: json parses some that are too deep to
    decode recursively; those must be refused, not overflow the stack."""
    for depth in range(50, 2000, 25):
        refused_cleanly(hello_pipeline, deep_hello(depth))


def hello_pipeline(data: bytes):
    msg = parse(data)
    return check_hello(msg, [3])


def deep_hello(depth: int) -> bytes:
    return (b'{"msg": "hello", "protocol": "pyvmm-cpr", "version": 1, "shape": {"memory": '
            + b"[" * depth + b"]" * depth + b"}}")


@fuzz
@given(st.binary(max_size=512) | json_value.map(lambda v: json.dumps(v).encode()))
@example(b"[" * 100_000)          # deeper than json's recursion limit
def test_fuzz_channel_message(data):
    """Raw datagrams and arbitrary JSON: only clean refusals."""
    refused_cleanly(hello_pipeline, data)


@fuzz
@given(st.data())
def test_fuzz_hello_shape(data):
    """A real hello with fields of its JSON tree replaced or removed."""
    tree = json.loads(hello_bytes(SHAPE))
    mutated = data.draw(mutation(tree, json_value))
    raw = json.dumps(mutated).encode()
    refused_cleanly(hello_pipeline, raw)
    # the same, with the mutated shape as bytes the decoder could produce
    shape = data.draw(mutation(SHAPE))
    refused_cleanly(check, "shape", shape)


# -- a real machine's state, mutated, through the schema and into the restore code ----------
@pytest.fixture(scope="module")
def machine():
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no usable /dev/kvm on this host")
    from vmm.machine import Machine, MachineConfig
    m = Machine(MachineConfig(memory=64 << 20, console=lambda data: None))
    m.create(restoring=True)
    yield m
    m.close()


def test_fuzz_state_through_restore(machine):
    """Fields of a real saved state replaced or removed: the schema refuses it cleanly,
    or the state it accepts restores (restore_state) with at worst a VmmError (KVM
    refusing a value): the restore code reads nothing the schema did not check."""
    saved = dict(machine.save_state(), cpr={"mode": "cpr-transfer", "timeline": [],
                                            "steps": [], "fds": {}, "config": {},
                                            "faults": []})
    accepted = []

    @fuzz
    @given(st.data())
    def run(data):
        tree = data.draw(mutation(saved))
        try:
            blob = state_format.dumps(tree)
        except VmmError:
            return
        state = refused_cleanly(state_format.loads, blob, "state")
        if state is not None:
            accepted.append(1)
            refused_cleanly(machine.restore_state, state)

    run()
    assert accepted, "no mutated state got past the schema: the fuzzer tests nothing there"
