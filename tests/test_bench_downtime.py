"""Smoke test of `pyvmm bench downtime`: a tiny sweep produces a table with numbers and PNGs."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT, need_kvm

pytest.importorskip("matplotlib")
pytest.importorskip("rich")


def test_tiny_sweep_writes_table_and_plots(guests, tmp_path):
    need_kvm()
    out = tmp_path / "results"
    r = subprocess.run([sys.executable, "-m", "bench.downtime", "--sizes", "256M",
                        "--reps", "1", "--modes", "exec,transfer", "--ram", "untouched",
                        "--loads", "idle", "--baselines", "none", "--no-progress",
                        "--out", str(out)], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = (out / "results.md").read_text()
    for mode in ("cpr-exec", "cpr-transfer"):
        row = next(line for line in table.splitlines() if line.startswith(f"| pyvmm {mode} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        host = cells[5]
        assert re.fullmatch(r"[\d.]+ / [\d.]+ / [\d.]+", host), row
        assert float(host.split(" / ")[0]) > 0, row
    records = json.loads((out / "results.json").read_text())
    assert {r["mode"] for r in records} == {"exec", "transfer"}
    assert all(r["host_us"] > 0 and r["phases_us"]["transfer"] is not None for r in records)
    for png in ("downtime_vs_ram.png", "phases.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, png
