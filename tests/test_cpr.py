"""CPR live update end to end: real guests, real processes exec'd, real taps, QMP via qemu.qmp.

The scenarios mirror QEMU's own CPR tests (tests/qtest/migration/cpr-tests.c):
transfer, transfer with a target started early, exec; a guest that writes every
page is checked page by page afterwards; the serial line goes on.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
import subprocess
import sys
import time

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from conftest import ROOT, need_kvm, pyvmm_cmd
from bench.lab import GUEST_IP, in_ns, netns_with_tap, wait_until_no_child
from vmm.client.cpr import wait_migration as wait_settled
from vmm.control import HOLD_OFF_S

pytestmark = pytest.mark.usefixtures("kvm")


@pytest.fixture(scope="module")
def kvm():
    need_kvm()


# -- helpers ---------------------------------------------------------------------------------
EARLY_RUNNING = ("prebuilder: vCPU, VM and irqchip state restored, vCPUs running "
                 "(the guest runs)")


class QmpFailed(Exception):
    pass


def qmp_connect(path, timeout=15.0) -> QEMUMonitorProtocol:
    deadline = time.monotonic() + timeout
    while True:
        q = QEMUMonitorProtocol(str(path))
        try:
            q.connect(negotiate=True)
            return q
        except Exception:
            q.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def close(q):
    """Close a QMP client whose peer may have exec'd or exited under it."""
    try:
        q.close()
    except Exception:
        pass


def qmp(q, name, **args):
    r = q.cmd_raw(name, args or None)
    if "error" in r:
        raise QmpFailed(r["error"]["desc"])
    return r["return"]


def ticks(text):
    """(tick, t_us) of each tick whose time was written whole: the console is read
    while the guest writes it byte by byte, so the text may end inside a number."""
    return [(int(n), int(t)) for n, t in re.findall(r"tick (\d+) t_us=(\d+)(?=\s)", text)]


def assert_ticks_go_on(p, n=3):
    """The ticker in `p` ticks n more times and its counter and clock never went back."""
    last = ticks(p.text())[-1][0]
    p.wait_for(rf"tick {last + n} ")
    assert_ticks_continuous(p.text())


def assert_ticks_continuous(text):
    seen = ticks(text)
    ns = [n for n, _ in seen]
    assert ns == list(range(ns[0], ns[0] + len(ns))), f"counter went back or skipped: {ns}"
    ts = [t for _, t in seen]
    assert ts == sorted(ts), "guest time went back"


def wait_migration(q, timeout=30.0):
    """Poll query-migrate on the old VMM until it settles; None if it went away (success).
    pyvmm's own wait (vmm.client.cpr), asking through qemu.qmp."""
    return wait_settled(lambda: qmp(q, "query-migrate"), timeout, gone=(Exception,))


def cpr_exec(qmp_path, faults=()):
    q = qmp_connect(qmp_path)
    try:
        params = {"mode": "cpr-exec"}
        if faults:
            params["x-fault"] = list(faults)
        qmp(q, "migrate-set-parameters", **params)
        qmp(q, "migrate", uri="exec:")
        return wait_migration(q)
    finally:
        close(q)


def cpr_transfer(qmp_path, cpr_sock, faults=(), early=False):
    """One cpr-transfer over QMP; its outcome (query-migrate).  `early`: with the early
    start (x-early-start)."""
    q = qmp_connect(qmp_path)
    try:
        params = {"mode": "cpr-transfer"}
        if faults:
            params["x-fault"] = list(faults)
        if early:
            params["x-early-start"] = True
        qmp(q, "migrate-set-parameters", **params)
        if early:
            assert qmp(q, "query-migrate-parameters")["x-early-start"] is True
        addr = {"transport": "socket", "type": "unix", "path": str(cpr_sock)}
        qmp(q, "migrate", channels=[{"channel-type": "main", "addr": addr},
                                    {"channel-type": "cpr", "addr": addr}])
        return wait_migration(q)
    finally:
        close(q)


