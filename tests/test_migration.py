"""Live migration over TCP end to end (vmm/migration/, docs/MIGRATION.md): real guests on
real KVM, the source in hostA and the destination in hostB of the two-host topology
(bench/twohosts.py), QMP through qemu.qmp as an independent client.

The pattern guest is checked page by page after the move, at rest and while it
dirties; netecho answers a numbered UDP stream through the move (with packets
received during precopy: the data path's own dirty log); every failure before the
destination runs the guest resumes it on the source.
"""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import time

import pytest

from conftest import ROOT, VmmProcess, need_kvm, run_pyvmm
from bench.twohosts import two_hosts
from test_cpr import (QmpFailed, assert_ticks_continuous, check_pattern, close, qmp, qmp_connect,
                      ram_of, ticks, wait_migration)
from test_qemu_recipes import wait_file
from vmm.migration.stream import VERSION as STREAM_VERSION
from vmm.state import dumps as state_blob

MAC = "52:54:00:12:34:56"     # the first NIC's default MAC
PATTERN = str(ROOT / "guest/build/pattern.elf")
NETECHO = str(ROOT / "guest/build/netecho.elf")
TICKER = str(ROOT / "guest/build/ticker.elf")
# a dead or silent peer is noticed within this (s); the destination waits 3x as long
ENV = dict(os.environ, PYVMM_MIGRATION_TIMEOUT="3")


@pytest.fixture(scope="module")
def hosts():
    need_kvm()
    with two_hosts() as t:
        yield t


@pytest.fixture
def procs(guests):
    started: list[VmmProcess] = []

    def start(host, args):
        p = VmmProcess(list(args), ns=host, env=ENV)
        started.append(p)
        return p
    yield start
    for p in started:
        p.stop()


def start_source(procs, hosts, tmp_path, kernel, cmdline="", net=False):
    if net:   # every bridge forgets where an earlier test's guest went
        for ns, port in [(hosts.client, hosts.switch_port(h)) for h in hosts.hosts] + \
                [(h, dev) for h in hosts.hosts for dev in ("uplink", hosts.tap)]:
            hosts.sh(ns, "bridge", "fdb", "del", MAC, "dev", port, "master", check=False)
    qmp_path = tmp_path / "src.qmp"
    args = ["run", "--kernel", kernel, "--memory", "128M", "--cmdline", cmdline,
            "--qmp", str(qmp_path)] + (["--net", f"tap,ifname={hosts.tap}"] if net else [])
    return procs(hosts.host_a, args), qmp_path


def start_destination(procs, hosts, tmp_path, net=False, defer=False, console=None, extra=()):
    """A pyvmm in hostB waiting on a free port of the link; (process, QMP path, tcp URI)."""
    qmp_path = tmp_path / "dst.qmp"
    host = hosts.link_ip(hosts.host_b)
    incoming = "defer" if defer else f"tcp:{host}:0"
    p = procs(hosts.host_b, ["run", "--incoming", incoming, "--qmp", str(qmp_path)] +
              (["--net", f"tap,ifname={hosts.tap}"] if net else []) +
              (["--console", str(console)] if console else []) + list(extra))
    q = qmp_connect(qmp_path)
    try:
        if defer:
            addr = {"transport": "socket", "type": "inet", "host": host, "port": "0"}
            qmp(q, "migrate-incoming", channels=[{"channel-type": "main", "addr": addr}])
        info = qmp(q, "query-migrate")
    finally:
        close(q)
    assert info["status"] == "setup", info
    port = info["socket-address"][0]["port"]
    return p, qmp_path, f"tcp:{host}:{port}"


def migrate(qmp_path, uri, *, events=True, wait=True, channels=False, **params):
    """migrate over qemu.qmp (uri form, or channels: one main tcp channel); the settled
    query-migrate and the events seen."""
    q = qmp_connect(qmp_path)
    try:
        if events:
            qmp(q, "migrate-set-capabilities",
                capabilities=[{"capability": "events", "state": True}])
        if params:
            qmp(q, "migrate-set-parameters", **params)
        if channels:
            _, host, port = uri.split(":")
            addr = {"transport": "socket", "type": "inet", "host": host, "port": port}
            qmp(q, "migrate", channels=[{"channel-type": "main", "addr": addr}])
        else:
            qmp(q, "migrate", uri=uri)
        if not wait:
            return None, []
        info = wait_migration(q, 60)
        time.sleep(0.1)
        return info, q.get_events()
    finally:
        close(q)


def status(qmp_path) -> str:
    q = qmp_connect(qmp_path)
    try:
        return qmp(q, "query-status")["status"]
    finally:
        close(q)


def wait_status(qmp_path, want, timeout=20.0) -> dict:
    q = qmp_connect(qmp_path)
    try:
        deadline = time.monotonic() + timeout
        while True:
            info = qmp(q, "query-migrate")
            if info.get("status") in want or time.monotonic() > deadline:
                return info
            time.sleep(0.02)
    finally:
        close(q)


def pattern_passes(p) -> int:
    return int(p.wait_for(r"^pass (\d+)$").group(1))


def assert_figures_sane(info, events):
    ram = info["ram"]
    assert info["status"] == "completed"
    assert ram["total"] == 128 << 20 and ram["remaining"] == 0 and ram["page-size"] == 4096
    # pass 1 covers every page (holes counted as zero pages); later passes resend some
    assert ram["duplicate"] + ram["normal"] >= ram["total"] // 4096
    assert ram["normal-bytes"] == ram["normal"] * 4096
    assert ram["transferred"] >= ram["normal-bytes"] + 8 * ram["normal"]   # (entries)
    assert ram["transferred"] == ram["precopy-bytes"] + ram["downtime-bytes"]
    assert ram["dirty-sync-count"] >= 2 and ram["mbps"] > 0
    assert 0 <= info["setup-time"] <= info["total-time"]
    assert 0 <= info["downtime"] <= info["total-time"]
    statuses = [e["data"]["status"] for e in events if e["event"] == "MIGRATION"]
    assert statuses == ["setup", "active", "device", "completed"], statuses
    passes = [e["data"]["pass"] for e in events if e["event"] == "MIGRATION_PASS"]
    assert passes == list(range(1, ram["dirty-sync-count"] + 1)), passes
    assert [e["event"] for e in events].count("STOP") <= 1


