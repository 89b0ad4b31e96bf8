"""The cpr-transfer socket against a stranger: crafted, malformed or foreign peers.

Each test talks to a real waiting `pyvmm run --incoming cpr-transfer:PATH` with a
hand-made client (no old pyvmm), the way a hostile or buggy process on the host would.
"""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from conftest import need_kvm
from test_cpr import start_incoming

pytestmark = pytest.mark.usefixtures("kvm")

MiB = 1 << 20
RAM = 64 * MiB


@pytest.fixture(scope="module")
def kvm():
    need_kvm()


def b64(data: bytes) -> dict:
    import base64
    return {"__bytes__": base64.b64encode(data).decode()}


def shape(cpuid: bytes, **over) -> dict:
    """A machine shape as the old pyvmm's hello carries it (bytes made JSON-safe)."""
    s = {"arch": "x86_64", "vcpus": 1,
         "memory": {"size": RAM, "name": "pyvmm-ram", "hugetlb": False,
                    "regions": [[0, RAM, 0]]},
         "kernel": None, "cmdline": "", "cpuid": [b64(cpuid)], "nets": 0}
    s.update(over)
    return s


def hello(shape_tree, **over) -> bytes:
    msg = {"msg": "hello", "protocol": "pyvmm-cpr", "version": 1, "shape": shape_tree,
           "config": {}, "faults": []}
    msg.update(over)
    return json.dumps(msg).encode()


def ram_memfd() -> int:
    fd = os.memfd_create("test-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, RAM)
    return fd


def send_hello(sock_path, data: bytes, fds=None):
    """Connect, send one message (with a RAM memfd) and return the reply (or None on EOF)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(20)
    s.connect(str(sock_path))
    own = fds is None
    fds = [ram_memfd()] if own else fds
    try:
        socket.send_fds(s, [data], fds)
        try:
            reply = s.recv(65536)
        except OSError:
            reply = b""
        return json.loads(reply) if reply else None
    finally:
        s.close()
        if own:
            for fd in fds:
                os.close(fd)


def crafted_cpuid() -> bytes:
    """nent says 1 entry (48 bytes); the bytes go on for 200 more entries."""
    return (1).to_bytes(4, "little") + bytes(4) + bytes(40 * 201)


def test_crafted_cpuid_hello_is_refused_without_a_crash(guests, vmm_procs, tmp_path):
    """CPUID bytes longer than their `nent` once overflowed an 8-byte cffi allocation
    (free(): invalid next size, SIGABRT): now a one-line refusal naming the CPUID."""
    new, sock, _ = start_incoming(vmm_procs, tmp_path)
    reply = send_hello(sock, hello(shape(crafted_cpuid())))
    assert reply is not None and reply["msg"] == "error", reply
    assert "cpuid" in reply["desc"].lower(), reply
    time.sleep(0.5)
    rc = new.proc.poll()
    assert rc is None or rc >= 0, f"pyvmm killed by signal {-rc}: {new.stderr}"
    lines = new.stderr.strip().splitlines()
    assert len(lines) == 1 and "cpuid" in lines[0].lower(), new.stderr
