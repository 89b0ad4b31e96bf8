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


def test_from_an_older_release_measures_an_upgrade(guests, tmp_path):
    """`--from 0.1.0`: every guest starts under the previous release (its own built
    tree, reused from the upgrade tests' cache) and is updated to this tree."""
    need_kvm()
    from bench import release_tree
    version, _ = release_tree.previous_release()
    try:
        release_tree.release_tree(version)
    except release_tree.MissingCommit as e:
        pytest.skip(str(e))
    out = tmp_path / "results"
    r = subprocess.run([sys.executable, "-m", "bench.downtime", "--sizes", "256M",
                        "--reps", "1", "--modes", "exec,transfer", "--ram", "untouched",
                        "--loads", "idle", "--baselines", "none", "--no-progress",
                        "--from", version, "--out", str(out)], capture_output=True,
                       text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"each guest ran under pyvmm {version}" in (out / "results.md").read_text()
    records = json.loads((out / "results.json").read_text())
    assert {r["mode"] for r in records} == {"exec", "transfer"}
    for rec in records:   # the old release really ran the guest; the update completed
        assert rec["from"] == f"pyvmm {version}", rec
        assert rec["host_us"] > 0


def test_from_an_unknown_revision_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bench.downtime", "--from", "9.9.9",
                        "--baselines", "none", "--loads", "idle", "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(
        "pyvmm bench downtime: --from 9.9.9:"), r.stderr