def new_info(qmp_path, timeout=15.0):
    """query-migrate on the VMM that now runs the guest.

    A client can still reach the old image in the instant before its exec (the
    listening socket is the same), so a dropped connection means: ask again.
    """
    deadline = time.monotonic() + timeout
    while True:
        q = qmp_connect(qmp_path)
        try:
            info = qmp(q, "query-migrate")
            if info.get("status") == "completed" or time.monotonic() > deadline:
                return info
        except QmpFailed:
            raise
        except Exception:
            if time.monotonic() > deadline:
                raise
        finally:
            close(q)
        time.sleep(0.02)


def fd_targets(pid):
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    return out


def start_ticker(vmm_procs, tmp_path, name="old", period=20000):
    qmp_path = tmp_path / f"{name}.qmp"
    p = vmm_procs(["run", "--kernel", str(ROOT / "guest/build/ticker.elf"),
                   "--cmdline", f"period_us={period}", "--qmp", str(qmp_path)])
    return p, qmp_path


def start_incoming(vmm_procs, tmp_path, name="new", ns=None, env=None):
    sock = tmp_path / f"{name}.cpr"
    qmp_path = tmp_path / f"{name}.qmp"
    p = vmm_procs(["run", "--incoming", f"cpr-transfer:{sock}", "--qmp", str(qmp_path)], ns=ns,
                  env=env)
    deadline = time.monotonic() + 15
    while not sock.exists():
        assert time.monotonic() < deadline, p.stderr
        time.sleep(0.01)
    return p, sock, qmp_path


# -- ticker ------------------------------------------------------------------------------------
def test_ticker_survives_cpr_exec(guests, vmm_procs, tmp_path):
    p, qmp_path = start_ticker(vmm_procs, tmp_path)
    p.wait_for(r"tick 5 ")
    pid = p.pid
    assert cpr_exec(qmp_path) is None      # the old image is gone: exec'd in place
    info = new_info(qmp_path)
    assert info["status"] == "completed" and info["mode"] == "cpr-exec"
    assert info["x-downtime-us"] > 0
    assert p.proc.poll() is None and p.pid == pid          # same PID, still running
    assert_ticks_go_on(p, 5)
    marks = [m for m, _ in info["x-timeline"]]
    assert marks == ["stop", "quiesce", "notify", "save", "transfer", "restore", "resume"]
    # The new image adopted the VM its prebuilder made before Python's main()
    # (csrc/cpr_exec.c), within the transfer phase, i.e. before Python ran a line.
    steps = dict(info["x-steps"])
    built = steps["prebuilder: VM, memory slots, irqchip and vCPUs ready"]
    t = dict(info["x-timeline"])
    assert t["transfer"] < built < t["resume"]
    assert t["transfer"] < steps["new image: Python runs its first line"]
    # ... and then restored the saved vCPU and VM state and ran the guest (the early
    # start): this image's restore is the prebuilder's, the guest ran again ("resume")
    # when its vCPU threads went in, and Python's threads took over later.
    assert t["restore"] == built
    assert t["resume"] == steps[EARLY_RUNNING]
    assert t["resume"] < steps["new image: Python's vCPU threads run the guest"]
    # The holder that kept the old VM and address space out of the exec is let go.
    assert not wait_until_no_child(pid, lambda comm, state: comm == "pyvmm-holder")


def test_ticker_survives_cpr_transfer(guests, vmm_procs, tmp_path):
    old, old_qmp = start_ticker(vmm_procs, tmp_path)
    new, sock, new_qmp = start_incoming(vmm_procs, tmp_path)
    old.wait_for(r"tick 5 ")
    cpr_transfer(old_qmp, sock)
    assert old.wait(15) == 0                 # old exits only after the new one runs
    info = new_info(new_qmp)
    assert info["status"] == "completed" and info["mode"] == "cpr-transfer"
    last_old = ticks(old.text())[-1][0]
    new.wait_for(rf"tick {last_old + 5} ")
    # A line the old VMM was half-way through is finished by the new one: join, don't split.
    assert_ticks_continuous(old.text() + new.text())
    marks = [m for m, _ in info["x-timeline"]]
    assert marks == ["setup", "stop", "quiesce", "notify", "save", "transfer", "restore",
                     "resume"]


