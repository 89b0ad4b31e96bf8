"""Smoke test of `pyvmm bench downtime`: a tiny sweep produces a table with numbers and PNGs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import ROOT, need_kvm

pytest.importorskip("matplotlib")
pytest.importorskip("rich")


def tiny_sweep(tmp_path, modes: str, baselines: str, env=None, timeout=120):
    """`pyvmm bench downtime` at 256M, 1 rep, untouched and idle: its output dir."""
    out = tmp_path / "results"
    r = subprocess.run([sys.executable, "-m", "bench.downtime", "--sizes", "256M",
                        "--reps", "1", "--modes", modes, "--ram", "untouched",
                        "--loads", "idle", "--baselines", baselines, "--no-progress",
                        "--out", str(out)], capture_output=True, text=True, cwd=ROOT,
                       timeout=timeout, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def test_tiny_sweep_writes_table_and_plots(guests, tmp_path):
    need_kvm()
    out = tiny_sweep(tmp_path, "exec,transfer", "none")
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


def test_qemu10_picks_the_debian_version_of_10_2_2():
    from bench.qemu10 import Qemu10Error, pick_version
    showsrc = "Package: qemu\nVersion: 1:10.1.3+ds-2\n\nPackage: qemu\nVersion: 1:10.2.2+ds-1\n"
    assert pick_version(showsrc) == "1:10.2.2+ds-1"
    # not 10.2.2 exactly: the newest 10.2.x there (the build says so)
    assert pick_version("Version: 1:10.2.1+ds-1\nVersion: 1:10.2.3+ds-1\n") == "1:10.2.3+ds-1"
    with pytest.raises(Qemu10Error, match="no qemu 10.2.x source"):
        pick_version("Version: 1:9.2.0+ds-1\n")


def test_without_qemu10_the_sweep_says_how_to_build_it(guests, tmp_path):
    need_kvm()
    out = tiny_sweep(tmp_path, "transfer", "qemu10",
                     env=dict(os.environ, PYVMM_QEMU10_CACHE=str(tmp_path / "q")))
    assert ("- QEMU 10.2.2 baseline: not built; build it with python3 bench/qemu10.py"
            in (out / "results.md").read_text())


def test_qemu10_beside_pyvmm(guests, tmp_path):
    """QEMU 10's cpr-exec and cpr-transfer, interleaved with pyvmm, the same measure."""
    need_kvm()
    from bench import qemu10
    if qemu10.binary() is None:
        pytest.skip(f"QEMU {qemu10.VERSION} is not built: {qemu10.HOW_TO_BUILD}")
    out = tiny_sweep(tmp_path, "exec,transfer", "qemu10", timeout=240)
    records = [x for x in json.loads((out / "results.json").read_text()) if x.get("vs")]
    assert sorted(x["mode"] for x in records) == ["exec", "qemu10-exec", "qemu10-transfer",
                                                   "transfer"]
    for rec in records:   # both VMMs: a heartbeat gap at the switch, a self-reported one
        assert rec["window_gap_us"] >= rec["switch_gap_us"] > 0 and rec["host_us"] > 0, rec
        assert rec["ticks_continuous"], rec
        # the first rep ran ten seconds untouched: its largest gap between 1 ms ticks, as
        # the host saw the lines and by the guest's clock, at least a period
        assert rec["steady_s"] == 10, rec
        assert rec["steady_max_gap_us"] >= 1000 and rec["steady_guest_max_gap_us"] >= 1000, rec
    table = (out / "results.md").read_text()
    assert "## pyvmm beside QEMU 10.2.2" in table
    for mode in ("exec", "transfer"):
        assert re.search(rf"^\| cpr-{mode} \| 256M \| [\d.]+ / [\d.]+ = [\d.]+ \|.* \| "
                         r"[\d.]+ / [\d.]+ = [\d.]+ ; [\d.]+ / [\d.]+ = [\d.]+ \|$", table,
                         re.M), table
    assert (out / "vs_qemu10.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_vcpu_sweep_reports_downtime_per_vcpu_count(guests, tmp_path):
    """`--vcpus 1,2`: the smp guest on each count, a row each and the slope per vCPU."""
    need_kvm()
    out = tmp_path / "results"
    r = subprocess.run([sys.executable, "-m", "bench.downtime", "--sizes", "256M",
                        "--reps", "1", "--modes", "transfer", "--vcpus", "1,2",
                        "--baselines", "none", "--no-progress", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = (out / "results.md").read_text()
    for n in (1, 2):
        assert re.search(rf"^\| pyvmm cpr-transfer \| 256M \| busy \| {n} \| 1 \| [\d.]+ / ",
                         table, re.M), table
    assert re.search(r"^\| pyvmm cpr-transfer \| 256M \| busy \| -?[\d.]+ \|$", table,
                     re.M), table
    records = json.loads((out / "results.json").read_text())
    assert sorted(r["vcpus"] for r in records) == [1, 2]


def test_vcpus_must_be_counts(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bench.downtime", "--vcpus", "1,x",
                        "--baselines", "none", "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().endswith("--vcpus: give vCPU counts above 0, comma-separated"), \
        r.stderr


def test_a_line_left_unfinished_shows_at_once():
    """A VMM that stopped its guest mid-line (a migration source, paused for good)
    never sends the newline: the fragment must still be seen, to be joined with the
    next VMM's first line (the heartbeat and the SMP tests depend on it)."""
    from bench.downtime.heartbeat import joined_lines
    from bench.lab import WatchedProcess
    code = "import sys, time; print('tick 1'); print('tick 2 t_u', end='', flush=True); time.sleep(30)"
    old = WatchedProcess([sys.executable, "-c", code])
    new = WatchedProcess([sys.executable, "-c", "print('s=5'); print('tick 3')"])
    try:
        deadline = time.monotonic() + 10
        while not old.partial and time.monotonic() < deadline:
            time.sleep(0.01)
        assert old.text() == "tick 1\ntick 2 t_u" and old.partial, old.text()
        assert old.search("tick 2", timeout=0.2) is None   # not a line until it ends
        assert new.search("tick 3")
        assert [line for _, line in joined_lines([old, new])] == ["tick 1", "tick 2 t_us=5",
                                                                 "tick 3"]
    finally:
        old.stop()
        new.stop()


def test_steady_reports_both_views_of_the_heartbeat(guests):
    """bench/steady.py: for each VMM (QEMU 10 when built), one line with the distribution
    of the gaps as the host read them and by the guest's clock, each about a period or
    more (a line shorter than the period arrives a period after the last, give or take
    the host's jitter), and the CPU time stolen meanwhile."""
    need_kvm()
    from bench import qemu10
    r = subprocess.run([sys.executable, "bench/steady.py", "--seconds", "1", "--rounds", "1"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = re.findall(r"^(pyvmm|qemu10) +[\d.]+ s \| median ([\d.]+) .* \| median ([\d.]+) "
                      r".* \| steal \d+ ms$", r.stdout, re.M)
    assert [v for v, _, _ in rows] == ["pyvmm"] + (["qemu10"] if qemu10.binary() else []), \
        r.stdout
    for _, host, guest in rows:
        assert float(host) >= 0.9 and float(guest) >= 0.9, r.stdout
