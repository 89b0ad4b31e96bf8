"""Every data-path backend under sustained load: a few seconds of closed-loop UDP echo.

The sender (bench/net_throughput.py's, run inside the namespace) keeps 32 datagrams
in flight, so the tap's queue (500 frames) can never overflow: no loss is expected
and none is allowed.  The guest echoes each datagram exactly once, so the data
path's counters must agree too: TX never ahead of RX (RX is TX plus ARP requests).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, need_kvm
from bench.lab import GUEST_IP, in_ns, netns_with_tap
from vmm.client import QmpClient

SENDER = ROOT / "bench" / "net_throughput.py"
SECONDS, WINDOW = 3, 32


def backend_param(name):
    if name == "vhost" and not os.path.exists("/dev/vhost-net"):
        return pytest.param(name, marks=pytest.mark.skip(
            reason="no /dev/vhost-net on this host (modprobe vhost_net)"))
    return name


def net_stats(qmp) -> dict:
    with QmpClient(str(qmp), timeout=10) as q:
        st = q.execute("x-query-state")
    return next(d["stats"] for d in st["devices"] if d.get("type") == "virtio-net-mmio")


@pytest.mark.parametrize("size", [64, 1400])
@pytest.mark.parametrize("backend", [backend_param(b) for b in ("c", "python", "vhost")])
def test_sustained_udp_echo_loses_nothing_and_counters_agree(guests, vmm_procs, tmp_path,
                                                             backend, size):
    need_kvm()
    qmp = tmp_path / "qmp"
    with netns_with_tap() as (ns, tap):
        p = vmm_procs(["run", "--kernel", str(guests / "netecho.elf"), "--qmp", str(qmp),
                       "--net", f"tap,ifname={tap},backend={backend}",
                       "--cmdline", f"ip={GUEST_IP} stats=0"], ns=ns)
        p.wait_for(r"netecho: up")
        before = net_stats(qmp)
        r = subprocess.run(in_ns(ns, sys.executable, str(SENDER), "--sender", GUEST_IP,
                                 str(size), str(SECONDS), str(WINDOW)),
                           capture_output=True, text=True, timeout=SECONDS + 30, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout.splitlines()[-1])
        after = net_stats(qmp)
        assert p.proc.poll() is None, p.stderr
    c = {k: after[k] - before[k] for k in after}
    what = f"{backend} {size} B: {res} counters {c}"
    assert "error" not in res, what
    assert res["sent"] > 2 * WINDOW, what          # the window was refilled: a closed loop
    assert res["dup"] == 0 and res["unsent"] == 0 and res["bad"] == 0, what
    assert res["lost"] == 0, what
    assert c["rx_packets"] >= res["sent"], what     # every datagram went through the device
    assert c["tx_packets"] <= c["rx_packets"], what
    assert c["rx_dropped"] == 0 and c["tx_dropped"] == 0, what
