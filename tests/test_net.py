"""virtio-net through pyvmm end to end: a real tap in a namespace, the netecho guest, real traffic."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, need_kvm
from bench.lab import GUEST_IP, in_ns, netns_with_tap

pytestmark = pytest.mark.usefixtures("kvm")


@pytest.fixture(scope="module")
def kvm():
    need_kvm()


def start(vmm_procs, ns, tap, backend="c", cmdline=""):
    p = vmm_procs(["run", "--kernel", str(ROOT / "guest/build/netecho.elf"),
                   "--net", f"tap,ifname={tap},backend={backend}",
                   "--cmdline", f"ip={GUEST_IP} stats=0 {cmdline}".strip()], ns=ns)
    p.wait_for(r"netecho: up")
    return p


def stream(ns, count, interval, size=64):
    out = subprocess.run(in_ns(ns, sys.executable, "-m", "bench.traffic", GUEST_IP,
                               str(count), str(interval), str(size)),
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return json.loads(out)


@pytest.mark.parametrize("backend", ["c", "python"])
def test_host_pings_guest(guests, vmm_procs, backend):
    with netns_with_tap() as (ns, tap):
        p = start(vmm_procs, ns, tap, backend)
        r = subprocess.run(in_ns(ns, "ping", "-c", "20", "-i", "0.01", "-W", "2", GUEST_IP),
                           capture_output=True, text=True, timeout=30)
        assert "20 packets transmitted, 20 received" in r.stdout, r.stdout + p.stderr
        assert p.proc.poll() is None


@pytest.mark.parametrize("size", [1, 64, 1472])
def test_udp_stream_complete_and_in_order(guests, vmm_procs, size):
    with netns_with_tap() as (ns, tap):
        start(vmm_procs, ns, tap)
        res = stream(ns, 2000, 0.0005, size)
        assert res["got"] == list(range(2000))


def test_both_directions_at_once(guests, vmm_procs):
    """Two streams at once (each both ways: to the guest and back) plus a ping flood."""
    with netns_with_tap() as (ns, tap):
        start(vmm_procs, ns, tap)
        cmd = in_ns(ns, sys.executable, "-m", "bench.traffic", GUEST_IP, "1500",
                    "0.001", "800")
        a = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        b = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        ping = subprocess.run(in_ns(ns, "ping", "-q", "-c", "100", "-i", "0.005", "-s", "1400",
                                    GUEST_IP), capture_output=True, text=True, timeout=30)
        for proc in (a, b):
            res = json.loads(proc.communicate(timeout=60)[0])
            assert res["got"] == list(range(1500))
        assert "100 received" in ping.stdout


def test_frame_too_big_for_mtu_is_not_echoed_but_nothing_breaks(guests, vmm_procs):
    """A 9000-byte datagram reaches the guest as IP fragments it does not reassemble."""
    with netns_with_tap() as (ns, tap):
        p = start(vmm_procs, ns, tap)
        assert stream(ns, 10, 0.01, 9000)["got"] == []
        assert stream(ns, 100, 0.001, 100)["got"] == list(range(100))
        assert p.proc.poll() is None


@pytest.mark.parametrize("bad", ["loop", "oob", "zero", "long"])
def test_bad_descriptor_chain_sets_needs_reset(guests, vmm_procs, bad):
    with netns_with_tap() as (ns, tap):
        p = vmm_procs(["run", "--kernel", str(ROOT / "guest/build/netecho.elf"),
                       "--net", f"tap,ifname={tap}", "--cmdline",
                       f"ip={GUEST_IP} stats=0 bad={bad}"], ns=ns)
        m = p.wait_for(rf"netecho: bad={bad} status=(0x[0-9a-f]+)")
        assert int(m.group(1), 16) & 0x40, "DEVICE_NEEDS_RESET not set"
        assert p.proc.poll() is None, "the VMM died on a guest's bad chain"


def test_tap_that_cannot_be_opened_is_one_clear_line(guests, vmm_procs):
    from conftest import run_pyvmm
    r = run_pyvmm("run", "--kernel", str(ROOT / "guest/build/netecho.elf"), "--net",
                  "tap,fd=999")
    assert r.returncode == 1
    assert r.stderr.startswith("pyvmm: error:") and r.stderr.count("\n") == 1
    assert "not a tap" in r.stderr or "fd 999" in r.stderr