@pytest.mark.parametrize("vcpus", [1, 4])
def test_order_devices_released_before_fds_leave(guests, vmm_procs, tmp_path, vcpus):
    """The new VMM must never see a device the old one still owns.

    Fails if the sequence is reordered: at the instant the fds reach the new
    VMM it lists the old VMM's threads, and no data-path thread may be there;
    and in the timeline stop and notify must both precede the transfer.  With
    4 vCPUs (docs/SMP.md) every vCPU thread is seen there and is back in the new VMM.
    """
    vcpu_threads = {f"vcpu{i}" for i in range(vcpus)}
    with netns_with_tap() as (ns, tap):
        old, old_qmp = start_netecho(vmm_procs, tmp_path, ns, tap, vcpus=vcpus)
        assert "vnet-io" in threads(old.pid), "the C data path should run before the update"
        new, sock, new_qmp = start_incoming(vmm_procs, tmp_path, ns=ns,
                                            env={"PYVMM_CPR_RECORD_PEER": "1"})
        cpr_transfer(old_qmp, sock)
        assert old.wait(15) == 0
        info = new_info(new_qmp)
        at_fds = info["x-peer-threads-at-transfer"]
        assert vcpu_threads <= set(at_fds), f"the new VMM could not see the old one: {at_fds}"
        assert "vnet-io" not in at_fds
        t = {m: ts for m, ts in info["x-timeline"]}
        assert t["stop"] < t["quiesce"] < t["notify"] < t["save"] < t["transfer"] < t["restore"]
        assert vcpu_threads | {"vnet-io"} <= set(threads(new.pid))


def threads(pid):
    names = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            pass
    return names


def start_netecho(vmm_procs, tmp_path, ns, tap, name="old", vcpus=1):
    qmp_path = tmp_path / f"{name}.qmp"
    p = vmm_procs(["run", "--kernel", str(ROOT / "guest/build/netecho.elf"), "--vcpus", str(vcpus),
                   "--net", f"tap,ifname={tap}", "--cmdline", f"ip={GUEST_IP} stats=0",
                   "--qmp", str(qmp_path)], ns=ns)
    p.wait_for(r"netecho: up")
    return p, qmp_path


# -- failure and rollback ------------------------------------------------------------------------
EXEC_FAULTS = ["after-stop", "notify", "save", "exec"]
TRANSFER_FAULTS = ["prepare", "after-stop", "notify", "save", "transfer", "target-prepare",
                   "target-crash-before-fds", "target-crash-after-fds", "target-restore"]