def assert_source_postmigrate(src, qmp_path):
    """After completion the source stays, paused in postmigrate, until quit."""
    q = qmp_connect(qmp_path)
    try:
        assert qmp(q, "query-status") == {"status": "postmigrate", "running": False}
        with pytest.raises(QmpFailed, match="postmigrate"):
            qmp(q, "cont")
        qmp(q, "quit")
    finally:
        close(q)
    assert src.wait(15) == 0


# -- every page -------------------------------------------------------------------------------
# (pattern guest's command line, source's max-bandwidth and downtime-limit, the fewest
# passes expected.  8 MB/s of 8 MiB over 16 MiB/s: pass 1 (~8.5 MiB, ~0.55 s) leaves
# ~4 MiB dirty (~250 ms to send), pass 2 ~2 MiB, pass 3 ~1 (~60 ms), pass 4 ~0.5, which
# fits in 50 ms: 4 nominal, 3 asked.  At 4 MB/s a guest held back for a third of pass 1
# by a busy host left under 0.8 MiB and the source rightly stopped after 1 pass.)
RATES = {"full-speed": ("pattern_mb=48", 0, 300, 2),
         "paced-8MBps": ("pattern_mb=8 dirty_mbps=8", 16 << 20, 50, 3),
         "paused": ("pattern_mb=48", 0, 300, 2)}


@pytest.mark.parametrize("rate", list(RATES))
def test_every_page_arrives(procs, hosts, tmp_path, rate):
    """Pages dirtied as fast as the guest can, at 8 MB/s (several passes over a 16 MiB/s
    link), or not at all (paused): every page holds what the guest wrote."""
    cmdline, bandwidth, limit, passes = RATES[rate]
    paused = rate == "paused"
    src, src_qmp = start_source(procs, hosts, tmp_path, PATTERN, cmdline)
    progress = int(src.wait_for(r"pattern: progress=(0x[0-9a-f]+)").group(1), 16)
    src.wait_for(r"^pass 2$")
    if paused:
        q = qmp_connect(src_qmp)
        qmp(q, "stop")
        close(q)
    dst, dst_qmp, uri = start_destination(procs, hosts, tmp_path)
    info, events = migrate(src_qmp, uri, channels=paused, **{"max-bandwidth": bandwidth,
                                                             "downtime-limit": limit})
    assert_figures_sane(info, events)
    assert info["ram"]["dirty-sync-count"] >= passes, info
    if paused:   # a paused guest moves paused: the destination leaves it so, nothing stopped
        assert "STOP" not in [e["event"] for e in events]
        assert status(dst_qmp) == "paused"
    q = qmp_connect(dst_qmp)
    try:
        qmp(q, "stop")
        k, npages = check_pattern(ram_of(dst.proc.pid), progress)
        assert npages >= (2000 if "mb=8" in cmdline else 11000)
        qmp(q, "cont")
        assert qmp(q, "query-migrate")["status"] == "completed"
    finally:
        close(q)
    dst.wait_for(rf"^pass {k + 1}$")          # it goes on counting on hostB
    assert_source_postmigrate(src, src_qmp)


