"""`pyvmm bench soak`, short: 4 live updates (2 cpr-exec, 2 cpr-transfer) under UDP and ping."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from conftest import ROOT, need_kvm, pyvmm_cmd


def test_soak_four_updates_lose_nothing_and_leak_nothing(guests, tmp_path):
    need_kvm()
    if os.geteuid() != 0:
        pytest.skip("the soak needs root (a network namespace and a tap)")
    out = tmp_path / "soak.json"
    r = subprocess.run(pyvmm_cmd("bench", "soak", "--updates", "4", "--datagrams", "300",
                                 "--no-live", "--json", str(out)),
                       capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.rstrip().endswith("soak: passed")
    lines = re.findall(r"^update +(\d+) (cpr-\w+) ", r.stdout, re.M)
    assert lines == [("1", "cpr-exec"), ("2", "cpr-transfer"), ("3", "cpr-exec"),
                     ("4", "cpr-transfer")]
    data = json.loads(out.read_text())
    recs = data["records"]
    assert [x["lost"] + x["dup"] for x in recs] == [0] * 4
    assert all(x["sent"] == 300 and x["downtime_us"] > 0 for x in recs)
    # the same VMM shape after every update: nothing leaks from one to the next
    assert len({(x["fds"], x["threads"]) for x in recs}) == 1, recs
    assert data["ping"]["received"] >= data["ping"]["sent"] - 1 > 0


def test_soak_refuses_bad_arguments_in_one_line():
    r = subprocess.run(pyvmm_cmd("bench", "soak", "--memory", "lots"), capture_output=True,
                       text=True, timeout=30, cwd=ROOT)
    assert r.returncode == 2
    assert "--memory 'lots': give a size like 256M or 1G" in r.stderr
    assert "Traceback" not in r.stderr


def test_verdict_names_each_leak_and_loss():
    from bench.soak import verdict
    rec = {"lost": 0, "dup": 0, "fds": 17, "threads": 5}
    recs = [dict(rec, update=1, mode="exec"), dict(rec, update=2, mode="transfer"),
            dict(rec, update=3, mode="exec", fds=18),
            dict(rec, update=4, mode="transfer", lost=2, threads=6)]
    ping = {"ping": {"sent": 100, "received": 100, "dup": 0}}
    assert verdict(recs[:2], ping, 2) == []
    assert verdict(recs, ping, 5) == [
        "only 4 of 5 updates ran",
        "update 4 (cpr-transfer): 2 datagrams lost, 0 duplicated",
        "update 3 (cpr-exec): 18 fds, 17 after update 1",
        "update 4 (cpr-transfer): 6 threads, 5 after update 2"]
