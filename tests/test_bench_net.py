"""Smoke test of bench/net_throughput.py: a very short run of the pyvmm C path only."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the benchmark needs root (netns, tap)"),
    pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK),
                       reason="no usable /dev/kvm on this host"),
    pytest.mark.skipif(shutil.which("ip") is None or not os.path.exists("/dev/net/tun"),
                       reason="needs iproute2 and /dev/net/tun"),
]


def bench_namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.startswith("pyvmm-bench-")}


def test_bench_prints_table_with_rate_for_c_path(guests):
    before = bench_namespaces()
    r = subprocess.run([sys.executable, str(ROOT / "bench/net_throughput.py"),
                        "--seconds", "0.5", "--vmm", "c", "--payload", "64"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| VMM | payload | echoes/s |" in r.stdout, r.stdout
    m = re.search(r"^\| pyvmm C path \| 64 B \| ([\d,]+) \| ([\d,.]+) \|", r.stdout, re.M)
    assert m, r.stdout
    assert int(m.group(1).replace(",", "")) > 0, r.stdout
    assert bench_namespaces() <= before, "the benchmark left a namespace behind"