def thread_nices(pid: int) -> dict[str, list[int]]:
    """Each thread's nice in process `pid`, by name ("main" for the main thread)."""
    out: dict[str, list[int]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            stat = f.read()
        name = "main" if int(tid) == pid else stat[stat.index("(") + 1:stat.rindex(")")]
        out.setdefault(name, []).append(int(stat[stat.rindex(")") + 2:].split()[16]))
    return out


def assert_keeps_running(p, qmp_path):
    """The guest runs on, and no thread but the vCPUs' kept the nice that the update's
    thread runs at from the stop until the state has left (vmm/cpr/source.py)."""
    q = qmp_connect(qmp_path)
    try:
        assert qmp(q, "query-status")["status"] == "running"
    finally:
        close(q)
    assert_ticks_go_on(p)
    nices = thread_nices(p.proc.pid)
    assert {n for name, ns in nices.items() if not name.startswith(("vcpu", "kvm-"))
            for n in ns} == {0}, nices


@pytest.mark.parametrize("fault", EXEC_FAULTS)
def test_cpr_exec_fault_rolls_back(guests, vmm_procs, tmp_path, fault):
    p, qmp_path = start_ticker(vmm_procs, tmp_path)
    p.wait_for(r"tick 3 ")
    info = cpr_exec(qmp_path, faults=[fault])
    assert info["status"] == "failed"
    assert f"injected fault at '{fault}'" in info["error-desc"]
    assert_keeps_running(p, qmp_path)
    assert "x-timeline" in info


def test_cpr_exec_restore_failure_execs_again(guests, vmm_procs, tmp_path):
    """No old image to go back to after an exec: the new one re-execs with faults disarmed."""
    p, qmp_path = start_ticker(vmm_procs, tmp_path)
    p.wait_for(r"tick 3 ")
    assert cpr_exec(qmp_path, faults=["target-restore"]) is None
    assert new_info(qmp_path)["status"] == "completed"
    assert_ticks_go_on(p)


@pytest.mark.parametrize("fault", TRANSFER_FAULTS)
def test_cpr_transfer_fault_rolls_back(guests, vmm_procs, tmp_path, fault):
    old, old_qmp = start_ticker(vmm_procs, tmp_path)
    new, sock, _ = start_incoming(vmm_procs, tmp_path)
    old.wait_for(r"tick 3 ")
    info = cpr_transfer(old_qmp, sock, faults=[fault])
    assert info["status"] == "failed", info
    assert_keeps_running(old, old_qmp)
    if fault == "prepare":                   # the old VMM never connected: still waiting
        assert new.proc.poll() is None
    else:                                    # it gave up (or crashed) and is gone
        assert new.wait(15) != 0
    assert "tick" not in new.text()          # and never ran the guest


def test_cpr_transfer_fails_cleanly_without_target(guests, vmm_procs, tmp_path):
    old, old_qmp = start_ticker(vmm_procs, tmp_path)
    old.wait_for(r"tick 2 ")
    info = cpr_transfer(old_qmp, tmp_path / "nobody.cpr")
    assert info["status"] == "failed"
    assert "cannot connect" in info["error-desc"]
    assert "x-timeline" in info and [m for m, _ in info["x-timeline"]] == ["setup"]
    assert_keeps_running(old, old_qmp)


@pytest.mark.parametrize("fault", ["target-slow-prepare", "target-slow-restore"])
def test_migrate_cancel_resumes(guests, vmm_procs, tmp_path, fault):
    old, old_qmp = start_ticker(vmm_procs, tmp_path)
    new, sock, _ = start_incoming(vmm_procs, tmp_path)
    old.wait_for(r"tick 3 ")
    q = qmp_connect(old_qmp)
    try:
        qmp(q, "migrate-set-parameters", mode="cpr-transfer", **{"x-fault": [fault]})
        addr = {"transport": "socket", "type": "unix", "path": str(sock)}
        qmp(q, "migrate", channels=[{"channel-type": "main", "addr": addr},
                                    {"channel-type": "cpr", "addr": addr}])
        time.sleep(0.4)
        if fault == "target-slow-restore":
            # The guest is stopped: the monitor holds its clients off (Controller.hold_off)
            # until the stop ends or HOLD_OFF_S has passed, and still takes the cancel.
            t = time.monotonic()
            assert qmp(q, "query-migrate")["status"] == "device"
            assert time.monotonic() - t >= HOLD_OFF_S * 0.9
        qmp(q, "migrate_cancel")
        info = wait_migration(q)
    finally:
        close(q)
    assert info["status"] == "cancelled"
    assert_keeps_running(old, old_qmp)
    assert new.wait(15) != 0


# -- a guest that writes every page ---------------------------------------------------------------
def ram_of(pid):
    for fd, target in fd_targets(pid).items():
        if target.startswith("/memfd:pyvmm-ram"):
            return f"/proc/{pid}/fd/{fd}"
    raise AssertionError(f"no RAM memfd in {fd_targets(pid)}")


def check_pattern(path, progress_gpa):
    """Every pattern page holds k (before the page being written) or k-1 (from it on)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        ram = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(fd)
    with ram:
        magic, k, cur, npages, nranges = struct.unpack_from("<5Q", ram, progress_gpa)
        assert magic == 0x5041545445524E21
        ranges = [struct.unpack_from("<2Q", ram, progress_gpa + 40 + 16 * i)
                  for i in range(nranges)]
        bad = []
        for start, end in ranges:
            for page in range(start, end, 4096):
                want = (k if page < cur else k - 1) & 0xFF
                if page == cur and ram[page] == k & 0xFF:
                    continue                   # stopped just after writing this one
                if ram[page] != want:
                    bad.append((hex(page), ram[page], want))
        assert not bad, f"{len(bad)} pages wrong (pass {k}, at {cur:#x}): {bad[:5]}"
        return k, npages


def assert_pages_intact(proc, qmp_path, progress_gpa) -> int:
    """The pattern guest in `proc`, stopped: every page holds what it wrote; resumed, it
    goes on to the next pass.  Returns the pass it was in."""
    q = qmp_connect(qmp_path)
    try:
        qmp(q, "stop")
        k, npages = check_pattern(ram_of(proc.pid), progress_gpa)
        assert npages >= 11000
        qmp(q, "cont")
    finally:
        close(q)
    proc.wait_for(rf"pass {k + 1}$")          # and it goes on writing
    return k


@pytest.mark.parametrize("mode", ["exec", "transfer"])
def test_every_page_survives_cpr(guests, vmm_procs, tmp_path, mode):
    qmp_path = tmp_path / "old.qmp"
    old = vmm_procs(["run", "--kernel", str(ROOT / "guest/build/pattern.elf"), "--memory", "128M",
                     "--cmdline", "pattern_mb=48", "--qmp", str(qmp_path)])
    progress = int(old.wait_for(r"pattern: progress=(0x[0-9a-f]+)").group(1), 16)
    old.wait_for(r"pass 3$")
    if mode == "exec":
        assert cpr_exec(qmp_path) is None
        cur, cur_qmp = old, qmp_path
    else:
        new, sock, new_qmp = start_incoming(vmm_procs, tmp_path)
        cpr_transfer(qmp_path, sock)
        assert old.wait(15) == 0
        cur, cur_qmp = new, new_qmp
    k = assert_pages_intact(cur, cur_qmp, progress)
    q = qmp_connect(cur_qmp)
    try:
        qmp(q, "stop")
        assert check_pattern(ram_of(cur.pid), progress)[0] > k
    finally:
        close(q)


# -- many in a row ------------------------------------------------------------------------------
def fd_kinds(pid) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for fd, target in fd_targets(pid).items():
        if fd <= 2:
            continue
        kind = re.sub(r"\[\d+\]", "", target)
        kind = re.sub(r"kvm-vcpu:\d+", "kvm-vcpu", kind)
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def rss_kb(pid) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test_ten_cprs_in_a_row_mixed_modes(guests, vmm_procs, tmp_path):
    cur, cur_qmp = start_ticker(vmm_procs, tmp_path, name="p0")
    cur.wait_for(r"tick 3 ")
    everything = ""
    kinds_seen, rss = [], []
    for i in range(10):
        if i % 2 == 0:
            assert cpr_exec(cur_qmp) is None
        else:
            new, sock, new_qmp = start_incoming(vmm_procs, tmp_path, name=f"p{i}")
            cpr_transfer(cur_qmp, sock)
            assert cur.wait(15) == 0
            everything += cur.text()
            cur, cur_qmp = new, new_qmp
        assert new_info(cur_qmp)["status"] == "completed"
        last = max([n for n, _ in ticks(cur.text())] + [0])
        cur.wait_for(rf"tick {last + 2} ")
        time.sleep(0.05)                       # let the monitor drop our closed connection
        kinds = fd_kinds(cur.pid)
        kinds.pop("socket:", None)             # the monitor's listener and any client
        kinds_seen.append(kinds)
        rss.append(rss_kb(cur.pid))
    everything += cur.text()
    assert_ticks_continuous(everything)
    # exactly what a running VM needs: /dev/kvm, the VM, one vCPU, the RAM memfd, the
    # monitor's epoll; nothing from the update (no state memfd, no channel, no stray fd)
    for kinds in kinds_seen:
        assert kinds == kinds_seen[0], kinds_seen
    assert kinds_seen[0].get("/memfd:pyvmm-ram (deleted)") == 1
    assert kinds_seen[0].get("anon_inode:kvm-vm") == 1
    assert kinds_seen[0].get("/dev/kvm") == 1
    assert not any("cpr-state" in k for k in kinds_seen[0])
    assert max(rss[2:]) - min(rss[2:]) < 16 * 1024, rss


# -- traffic flowing through the update --------------------------------------------------------
@pytest.mark.parametrize("mode", ["exec", "transfer"])
def test_netecho_loses_no_datagram_during_cpr(guests, vmm_procs, tmp_path, mode):
    """A numbered UDP stream and a ping -i 0.01 run across the update: every datagram comes
    back exactly once and in order; packets that arrive while the guest is stopped wait in
    the tap's queue."""
    count, interval = 1500, 0.002
    with netns_with_tap() as (ns, tap):
        old, old_qmp = start_netecho(vmm_procs, tmp_path, ns, tap)
        if mode == "transfer":
            new, sock, new_qmp = start_incoming(vmm_procs, tmp_path, ns=ns)
        stream = subprocess.Popen(in_ns(ns, sys.executable, "-m", "bench.traffic",
                                        GUEST_IP, str(count), str(interval)),
                                  stdout=subprocess.PIPE, text=True)
        ping = subprocess.Popen(in_ns(ns, "ping", "-q", "-c", "250", "-i", "0.01", "-W", "2",
                                      GUEST_IP), stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)
        if mode == "exec":
            assert cpr_exec(old_qmp) is None
            info = new_info(old_qmp)
        else:
            cpr_transfer(old_qmp, sock)
            assert old.wait(15) == 0
            info = new_info(new_qmp)
        assert info["status"] == "completed"
        out, _ = stream.communicate(timeout=30)
        ping_out, _ = ping.communicate(timeout=30)
    result = json.loads(out)
    got = result["got"]
    assert result["sent"] == count
    assert len(got) == len(set(got)), "duplicate datagrams"
    assert got == sorted(got), "datagrams out of order"
    assert got == list(range(count)), f"lost {sorted(set(range(count)) - set(got))[:20]}"
    assert "250 packets transmitted, 250 received" in ping_out, ping_out


def test_fault_is_for_one_update_and_must_fit_the_mode(guests, vmm_procs, tmp_path):
    p, qmp_path = start_ticker(vmm_procs, tmp_path)
    p.wait_for(r"tick 3 ")
    assert cpr_exec(qmp_path, faults=["save"])["status"] == "failed"
    q = qmp_connect(qmp_path)
    try:
        with pytest.raises(QmpFailed, match="do not exist in cpr-exec"):
            qmp(q, "migrate-set-parameters", mode="cpr-exec", **{"x-fault": ["transfer"]})
            qmp(q, "migrate", uri="exec:")
    finally:
        close(q)
    assert cpr_exec(qmp_path) is None          # the earlier fault is not armed any more
    assert new_info(qmp_path)["status"] == "completed"


def test_cpr_exec_leaves_no_zombie(guests, vmm_procs, tmp_path):
    p, qmp_path = start_ticker(vmm_procs, tmp_path)
    p.wait_for(r"tick 3 ")
    assert cpr_exec(qmp_path) is None
    assert new_info(qmp_path)["status"] == "completed"
    zombies = wait_until_no_child(p.pid, lambda comm, state: state == "Z")
    assert not zombies, f"zombie children left: {zombies}"
