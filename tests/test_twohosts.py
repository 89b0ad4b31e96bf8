"""The two-host topology for live migration (bench/twohosts.py): the link between the
hosts, the guest's segment with the client, shaping the link, and the clean-up."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT, need_kvm
from bench import twohosts
from bench.twohosts import TwoHosts, list_namespaces, two_hosts

MAC = "52:54:00:12:34:56"     # netecho's default MAC


def ping(t: TwoHosts, ns: str, ip: str, count: int = 3) -> subprocess.CompletedProcess:
    return subprocess.run(t.run(ns, "ping", "-c", str(count), "-i", "0.05", "-W", "1", ip),
                          capture_output=True, text=True, timeout=30)


def test_hosts_talk_over_the_link_only_and_everything_goes_away():
    with two_hosts() as t:
        names = t.namespaces
        assert all(ns in list_namespaces() for ns in names)
        assert ping(t, t.host_a, t.link_ip(t.host_b)).returncode == 0
        assert ping(t, t.host_b, t.link_ip(t.host_a)).returncode == 0
        # the client is on the guest's segment only; the hosts have no address there
        assert ping(t, t.client, t.link_ip(t.host_a), 1).returncode != 0
        assert ping(t, t.host_a, t.client_ip, 1).returncode != 0
        for host in t.hosts:
            links = t.sh(host, "ip", "-br", "link").stdout
            assert "tap0" in links and "br0" in links
        sleeper = subprocess.Popen(t.run(t.host_b, "sleep", "600"))
    assert sleeper.wait(5) != 0                      # killed by the clean-up
    assert not set(names) & set(list_namespaces())


def test_cleanup_on_failure_inside_the_block():
    with pytest.raises(ZeroDivisionError):
        with two_hosts() as t:
            names = t.namespaces
            1 / 0
    assert not set(names) & set(list_namespaces())


def test_a_failed_up_leaves_nothing_behind():
    prefix = f"pyvmm-failup-{id(object())}"
    with pytest.raises(RuntimeError, match="rate 'fast'"):
        twohosts.up(prefix, rate="fast")
    assert not [ns for ns in list_namespaces() if ns.startswith(prefix)]


def test_rate_limit_shows_in_a_socket_copy():
    n = 24 << 20
    with two_hosts() as t:
        free = t.socket_copy(n)
        t.set_link(rate="100mbit")
        assert "rate 100Mbit" in t.link_shaping()
        shaped = t.socket_copy(n)
        t.set_link()
        assert t.link_shaping() == ""
    assert free["bytes"] == shaped["bytes"] == n
    assert 9.0 < shaped["MBps"] < 13.0, shaped           # 100 Mbit/s = 12.5 MB/s
    assert free["MBps"] > 3 * shaped["MBps"], (free, shaped)


def test_script_up_status_down():
    name = f"pyvmm-script-{id(object())}"
    run = [sys.executable, "-m", "bench.twohosts"]
    try:
        r = subprocess.run(run + ["up", "--name", name, "--rate", "1gbit"], capture_output=True,
                           text=True, cwd=ROOT, timeout=60)
        assert r.returncode == 0, r.stderr
        assert f"{name}-hostA:" in r.stdout and "192.168.77.1/24" in r.stdout
        assert "rate 1Gbit" in r.stdout
        again = subprocess.run(run + ["up", "--name", name], capture_output=True, text=True,
                               cwd=ROOT, timeout=60)
        assert again.returncode == 1 and "exists already" in again.stderr
        assert subprocess.run(run + ["status", "--name", name], capture_output=True,
                              cwd=ROOT).returncode == 0
    finally:
        r = subprocess.run(run + ["down", "--name", name], capture_output=True, text=True,
                           cwd=ROOT, timeout=60)
    assert r.returncode == 0 and f"removed {name}-hostA" in r.stdout
    assert not [ns for ns in list_namespaces() if ns.startswith(name)]
    st = subprocess.run(run + ["status", "--name", name], capture_output=True, text=True,
                        cwd=ROOT)
    assert st.returncode == 1 and "missing" in st.stdout


def test_client_reaches_the_guest_on_either_host(guests, vmm_procs):
    """netecho runs in hostA, then (stopped there) in hostB: the client at 10.0.0.1 pings
    10.0.0.2 both times, and the switch learns the guest's new port from its first frame
    (here its ARP reply; after a migration, the announce)."""
    need_kvm()
    with two_hosts() as t:
        for host in t.hosts:
            p = vmm_procs(["run", "--kernel", str(guests / "netecho.elf"),
                           "--net", f"tap,ifname={t.tap}",
                           "--cmdline", f"ip={t.guest_ip} stats=0"], ns=host)
            p.wait_for(r"netecho: up")
            t.sh(t.client, "ip", "neigh", "flush", "all")
            r = ping(t, t.client, t.guest_ip, 5)
            assert "5 received" in r.stdout, r.stdout + p.stderr
            assert t.port_of(MAC) == host
            p.stop()