def test_a_guest_on_huge_pages_moves_whole(procs, hosts, tmp_path, huge_pages):
    """`--hugetlb` on both hosts, the destination without --mem-prealloc (its pages come
    straight into the huge-page mapping): every page the pattern guest wrote arrives,
    and it goes on counting on hostB."""
    huge_pages(2 * 128 // 2)   # both guests' 128 MiB in 2 MiB pages
    qmp_path = tmp_path / "src.qmp"
    src = procs(hosts.host_a, ["run", "--kernel", PATTERN, "--memory", "128M", "--hugetlb",
                               "--cmdline", "pattern_mb=16", "--qmp", str(qmp_path)])
    progress = int(src.wait_for(r"pattern: progress=(0x[0-9a-f]+)").group(1), 16)
    src.wait_for(r"^pass 2$")
    dst, dst_qmp, uri = start_destination(procs, hosts, tmp_path,
                                          extra=["--hugetlb", "--memory", "128M"])
    info, events = migrate(qmp_path, uri)
    assert info["status"] == "completed", info
    q = qmp_connect(dst_qmp)
    try:
        qmp(q, "stop")
        k, npages = check_pattern(ram_of(dst.proc.pid), progress)
        assert npages >= 4000
        qmp(q, "cont")
    finally:
        close(q)
    dst.wait_for(rf"^pass {k + 1}$")
    assert_source_postmigrate(src, qmp_path)


def test_progress_during_pass_1_and_the_destination_events(procs, hosts, tmp_path):
    """query-migrate's `remaining` counts down through pass 1 (as QEMU's: the RAM bytes
    still to send), and a client of the destination sees QEMU's events there: the
    incoming migration's statuses, then RESUME as the guest starts, then completed."""
    src, src_qmp = start_source(procs, hosts, tmp_path, PATTERN, "pattern_mb=16")
    src.wait_for(r"^pass 2$")
    dst, dst_qmp, uri = start_destination(procs, hosts, tmp_path)
    watch = qmp_connect(dst_qmp)
    try:
        q = qmp_connect(src_qmp)
        try:   # 16 MiB/s: pass 1 (~17 MiB the guest touched) takes about a second
            qmp(q, "migrate-set-parameters", **{"max-bandwidth": 16 << 20})
            qmp(q, "migrate", uri=uri)
            during = []
            while True:
                info = qmp(q, "query-migrate")
                if info["status"] in ("completed", "failed", "cancelled"):
                    break
                if info["status"] == "active" and info["ram"]["dirty-sync-count"] == 1:
                    during.append(info["ram"]["remaining"])
                time.sleep(0.05)
        finally:
            close(q)
        assert info["status"] == "completed", info
        # the source completes on the destination's RUNS: the guest runs there, and says so
        assert qmp(watch, "query-status")["status"] == "running"
        assert info["ram"]["remaining"] == 0
        time.sleep(0.2)
        events = [e["event"] if e["event"] != "MIGRATION" else e["data"]["status"]
                  for e in watch.get_events()]
    finally:
        close(watch)
    assert len(during) >= 3, during
    assert all(0 < r <= 128 << 20 for r in during[:-1]), during
    assert during == sorted(during, reverse=True) and during[0] > during[-1], during
    assert events == ["active", "RESUME", "completed"], events


# -- the network --------------------------------------------------------------------------------
def udp_stream(hosts, count, interval):
    return subprocess.Popen(hosts.run(hosts.client, sys.executable, "-m", "bench.traffic",
                                      hosts.guest_ip, str(count), str(interval)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def test_udp_stream_goes_through_with_rx_during_precopy(procs, hosts, tmp_path):
    src, src_qmp = start_source(procs, hosts, tmp_path, NETECHO, f"ip={hosts.guest_ip}",
                                net=True)
    src.wait_for(r"netecho: up ip=")
    dst, dst_qmp, uri = start_destination(procs, hosts, tmp_path, net=True, defer=True)
    interval = 0.002
    stream = udp_stream(hosts, 4000, interval)            # 8 s of numbered datagrams
    time.sleep(1.0)
    # 384 KiB/s: pass 1 (the guest's ~600 KiB of populated pages) takes over a second,
    # while the stream goes on landing in RX buffers the source's data path writes (all
    # of them again in every pass: 3 s allowed for the rest, sent at full speed once stopped)
    t0 = time.monotonic()
    info, events = migrate(src_qmp, uri, **{"max-bandwidth": 384 << 10, "downtime-limit": 3000})
    precopy_s = time.monotonic() - t0
    print(f"precopy {precopy_s:.2f} s", info)
    out, err = stream.communicate(timeout=30)
    assert out, err
    out = json.loads(out)
    assert info["status"] == "completed", info
    assert precopy_s > 1.2, precopy_s
    assert info["ram"]["downtime-bytes"] > 50 * 4096, info   # the RX buffers, dirty again
    got = out["got"]
    assert len(set(got)) == len(got), "duplicates"
    assert got == sorted(got), "reordered"
    lost = sorted(set(range(out["sent"])) - set(got))
    # loss only inside the downtime window: one run of consecutive numbers, no longer than
    # the guest was stopped (plus the switch learning the new port from announce-self,
    # 50 ms after the resume, and a loaded host's scheduling)
    if lost:
        assert lost == list(range(lost[0], lost[-1] + 1)), lost
    assert len(lost) * interval * 1000 <= info["downtime"] + 300, (len(lost), info)
    assert len(got) > 3500
    # the guest answers from hostB, and the switch learned so from the announcement
    assert hosts.port_of(MAC) == hosts.host_b
    ping = subprocess.run(hosts.run(hosts.client, "ping", "-c", "3", "-i", "0.1", "-W", "1",
                                    hosts.guest_ip), capture_output=True, text=True, timeout=30)
    assert ping.returncode == 0, ping.stdout
    q = qmp_connect(dst_qmp)
    try:
        nets = qmp(q, "x-query-state")["devices"]
    finally:
        close(q)
    assert any(d.get("stats", {}).get("rx_packets", 0) > 100 for d in nets), nets[-1]
    assert_source_postmigrate(src, src_qmp)


def test_ping_flood_goes_through(procs, hosts, tmp_path):
    """A ping every 2 ms from the client while the guest moves: no reply twice, none out of
    order, and no more lost than fit into the downtime the source reports."""
    src, src_qmp = start_source(procs, hosts, tmp_path, NETECHO, f"ip={hosts.guest_ip}",
                                net=True)
    src.wait_for(r"netecho: up ip=")
    dst, dst_qmp, uri = start_destination(procs, hosts, tmp_path, net=True)
    interval, count = 0.002, 1500                        # 3 s of echo requests
    ping = subprocess.Popen(hosts.run(hosts.client, "ping", "-n", "-i", str(interval),
                                      "-c", str(count), "-W", "1", hosts.guest_ip),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    info, _ = migrate(src_qmp, uri)
    assert ping.poll() is None, "the ping ended before the migration did"
    out, err = ping.communicate(timeout=30)
    assert info["status"] == "completed", info
    assert "DUP!" not in out, out
    seqs = [int(m) for m in re.findall(r"icmp_seq=(\d+)", out)]
    assert seqs == sorted(set(seqs)), "replies reordered"
    lost = sorted(set(range(1, count + 1)) - set(seqs))
    print(f"downtime {info['downtime']} ms, lost {len(lost)} of {count}: {lost[:3]}...")
    # the lost ones are one run, no longer than the guest was stopped, plus a margin of
    # 150 ms: the switch learns the new port from announce-self's first RARP, 50 ms after
    # the resume, and a loaded 2-core host delays the VMMs' threads
    if lost:
        assert lost == list(range(lost[0], lost[-1] + 1)), lost
    assert len(lost) * interval * 1000 <= info["downtime"] + 150, (len(lost), info)
    assert len(seqs) > count // 2, out[-2000:]
    assert hosts.port_of(MAC) == hosts.host_b
    assert_source_postmigrate(src, src_qmp)


# The guest's own gratuitous ARP (an ARP request for its address, from its address) seen on a
# port: the sender's MAC, or nothing within the time given.  Run in the client's namespace.
GARP_CAPTURE = """
import socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))   # ETH_P_ALL: a bridge
# port's frames reach only the taps that see all protocols (the bridge takes them before)
s.bind((sys.argv[1], 0))
ip = socket.inet_aton(sys.argv[2])
print("listening", flush=True)
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    s.settimeout(max(0.01, end - time.monotonic()))
    try:
        f = s.recv(2048)
    except socket.timeout:
        break
    if len(f) >= 42 and f[12:14] == b"\\x08\\x06" and f[20:22] == b"\\x00\\x01" and \\
            f[28:32] == ip and f[38:42] == ip:
        print(f[22:28].hex(":"), flush=True)
        break
"""


def test_guest_announces_itself_after_the_move(procs, hosts, tmp_path):
    """VIRTIO_NET_F_GUEST_ANNOUNCE: netecho (announce=1) negotiates it; after the resume
    the destination sets VIRTIO_NET_S_ANNOUNCE and interrupts, the guest sends its own
    gratuitous ARP (seen on hostB's switch port, from the guest's MAC) and acks on the
    control queue, and the destination's status bit is clear afterwards."""
    src, src_qmp = start_source(procs, hosts, tmp_path, NETECHO,
                                f"ip={hosts.guest_ip} announce=1", net=True)
    src.wait_for(r"netecho: up ip=")
    assert src.wait_for(r"netecho: ctrl class 0 cmd 0 -> ack=(\S+)").group(1) == "1"  # ERR
    dst, dst_qmp, uri = start_destination(procs, hosts, tmp_path, net=True)
    capture = subprocess.Popen(hosts.run(hosts.client, sys.executable, "-c", GARP_CAPTURE,
                                         hosts.switch_port(hosts.host_b), hosts.guest_ip, "20"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert capture.stdout.readline() == "listening\n", capture.stderr.read()
    info, _ = migrate(src_qmp, uri)
    assert info["status"] == "completed", info
    dst.wait_for(r"netecho: announced \(gratuitous ARP\), acked", timeout=20)
    seen, err = capture.communicate(timeout=30)
    assert seen.split() == [MAC], (seen, err)
    assert hosts.port_of(MAC) == hosts.host_b
    q = qmp_connect(dst_qmp)
    try:
        net = next(d for d in qmp(q, "x-query-state")["devices"] if d["name"] == "net0")
    finally:
        close(q)
    assert int(net["features"], 16) & (1 << 17 | 1 << 21) == 1 << 17 | 1 << 21, net
    assert net["announce"] is False, net
    assert len(net["queues"]) == 3 and net["queues"][2]["last_avail_idx"] == 2, net
    assert_source_postmigrate(src, src_qmp)


# -- failures before the destination runs the guest: the source goes on --------------------------
def assert_source_runs(src, qmp_path):
    assert status(qmp_path) == "running"
    k = pattern_passes_after(src)
    src.wait_for(rf"^pass {k + 1}$")


def pattern_passes_after(p) -> int:
    return max(int(x) for x in re.findall(r"(?m)^pass (\d+)$", p.text()))


def assert_destination_gone(dst, dst_qmp, says):
    assert dst.wait(20) == 1
    lines = [line for line in dst.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and re.search(says, lines[0]), dst.stderr
    assert "Traceback" not in dst.stderr
    assert not dst_qmp.exists()


def in_precopy(procs, hosts, tmp_path, rate):
    """The pattern guest (48 MiB) on its way to hostB at `rate` bytes/s, 0.3 s into pass 1:
    (source, its QMP path, destination, its QMP path)."""
    src, src_qmp = start_source(procs, hosts, tmp_path, PATTERN, "pattern_mb=48")
    src.wait_for(r"^pass 2$")
    dst, dst_qmp, uri = start_destination(procs, hosts, tmp_path)
    migrate(src_qmp, uri, wait=False, **{"max-bandwidth": rate})
    assert wait_status(src_qmp, ("active",))["status"] == "active"
    time.sleep(0.3)
    return src, src_qmp, dst, dst_qmp


def test_cancel_mid_precopy_resumes_the_source(procs, hosts, tmp_path):
    src, src_qmp, dst, dst_qmp = in_precopy(procs, hosts, tmp_path, 4 << 20)  # pass 1: ~12 s
    q = qmp_connect(src_qmp)
    try:
        assert qmp(q, "query-status")["status"] == "running"   # the guest runs meanwhile
        mid = qmp(q, "query-migrate")
        assert 0 < mid["ram"]["transferred"] < 48 << 20
        assert "expected-downtime" not in mid or mid["expected-downtime"] >= 0
        qmp(q, "migrate_cancel")
        info = wait_migration(q, 20)
    finally:
        close(q)
    assert info["status"] == "cancelled", info
    assert_source_runs(src, src_qmp)
    assert_destination_gone(dst, dst_qmp, "truncated")
    # nothing left behind on hostB: a new destination takes the same place, and the guest
    # moves there after all
    dst2, dst2_qmp, uri2 = start_destination(procs, hosts, tmp_path)
    info, events = migrate(src_qmp, uri2, **{"max-bandwidth": 0})
    assert info["status"] == "completed", info
    pattern_passes(dst2)


def test_cancel_in_a_full_speed_pass_is_seen_at_once(procs, hosts, tmp_path):
    """Without max-bandwidth a pass runs in C (pyvmm_mig_send), Python looking in every
    16 MiB; on a 24 Mbit/s link the C call waits on a full socket for seconds at a time,
    and migrate_cancel still ends it at once (shutting the socket down wakes it)."""
    hosts.set_link(rate="24mbit")
    try:
        src, src_qmp, dst, dst_qmp = in_precopy(procs, hosts, tmp_path, 0)
        q = qmp_connect(src_qmp)
        try:
            mid = qmp(q, "query-migrate")
            assert mid["status"] == "active" and mid["ram"]["dirty-sync-count"] == 1, mid
            t0 = time.monotonic()
            qmp(q, "migrate_cancel")
            info = wait_migration(q, 20)
            took = time.monotonic() - t0
        finally:
            close(q)
    finally:
        hosts.set_link()
    assert info["status"] == "cancelled" and took < 1.0, (info, took)
    assert_source_runs(src, src_qmp)


def test_destination_killed_mid_stream_resumes_the_source(procs, hosts, tmp_path):
    src, src_qmp, dst, dst_qmp = in_precopy(procs, hosts, tmp_path, 4 << 20)
    dst.proc.kill()
    info = wait_status(src_qmp, ("failed", "completed", "cancelled"))
    assert info["status"] == "failed", info
    assert "destination" in info["error-desc"] or "connection" in info["error-desc"], info
    assert_source_runs(src, src_qmp)


def test_link_cut_mid_stream_resumes_the_source(procs, hosts, tmp_path):
    """`ip link set down` on the migration link: the source's sends stall, and after
    PYVMM_MIGRATION_TIMEOUT (3 s here) it gives up and the guest goes on."""
    src, src_qmp, dst, dst_qmp = in_precopy(procs, hosts, tmp_path, 16 << 20)
    hosts.sh(hosts.host_a, "ip", "link", "set", "mig0", "down")
    try:
        info = wait_status(src_qmp, ("failed", "completed", "cancelled"), timeout=30)
        assert info["status"] == "failed", info
        assert "took no data" in info["error-desc"], info
        assert_source_runs(src, src_qmp)
    finally:
        hosts.sh(hosts.host_a, "ip", "link", "set", "mig0", "up")
    # (the link is back before its own 9 s: it sees the source hang up)
    assert_destination_gone(dst, dst_qmp, "truncated|stalled")


# A relay on hostB between the source and the destination that flips one byte of the
# stream (at offset FLIP), both directions relayed; it prints its port, then serves once.
FLIPPER = r"""
import socket, sys, threading
FLIP, host, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
lsock = socket.create_server((host, 0))
print(lsock.getsockname()[1], flush=True)
a, _ = lsock.accept()
b = socket.create_connection((host, port))
def back():
    while (data := b.recv(65536)):
        a.sendall(data)
    a.shutdown(socket.SHUT_WR)
threading.Thread(target=back, daemon=True).start()
seen = 0
while (data := bytearray(a.recv(65536))):
    if seen <= FLIP < seen + len(data):
        data[FLIP - seen] ^= 0x40
    seen += len(data)
    b.sendall(data)
b.shutdown(socket.SHUT_WR)
"""


def test_corrupted_stream_resumes_the_source(procs, hosts, tmp_path):
    """One bit flipped on the way, in pass 1: the destination's CRC check refuses the
    section, says why, and the source resumes its guest with that reason."""
    src, src_qmp = start_source(procs, hosts, tmp_path, PATTERN, "pattern_mb=48")
    src.wait_for(r"^pass 2$")
    dst, dst_qmp, uri = start_destination(procs, hosts, tmp_path)
    _, host, port = uri.split(":")
    relay = subprocess.Popen(hosts.run(hosts.host_b, sys.executable, "-c", FLIPPER,
                                       str(3 << 20), host, port),
                             stdout=subprocess.PIPE, text=True)
    try:
        via = f"tcp:{host}:{relay.stdout.readline().strip()}"
        info, events = migrate(src_qmp, via)
        assert info["status"] == "failed", info
        assert "CRC-32C does not match" in info["error-desc"], info
        assert_source_runs(src, src_qmp)
        assert_destination_gone(dst, dst_qmp, "CRC-32C does not match")
    finally:
        relay.kill()
        relay.wait()


def test_destination_refusing_resumes_the_source(procs, hosts, tmp_path):
    """The destination cannot take the guest (here: it has no tap for the guest's NIC)
    and says why; the source rolls back, and the guest runs on."""
    src, src_qmp = start_source(procs, hosts, tmp_path, NETECHO, f"ip={hosts.guest_ip}",
                                net=True)
    src.wait_for(r"netecho: up ip=")
    dst, dst_qmp, uri = start_destination(procs, hosts, tmp_path, net=False)
    info, events = migrate(src_qmp, uri)
    assert info["status"] == "failed", info
    assert "--net" in info["error-desc"], info
    assert status(src_qmp) == "running"
    assert_destination_gone(dst, dst_qmp, "NIC")
    ping = subprocess.run(hosts.run(hosts.client, "ping", "-c", "2", "-i", "0.1", "-W", "1",
                                    hosts.guest_ip), capture_output=True, text=True, timeout=30)
    assert ping.returncode == 0, ping.stdout


def ram_allocated(pid: int) -> int:
    """Bytes the process's guest-RAM memfd has allocated (its st_blocks)."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        if "pyvmm-ram" in os.readlink(f"/proc/{pid}/fd/{fd}"):
            return os.stat(f"/proc/{pid}/fd/{fd}").st_blocks * 512
    raise AssertionError(f"pid {pid} holds no guest RAM")


def test_a_destination_given_the_size_allocates_ram_before_the_source_comes(procs, hosts,
                                                                            tmp_path):
    """`-m 128M --mem-prealloc` on the destination (QEMU's -mem-prealloc): its RAM is all
    allocated while it waits (so pass 1 does not pay for fresh pages), and the guest
    arrives in it whole."""
    src, src_qmp = start_source(procs, hosts, tmp_path, PATTERN, "pattern_mb=8")
    progress = int(src.wait_for(r"pattern: progress=(0x[0-9a-f]+)").group(1), 16)
    src.wait_for(r"^pass 2$")
    dst, dst_qmp, uri = start_destination(procs, hosts, tmp_path,
                                          extra=["-m", "128M", "--mem-prealloc"])
    assert ram_allocated(dst.proc.pid) == 128 << 20
    info, events = migrate(src_qmp, uri)
    assert_figures_sane(info, events)
    q = qmp_connect(dst_qmp)
    try:
        qmp(q, "stop")
        k, _ = check_pattern(ram_of(dst.proc.pid), progress)
        qmp(q, "cont")
    finally:
        close(q)
    dst.wait_for(rf"^pass {k + 1}$")
    assert_source_postmigrate(src, src_qmp)


def test_a_destination_of_another_ram_size_is_refused_and_the_source_runs_on(procs, hosts,
                                                                            tmp_path):
    src, src_qmp = start_source(procs, hosts, tmp_path, PATTERN, "pattern_mb=8")
    src.wait_for(r"^pass 2$")
    dst, dst_qmp, uri = start_destination(procs, hosts, tmp_path, extra=["-m", "64M"])
    info, _ = migrate(src_qmp, uri)
    assert info["status"] == "failed", info
    assert "128 MiB of RAM" in info["error-desc"] and "64 MiB" in info["error-desc"], info
    assert_source_runs(src, src_qmp)
    assert_destination_gone(dst, dst_qmp, "give the destination the guest's -m")


@pytest.mark.parametrize("args, says", [
    (["--incoming", "tcp:127.0.0.1:0", "--mem-prealloc"], "needs the guest's RAM size"),
    (["--incoming", "tcp:127.0.0.1:0", "--hugetlb"], "--hugetlb with --incoming tcp needs"),
    (["--incoming", "cpr-transfer:/tmp/x.sock", "-m", "1G"], "--memory cannot be given"),
    (["--incoming", "cpr-transfer:/tmp/x.sock", "--mem-prealloc"], "--mem-prealloc cannot"),
])
def test_ram_options_an_incoming_cannot_use_are_one_line_errors(args, says):
    r = run_pyvmm("run", *args, timeout=20)
    assert r.returncode != 0 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, \
        r.stderr


def test_ctrl_c_while_the_destination_preallocates_stops_it_at_once(tmp_path):
    """Allocating 8 GiB takes seconds here (docs/MIGRATION.md, "Fresh pages"): Ctrl-C
    stops it within a chunk, exits 130 and leaves no QMP socket behind."""
    need_kvm()
    qmp_path = tmp_path / "dst.qmp"
    p = VmmProcess(["run", "--incoming", "tcp:127.0.0.1:0", "-m", "8G", "--mem-prealloc",
                    "--qmp", str(qmp_path)])
    try:
        deadline = time.monotonic() + 20
        while True:   # until its RAM is being allocated
            assert p.proc.poll() is None and time.monotonic() < deadline, p.stderr
            try:
                if ram_allocated(p.proc.pid) >= 64 << 20:
                    break
            except (AssertionError, OSError):   # (no RAM yet)
                pass
            time.sleep(0.01)
        t = time.monotonic()
        p.proc.send_signal(signal.SIGINT)
        assert not qmp_path.exists()   # (it listens only once RAM is all there)
        assert p.wait(10) == 130, p.stderr
        assert time.monotonic() - t < 2.0
        assert not qmp_path.exists() and "Traceback" not in p.stderr, p.stderr
    finally:
        p.stop()


def crc32c(data: bytes) -> int:
    """CRC-32C, bit by bit: the reference the stream's C/SSE4.2 one is checked against."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def test_the_stream_checksum_is_crc32c():
    from vmm.migration.stream import crc32c as fast
    assert crc32c(b"123456789") == fast(b"123456789") == 0xE3069283   # the check value
    data = os.urandom(4099)
    assert fast(data) == crc32c(data) and fast(memoryview(data)[3:]) == crc32c(data[3:])
    assert fast(b"") == 0


def _pass_stream(src) -> tuple[bytes, bytes, object, list]:
    """Pass 1 of `src` as pyvmm_mig_send puts it on a socket: the bytes, the page
    bitmap (HELO's "populated"), the PageSet and what its send() returned."""
    import socket
    import threading
    from vmm.kvm.ffi import ffi, lib
    from vmm.migration.pages import BATCH_PAGES, PageSet
    pages = PageSet(src)
    pages.add_populated()
    bitmap = pages.bitmap()
    a, b = socket.socketpair()
    wire = bytearray()
    status = []

    def send():
        buf = ffi.new("uint8_t[]", lib.PYVMM_MIG_BUF)
        status.append(pages.send(a.fileno(), buf, BATCH_PAGES, 1 << 62, 5000))
        a.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    while chunk := b.recv(1 << 20):
        wire += chunk
    sender.join()
    a.close()
    b.close()
    return bytes(wire), bitmap, pages, status


def _take(applier, stream: bytes) -> None:
    """Feed `stream` on a socket to applier.receive (pyvmm_mig_recv) until it ends
    cleanly between two sections; its StreamError or VmmError otherwise."""
    import socket
    import threading
    from vmm.migration.stream import StreamError
    c, d = socket.socketpair()
    d.settimeout(5)   # (non-blocking underneath, as the destination's socket)

    def feed():
        try:
            c.sendall(stream)
        except OSError:   # (the reader refused the stream and hung up)
            pass
        c.close()

    threading.Thread(target=feed).start()
    try:
        while True:
            try:
                assert applier.receive(d, 1 << 62, 5000) is None
            except StreamError as e:
                if "truncated" in str(e) and "section header" in str(e):
                    return
                raise
    finally:
        d.close()


@pytest.mark.parametrize("prealloc", [False, True], ids=["pwritev", "into-ram"])
def test_a_pass_sent_in_c_arrives_whole_and_a_flipped_byte_is_refused(prealloc):
    """pyvmm_mig_send (many PAGE sections in one C call, no Python between them) over a
    socket pair, taken by pyvmm_mig_recv into fresh RAM (through pwritev, or straight
    from the socket into preallocated RAM): the same RAM, holes left holes, the
    destination's allocation done beforehand from the source's bitmap; then the same
    stream with one byte of page data flipped, a page number past RAM or named twice,
    or cut short, is refused with its reason, and nothing lands outside RAM."""
    from vmm.kvm.ffi import lib
    from vmm.memory import GuestMemory
    from vmm.migration.pages import Applier
    from vmm.migration.stream import SECTION, StreamError
    assert SECTION.size == lib.PYVMM_MIG_HEAD   # (one frame, two languages)
    size = 8 << 20
    src = GuestMemory(size)
    data = os.urandom(3 << 20)
    os.pwrite(src.fd, data, 1 << 20)             # pages 256..1023 hold data,
    os.pwrite(src.fd, bytes(4096), 6 << 20)      # page 1536 is written but zero
    wire, bitmap, pages, status = _pass_stream(src)
    assert status == [(0, len(wire))] and pages.count() == 0
    assert pages.counts.normal_pages == 768 and pages.counts.zero_pages == 2048 - 768

    def replay(stream: bytes) -> GuestMemory:
        dst = GuestMemory(size)
        if prealloc:
            dst.prealloc()
        applier = Applier(dst)
        applier.prealloc(bitmap)
        try:
            _take(applier, stream)
        except BaseException:
            dst.close()
            raise
        return dst

    dst = replay(wire)
    assert os.pread(dst.fd, size, 0) == os.pread(src.fd, size, 0)
    if not prealloc:
        assert os.lseek(dst.fd, 0, os.SEEK_DATA) == 1 << 20   # the holes stay holes
    assert os.fstat(dst.fd).st_size == size
    dst.close()
    flipped = bytearray(wire)
    flipped[len(wire) // 2] ^= 1
    with pytest.raises(StreamError, match="PAGE section's CRC-32C does not match"):
        replay(bytes(flipped))
    far = bytearray(wire)   # the first section's first entry names a page past RAM
    far[16 + 8:16 + 16] = ((size // 4096 + 5) << 12).to_bytes(8, "little")
    with pytest.raises(StreamError, match="names a page outside guest RAM"):
        replay(bytes(far))
    twice = bytearray(wire)   # its second entry names the first's page again
    twice[16 + 16:16 + 24] = twice[16 + 8:16 + 16]
    with pytest.raises(StreamError, match="out of order"):
        replay(bytes(twice))
    with pytest.raises(StreamError, match="truncated.*in a PAGE section"):
        replay(wire[:len(wire) - 100])
    src.close()


@pytest.fixture
def huge_pages():
    """Reserve 2 MiB huge pages for the test (root), as many as it asks; then give them back."""
    path = "/proc/sys/vm/nr_hugepages"
    with open(path) as f:
        before = int(f.read())

    def reserve(n: int) -> None:
        with open(path, "w") as f:
            f.write(str(before + n))
        with open(path) as f:
            if int(f.read()) < before + n:
                pytest.skip(f"this host cannot reserve {n} huge pages")
    yield reserve
    with open(path, "w") as f:
        f.write(str(before))


def test_a_destination_on_huge_pages_takes_the_pages_through_its_mapping(huge_pages):
    """A guest on huge pages (`--hugetlb`, without --mem-prealloc) arrives whole:
    hugetlbfs has no write(), so the pages are received straight into the mapping
    (pwritev there failed, EINVAL, before)."""
    from vmm.memory import GuestMemory
    from vmm.migration.pages import Applier
    size = 16 << 20
    huge_pages(size >> 21)
    src = GuestMemory(size)
    os.pwrite(src.fd, os.urandom(3 << 20), 1 << 20)
    wire, bitmap, _, _ = _pass_stream(src)
    dst = GuestMemory(size, hugetlb=True)
    try:
        applier = Applier(dst)
        applier.prealloc(bitmap)
        _take(applier, wire)
        assert bytes(dst.view(0, size)) == os.pread(src.fd, size, 0)
        assert applier.counts.normal_pages == 768
    finally:
        dst.close()
        src.close()


def test_a_destination_that_cannot_write_its_ram_says_so():
    """pwritev into the RAM memfd failing (here: a sealed memfd smaller than the RAM, so
    a write past its end is refused, EPERM) is reported as what it is, with the
    system's reason, not as a broken connection."""
    import fcntl
    from vmm.errors import VmmError
    from vmm.memory import GuestMemory
    from vmm.migration.pages import Applier
    size = 8 << 20
    src = GuestMemory(size)
    os.pwrite(src.fd, os.urandom(1 << 20), 6 << 20)   # pages past the sealed end
    wire, _, _, _ = _pass_stream(src)
    ram = GuestMemory(size)
    small = os.memfd_create("small-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(small, 4 << 20)
    fcntl.fcntl(small, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW)

    from types import SimpleNamespace   # RAM whose memfd ends early: writes past 4 MiB fail
    early = SimpleNamespace(size=size, host_base=ram.host_base, fd=small, preallocated=False,
                            hugetlb=False)
    try:
        with pytest.raises(VmmError, match=r"^cannot write the guest's RAM here: "
                                           r"Operation not permitted$"):
            _take(Applier(early), wire)
    finally:
        os.close(small)
        ram.close()
        src.close()


def section(tag: bytes, payload: bytes, crc=None) -> bytes:
    return struct.pack("<4sIQ", tag, crc32c(payload) if crc is None else crc,
                       len(payload)) + payload


HEADER = b"PYVMMIG\0" + struct.pack("<I", STREAM_VERSION)
NOT_A_HELLO = state_blob({"shape": 1})   # a well-formed blob, but not a HELO


@pytest.mark.parametrize("data, says", [
    (b"GET / HTTP/1.0\r\n\r\n", "not a pyvmm migration stream"),
    (b"PYVMMIG\0" + struct.pack("<I", 99), "version 99"),
    (HEADER + section(b"HELO", b"x" * 64, crc=1), "CRC-32C does not match"),
    (HEADER + section(b"HELO", b"x" * 64)[:40], "truncated"),
    (HEADER + section(b"ZZZZ", b""), "unknown section"),
    (HEADER + section(b"HELO", b"\x00" * 40), "not a pyvmm state blob"),
    (HEADER + section(b"HELO", NOT_A_HELLO), "does not name the guest's NICs"),
], ids=["foreign", "version", "crc", "truncated", "tag", "blob", "hello"])
def test_corrupt_or_foreign_stream_is_refused(procs, hosts, tmp_path, data, says):
    dst, dst_qmp, uri = start_destination(procs, hosts, tmp_path)
    _, host, port = uri.split(":")
    send = (f"import socket; s = socket.create_connection(({host!r}, {port})); "
            f"s.sendall({data!r}); s.shutdown(socket.SHUT_WR); s.recv(100)")
    subprocess.run(hosts.run(hosts.host_a, sys.executable, "-c", send), timeout=30,
                   check=True)
    assert_destination_gone(dst, dst_qmp, says)


def test_python_backend_is_refused_before_anything_stops(procs, hosts, tmp_path):
    qmp_path = tmp_path / "src.qmp"
    src = procs(hosts.host_a, ["run", "--kernel", NETECHO, "--cmdline", f"ip={hosts.guest_ip}",
                               "--net", f"tap,ifname={hosts.tap},backend=python",
                               "--qmp", str(qmp_path)])
    src.wait_for(r"netecho: up ip=")
    dst, dst_qmp, uri = start_destination(procs, hosts, tmp_path, net=True)
    info, events = migrate(qmp_path, uri)
    assert info["status"] == "failed" and "backend=c" in info["error-desc"], info
    assert "STOP" not in [e["event"] for e in events]
    assert status(qmp_path) == "running"


# -- convergence -------------------------------------------------------------------------------
def test_downtime_limit_holds_and_auto_converge_makes_a_fast_dirtier_converge(procs, hosts,
                                                                              tmp_path):
    """The pattern guest rewrites 24 MiB as fast as it can, the link gives 32 MiB/s: the
    rest never fits in 200 ms, so the source keeps copying (the guest running) instead of
    stopping; with auto-converge the vCPUs are throttled until it does fit."""
    src, src_qmp = start_source(procs, hosts, tmp_path, PATTERN, "pattern_mb=24")
    progress = int(src.wait_for(r"pattern: progress=(0x[0-9a-f]+)").group(1), 16)
    src.wait_for(r"^pass 2$")
    dst, dst_qmp, uri = start_destination(procs, hosts, tmp_path)
    params = {"max-bandwidth": 32 << 20, "downtime-limit": 200}
    migrate(src_qmp, uri, wait=False, **params)
    time.sleep(2.5)
    q = qmp_connect(src_qmp)
    try:
        info = qmp(q, "query-migrate")
        assert info["status"] == "active", info
        assert info["ram"]["dirty-sync-count"] >= 2 and info["expected-downtime"] > 200, info
        assert qmp(q, "query-status")["status"] == "running"
        qmp(q, "migrate_cancel")
        assert wait_migration(q, 20)["status"] == "cancelled"
    finally:
        close(q)
    assert_destination_gone(dst, dst_qmp, "truncated")
    dst, dst_qmp, uri = start_destination(procs, hosts, tmp_path)
    q = qmp_connect(src_qmp)
    try:
        qmp(q, "migrate-set-capabilities",
            capabilities=[{"capability": "auto-converge", "state": True}])
        qmp(q, "migrate", uri=uri)
        throttled = 0
        while (info := qmp(q, "query-migrate"))["status"] in ("setup", "active"):
            throttled = max(throttled, info.get("cpu-throttle-percentage", 0))
            time.sleep(0.05)
        info = wait_migration(q, 60)
    finally:
        close(q)
    assert info["status"] == "completed", info
    assert throttled >= 20 and info["ram"]["dirty-sync-count"] >= 3, (throttled, info)
    assert info["downtime"] < 1000 and "cpu-throttle-percentage" in info, info
    q = qmp_connect(dst_qmp)
    try:
        qmp(q, "stop")
        check_pattern(ram_of(dst.proc.pid), progress)
    finally:
        close(q)


def test_there_and_back_again(procs, hosts, tmp_path):
    """A guest that arrived by migration leaves again: hostA -> hostB -> hostA, its tick
    counter going on across the three VMMs, never back.  (All three append the guest's
    serial output to one console file, so a line cut by a move is whole there.)"""
    console = tmp_path / "console.log"
    procs(hosts.host_a, ["run", "--kernel", TICKER, "--cmdline", "period_us=20000",
                         "--console", str(console), "--qmp", str(tmp_path / "a.qmp")])
    wait_file(console, r"tick 5 ")
    there, there_qmp, uri = start_destination(procs, hosts, tmp_path, console=console)
    assert migrate(tmp_path / "a.qmp", uri)[0]["status"] == "completed"
    n = ticks(console.read_text())[-1][0]
    wait_file(console, rf"tick {n + 3} ")
    back_qmp = tmp_path / "back.qmp"
    host = hosts.link_ip(hosts.host_a)
    procs(hosts.host_a, ["run", "--incoming", f"tcp:{host}:0", "--console", str(console),
                         "--qmp", str(back_qmp)])
    port = wait_status(back_qmp, ("setup",))["socket-address"][0]["port"]
    info, _ = migrate(there_qmp, f"tcp:{host}:{port}")
    assert info["status"] == "completed", info
    assert status(back_qmp) == "running"
    n = ticks(console.read_text())[-1][0]
    wait_file(console, rf"tick {n + 3} ")
    assert_ticks_continuous(console.read_text())


def test_the_destinations_warm_up_leaves_nothing_behind():
    """A TCP destination builds and tears down a throwaway 2 MiB machine with the
    devices it will need while it waits (vmm.cpr.target.warm_up_empty: the real build
    is then warm, and is part of the source's setup-time).  It leaves no fd (KVM VM,
    vCPUs, memfd, eventfds) and no thread behind, and a second one does the same."""
    from vmm.cpr.target import warm_up_empty
    need_kvm()
    fds = set(os.listdir("/proc/self/fd"))
    threads = len(os.listdir("/proc/self/task"))
    for _ in range(2):
        warm_up_empty(["net"])
        assert set(os.listdir("/proc/self/fd")) <= fds, "an fd was left open"
        deadline = time.monotonic() + 5   # (a joined thread leaves /proc a moment later)
        while len(os.listdir("/proc/self/task")) != threads and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(os.listdir("/proc/self/task")) == threads, "a thread was left running"
