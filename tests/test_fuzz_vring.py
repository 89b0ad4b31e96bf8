"""Fuzz the C code that reads guest- or blob-controlled data, each for a bounded time:
the vnet ring walker and data path (csrc/fuzz/fuzz_vring.c) and the cpr-exec
prebuilder's request check (csrc/fuzz/fuzz_prebuild.c), and a migration stream's
pages (csrc/fuzz/fuzz_migrate.c).

libFuzzer + ASan + UBSan: any out-of-map access, overflow, UB or crash fails the run.
"""

from __future__ import annotations

import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "csrc" / "fuzz"
RAM = 0x1000  # gpa of the fuzzer's RAM image


def desc(addr, length, flags=0, nxt=0):
    return struct.pack("<QIHH", addr, length, flags, nxt)


def seed(pre: bytes, pieces: dict[int, bytes]) -> bytes:
    """A fuzzer input: preamble + RAM image with `pieces` placed at their gpa."""
    img = bytearray(0x6000)
    for gpa, data in pieces.items():
        img[gpa - RAM:gpa - RAM + len(data)] = data
    return pre + bytes(img)


def seeds() -> list[bytes]:
    tx = {0x1000: desc(0x5000, 12, 1, 1) + desc(0x5100, 200),      # hdr + payload
          0x1800: struct.pack("<HHH", 0, 1, 0)}
    rx = {0x2000: desc(0x5800, 2048, 2) + desc(0x6000, 32, 4),      # plain + indirect
          0x2800: struct.pack("<HHHH", 0, 2, 0, 1),
          0x6000: desc(0x6100, 12, 3, 1) + desc(0x6200, 1500, 2)}
    mrg = {0x2000: b"".join(desc(0x3000 + 0x200 * i, 0x200, 2) for i in range(8)),
           0x2800: struct.pack("<HH", 0, 8) + b"".join(struct.pack("<H", i) for i in range(8))}
    return [seed(bytes([3, 0x03, 0, 0x05]), {**tx, **rx}),
            seed(bytes([3, 0x06, 0, 0x07]), {**tx, **mrg}),
            seed(bytes([2, 0x00, 1, 0x00]), tx)]


@pytest.fixture(scope="module")
def fuzzer() -> Path:
    if shutil.which("clang") is None:
        pytest.skip("clang is not installed (apt-get install clang): cannot build the libFuzzer target")
    p = subprocess.run(["make", "-s", "-C", str(FUZZ), "fuzz_vring"], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    return FUZZ / "fuzz_vring"


def test_vnet_builds_with_werror():
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    p = subprocess.run(["make", "-s", "-C", str(FUZZ), "werror"], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_fuzz_vring(fuzzer, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, s in enumerate(seeds()):
        (corpus / f"seed{i}").write_bytes(s)
    p = subprocess.run([str(fuzzer), "-max_total_time=20", "-timeout=10", "-rss_limit_mb=2048",
                        f"-artifact_prefix={tmp_path}/", str(corpus)],
                       capture_output=True, text=True, timeout=180, cwd=tmp_path)
    tail = "\n".join(p.stderr.splitlines()[-40:])
    assert p.returncode == 0, tail
    assert "ERROR: AddressSanitizer" not in p.stderr and "runtime error" not in p.stderr, tail
    assert "Done" in p.stderr, tail
    assert not list(tmp_path.glob("crash-*")) and not list(tmp_path.glob("timeout-*"))


def test_fuzz_prebuild_request(tmp_path):
    """The cpr-exec prebuilder's request check (csrc/fuzz/fuzz_prebuild.c): whatever it
    accepts lies inside the RAM memfd, page-aligned, without overflow."""
    if shutil.which("clang") is None:
        pytest.skip("clang is not installed (apt-get install clang): cannot build the libFuzzer target")
    p = subprocess.run(["make", "-s", "-C", str(FUZZ), "fuzz_prebuild"], capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    import os
    from vmm.cpr import prebuild
    from vmm.memory import GiB, GuestMemory
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    mem = GuestMemory(4 * GiB)     # two regions around the MMIO hole (nothing is touched)
    try:
        fd = prebuild.request(mem, 2)
        (corpus / "valid").write_bytes(os.pread(fd, 1 << 16, 0))
        os.close(fd)
    finally:
        mem.close()
    p = subprocess.run([str(FUZZ / "fuzz_prebuild"), "-max_total_time=10",
                        f"-artifact_prefix={tmp_path}/", str(corpus)],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    tail = "\n".join(p.stderr.splitlines()[-20:])
    assert p.returncode == 0, tail
    assert "Done" in p.stderr and not list(tmp_path.glob("crash-*")), tail


def test_fuzz_migration_pages(tmp_path):
    """A migration stream's PAGE section, which comes from the network
    (csrc/fuzz/fuzz_migrate.c): received only inside the RAM given, the same through
    pwritev and straight into RAM, accepted only when well formed, and what it wrote
    sends and receives back the same."""
    if shutil.which("clang") is None:
        pytest.skip("clang is not installed (apt-get install clang): cannot build the libFuzzer target")
    p = subprocess.run(["make", "-s", "-C", str(FUZZ), "fuzz_migrate"], capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    # A seed with a run of consecutive pages, a zero page and a lone page: a payload
    # that size (16 KiB) and shape is out of reach of mutations from nothing (libFuzzer's
    # default max_len is 4 KiB), and runs are where the writes are batched.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = random.Random(7)
    # And one naming a page three times (the fuzzer's find, 2026-12-07: received
    # straight into RAM, the copies overwrote one another before the checksum read them,
    # so the two ways of receiving disagreed; such a section is refused now).
    def payload(pages):
        index = struct.pack("<Q", len(pages)) + b"".join(struct.pack("<Q", pg << 12 | zero)
                                                         for pg, zero in pages)
        return index + b"".join(rng.randbytes(4096) for _, zero in pages if not zero)
    (corpus / "run").write_bytes(payload([(0, False), (1, False), (2, False), (5, True),
                                          (7, False)]))
    (corpus / "twice").write_bytes(payload([(0, True), (0, False), (0, False), (2, False),
                                            (5, True)]))
    p = subprocess.run([str(FUZZ / "fuzz_migrate"), "-max_total_time=10", "-max_len=65536",
                        f"-artifact_prefix={tmp_path}/", str(corpus)],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    tail = "\n".join(p.stderr.splitlines()[-20:])
    assert p.returncode == 0, tail
    assert "Done" in p.stderr and not list(tmp_path.glob("crash-*")), tail
