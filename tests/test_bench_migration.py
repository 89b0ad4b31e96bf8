"""`pyvmm bench migration` end to end, small: Debian's QEMU 7.2 (always there) moves the
pattern guest and the ticker between the two hosts; the report has every figure and
nothing is left behind."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import ROOT, need_kvm, pyvmm_cmd
from bench.migration import QEMU72
from bench.twohosts import list_namespaces


@pytest.mark.skipif(QEMU72 is None, reason="qemu-system-x86_64 is not installed")
def test_bench_migration_small(guests, tmp_path):
    need_kvm()
    p = subprocess.Popen(pyvmm_cmd("bench", "migration", "--sizes", "256M", "--dirty",
                                   "idle,ticker", "--vmms", "qemu72", "--reps", "1", "--out",
                                   str(tmp_path)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    records = json.loads((tmp_path / "results.json").read_text())
    assert [(x["vmm"], x["dirty"]) for x in records] == [("qemu72", "idle"), ("qemu72", "ticker")]
    idle, ticker = records
    # pass 1 sent every page the pattern guest wrote (256M - 32M); a plain copy as many bytes
    assert idle["transferred"] >= idle["copy_bytes"] == 224 << 20, records
    assert idle["pass1_MBps"] > 0 and idle["copy_MBps"] > 0
    assert idle["passes"] >= 2 and idle["downtime_ms"] >= 0 and idle["total_ms"] > 0
    assert idle["host_downtime_us"] > 0
    assert ticker["heartbeat_gap_us"] > 0          # ticks seen on both sides of the move
    text = (tmp_path / "results.md").read_text()
    assert "| QEMU 7.2 | 256M | idle | 1 |" in text and "pass 1 / copy" in text
    assert "- command: `pyvmm bench migration --sizes 256M" in text
    # its namespaces (two_hosts() names them pyvmm-PID-N-...) are gone
    assert not [ns for ns in list_namespaces() if ns.startswith(f"pyvmm-{p.pid}-")]
