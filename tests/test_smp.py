"""SMP guests end to end: guest/smp.c on 1-8 vCPUs, under pyvmm, through live updates, on QEMU.

The guest starts its APs itself (ACPI MADT, INIT-SIPI-SIPI), every CPU works in ring 3,
they send each other IPIs (one in flight per sender and receiver, so none can merge),
and each checks that its TSC is never behind what another CPU last published.  A 'c'
on the serial line makes it drain the IPIs in flight and print the totals ("smp: check
... sent=S recv=R"), a 'q' does that and exits (0 only if all was well).  The host has
2 cores: 4 and 8 vCPUs are oversubscribed on purpose.
"""

from __future__ import annotations

import re
import select
import subprocess
import sys
import time
import warnings

import pytest

from conftest import ROOT
from test_cpr import EARLY_RUNNING, close, cpr_exec, cpr_transfer, new_info, qmp, qmp_connect
from test_guest_qemu import BASE as QEMU_BASE, QEMU, qexit

pytestmark = pytest.mark.usefixtures("kvm")

SMP = ROOT / "guest/build/smp.elf"
BEAT = re.compile(r"^cpu (\d+) beat (\d+) work=(\d+) shared=(\d+) sent=(\d+) recv=(\d+) "
                  r"tsc_back=(\d+)$", re.M)
TOTALS = (r"smp: (check|done) cpus=(\d+) sent=(\d+) recv=(\d+) tsc_back=(\d+) shared=(\w+) "
          r"tsc_worst=(\d+)")

# This host's own CPUs' TSCs are a few cycles apart now and then (seen by a plain host
# program, no KVM: `make tsc-skew`), and a PVM guest reads the host's TSC (every vCPU's
# KVM TSC offset is the same: tests/test_vcpu_state.py checks it after a restore).  So
# a guest whose CPUs run on different host CPUs may see another's TSC up to that skew
# ahead of its own.  A restore that gave the vCPUs different TSCs puts them at least
# the microseconds between two vCPUs' saves apart (thousands of cycles): anything
# above this bound fails.
TSC_SKEW_MAX = 1000


@pytest.fixture(scope="module")
def kvm():
    from conftest import need_kvm
    need_kvm()


def start_smp(vmm_procs, tmp_path, vcpus, extra="", name="old"):
    qmp_path = tmp_path / f"{name}.qmp"
    p = vmm_procs(["run", "--kernel", str(SMP), "--vcpus", str(vcpus),
                   "--cmdline", f"beat_ms=200 ipi_us=1000 tsc_slack={TSC_SKEW_MAX} {extra}".strip(),
                   "--qmp", str(qmp_path)], stdin=subprocess.PIPE)
    return p, qmp_path


def type_(p, ch: str) -> None:
    p.proc.stdin.write(ch.encode())
    p.proc.stdin.flush()


def beats(text: str) -> dict[int, list[tuple[int, ...]]]:
    """{cpu: [(beat, work, shared, sent, recv, tsc_back), ...]} from the heartbeat lines."""
    out: dict[int, list] = {}
    for m in BEAT.finditer(text):
        out.setdefault(int(m.group(1)), []).append(tuple(int(g) for g in m.groups()[1:]))
    return out


def assert_beats_continuous(text: str, cpus: int) -> None:
    """Every CPU's beat counter goes 1, 2, 3 ... and its work never goes back (the
    TSC check is judged at the totals, which carry the worst regression)."""
    seen = beats(text)
    assert sorted(seen) == list(range(cpus)), f"CPUs with heartbeats: {sorted(seen)}"
    for cpu, rows in seen.items():
        ns = [r[0] for r in rows]
        assert ns == list(range(ns[0], ns[0] + len(ns))), f"cpu {cpu} beats skipped: {ns}"
        works = [r[1] for r in rows]
        assert works == sorted(works), f"cpu {cpu}'s work counter went back"


def wait_beats(p, cpus: int, more: int = 2, before: str = "") -> None:
    """Each CPU prints `more` heartbeats after the ones already seen (in `before`, the
    output of the VMMs that ran the guest before p, then p's)."""
    last = {cpu: rows[-1][0] for cpu, rows in beats(join_output(before, p.text())).items()}
    for cpu in range(cpus):
        p.wait_for(rf"^cpu {cpu} beat {last.get(cpu, 0) + more} ", timeout=30)


def check_totals(p, ch="c") -> int:
    """Type a check (or the end): every IPI sent was received, once, the counters agree
    and no TSC went back by more than the host's skew; returns the IPIs sent."""
    start = len(p.lines)
    type_(p, ch)
    m = p.wait_for(TOTALS, timeout=30, start=start)
    assert_totals(m)
    return int(m.group(3))


def assert_totals(m) -> None:
    kind, _, sent, recv, back, shared, worst = m.groups()
    assert (sent, shared) == (recv, "ok"), m.group(0)
    assert int(worst) <= TSC_SKEW_MAX, f"a vCPU's TSC went back across CPUs: {m.group(0)}"
    if back != "0":
        warnings.warn(f"host TSC skew seen by the guest (<= {TSC_SKEW_MAX} cycles): "
                      f"{m.group(0)}")


def finish(p, cpus: int) -> None:
    assert_beats_continuous(p.text(), cpus)
    check_totals(p, "q")
    assert p.wait(15) == 0


# -- boot and IPIs -------------------------------------------------------------------------------
@pytest.mark.parametrize("vcpus", [1, 2, 4, 8])
def test_smp_guest_runs_every_vcpu(guests, vmm_procs, tmp_path, vcpus):
    p, qmp_path = start_smp(vmm_procs, tmp_path, vcpus)
    p.wait_for(rf"smp: ACPI MADT \(RSDP at e0000 by start_info\): {vcpus} CPUs")
    p.wait_for(rf"smp: {vcpus} CPUs online \(INIT-SIPI\)")
    wait_beats(p, vcpus, 2)
    q = qmp_connect(qmp_path)
    try:
        cpus = qmp(q, "query-cpus-fast")
        tids = {int(t) for t in threads_by_name(p.pid, "vcpu")}
        assert [c["cpu-index"] for c in cpus] == list(range(vcpus))
        assert {c["thread-id"] for c in cpus} == tids and len(tids) == vcpus
        assert all(c["target"] == "x86_64" and c["props"]["core-id"] == c["cpu-index"]
                   for c in cpus)
        state = qmp(q, "x-query-state")
        assert [v["mp_state"] for v in state["vcpus"]] != []
        assert all(v["mode"] == "64-bit" for v in state["vcpus"])
    finally:
        close(q)
    if vcpus > 1:
        assert check_totals(p) > 0
    wait_beats(p, vcpus, 1)
    finish(p, vcpus)


def threads_by_name(pid: int, prefix: str) -> list[str]:
    import os
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                if f.read().startswith(prefix):
                    out.append(tid)
        except OSError:
            pass
    return out


def test_stop_and_cont_act_on_every_vcpu(guests, vmm_procs, tmp_path):
    p, qmp_path = start_smp(vmm_procs, tmp_path, 4)
    wait_beats(p, 4, 1)
    q = qmp_connect(qmp_path)
    try:
        qmp(q, "stop")
        time.sleep(0.1)                        # what was printed before the stop arrives
        n = len(p.lines)
        time.sleep(0.6)                        # three beats' time: nobody prints
        assert not beats("\n".join(line for _, line in p.lines[n:])), "a vCPU ran while stopped"
        qmp(q, "cont")
    finally:
        close(q)
    wait_beats(p, 4, 2)
    finish(p, 4)


def test_stopping_vcpu_threads_that_have_ended_is_harmless(guests, kvm):
    """Machine.stop() then close() (as the old VMM after a live update) stops the vCPU
    threads twice: the second kick must not signal a thread that has ended (with 8
    vCPUs glibc had unmapped the stacks and pthread_kill crashed the old VMM, -11)."""
    script = f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
from vmm.machine import Machine, MachineConfig
m = Machine(MachineConfig(kernel={str(SMP)!r}, memory=64 << 20, vcpus=8,
                          cmdline="beat_ms=200", console=lambda b: None))
m.create(); m.boot(); m.start()
time.sleep(0.5)
m.stop()
time.sleep(0.2)
m.close()
print("closed")
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=60)
    assert (r.returncode, r.stdout.strip()) == (0, "closed"), r.stderr


# -- live update ----------------------------------------------------------------------------
@pytest.mark.parametrize("vcpus,rounds", [(2, 10), (4, 2), (8, 2)])
def test_cpr_exec_under_ipi_load(guests, vmm_procs, tmp_path, vcpus, rounds):
    p, qmp_path = start_smp(vmm_procs, tmp_path, vcpus)
    wait_beats(p, vcpus, 1)
    for _ in range(rounds):
        assert cpr_exec(qmp_path) is None
        info = new_info(qmp_path)
        assert info["status"] == "completed"
        # the prebuilder made the new VM with every vCPU before Python started, restored
        # their state and ran them (the early start: IPIs flow before Python took over)
        steps = dict(info["x-steps"])
        assert "prebuilder: VM, memory slots, irqchip and vCPUs ready" in steps
        assert steps[EARLY_RUNNING] == dict(info["x-timeline"])["resume"]
        wait_beats(p, vcpus, 1)
        check_totals(p)
    finish(p, vcpus)


@pytest.mark.parametrize("vcpus,rounds,early", [(2, 10, False), (4, 2, False), (8, 2, False),
                                                (2, 5, True), (4, 2, True)])
def test_cpr_transfer_under_ipi_load(guests, vmm_procs, tmp_path, vcpus, rounds, early):
    """`early`: with cpr-transfer's early start (the new VMM's vCPU threads, made before
    the stop, run the guest before its device restore)."""
    from test_cpr_transfer_early import early_transfer
    p, qmp_path = start_smp(vmm_procs, tmp_path, vcpus)
    wait_beats(p, vcpus, 1)
    text = ""
    for i in range(rounds):
        new, sock, new_qmp = start_incoming_smp(vmm_procs, tmp_path, f"new{i}")
        if early:
            assert early_transfer(qmp_path, sock)["status"] == "completed"
        else:
            cpr_transfer(qmp_path, sock)
        assert p.wait(15) == 0
        assert new_info(new_qmp)["status"] == "completed"
        text = join_output(text, p.text())
        p, qmp_path = new, new_qmp
        wait_beats(p, vcpus, 1, before=text)
        check_totals(p)
    assert_beats_continuous(join_output(text, p.text()), vcpus)
    check_totals(p, "q")
    assert p.wait(15) == 0


def join_output(old: str, new: str) -> str:
    """The serial output of two VMMs in turn: a heartbeat line the old one was half-way
    through is finished by the new one (joined), any other boundary is a line break."""
    if not old:
        return new
    head, _, last = old.rpartition("\n")
    first, _, tail = new.partition("\n")
    if not BEAT.fullmatch(last) and BEAT.fullmatch(last + first):
        return f"{head}\n{last}{first}\n{tail}"
    return f"{old}\n{new}"


def start_incoming_smp(vmm_procs, tmp_path, name):
    """A cpr-transfer target whose stdin the test can type into (the guest's serial)."""
    sock = tmp_path / f"{name}.cpr"
    qmp_path = tmp_path / f"{name}.qmp"
    p = vmm_procs(["run", "--incoming", f"cpr-transfer:{sock}", "--qmp", str(qmp_path)],
                  stdin=subprocess.PIPE)
    deadline = time.monotonic() + 15
    while not sock.exists():
        assert time.monotonic() < deadline, p.stderr
        time.sleep(0.01)
    return p, sock, qmp_path


def mp_states(qmp_path) -> list[str]:
    q = qmp_connect(qmp_path)
    try:
        return [v["mp_state"] for v in qmp(q, "x-query-state")["vcpus"]]
    finally:
        close(q)


def sleeping_states(qmp_path) -> list[str]:
    """vCPUs 2 and 3's mp_state, asked again if vCPU 2 was caught awake (it runs for a
    moment once a second, when CPU 0 wakes it)."""
    for _ in range(5):
        states = mp_states(qmp_path)[2:]
        if states[0] == "halted":
            break
        time.sleep(0.1)
    return states


@pytest.mark.parametrize("mode", ["cpr-exec", "cpr-transfer"])
def test_halted_and_waiting_vcpus_stay_so(guests, vmm_procs, tmp_path, mode):
    """vCPU 2 sleeps in HLT and is woken by one IPI a second; vCPU 3 was never started
    (maxcpus=3): both come back as they were, and the sleeper wakes on the next IPI."""
    p, qmp_path = start_smp(vmm_procs, tmp_path, 4, "sleepers=1 maxcpus=3 wake_ms=1000")
    p.wait_for(r"^cpu 2 woke 1$")
    assert sleeping_states(qmp_path) == ["halted", "uninitialized"]
    woke = int(re.findall(r"^cpu 2 woke (\d+)$", p.text(), re.M)[-1])
    if mode == "cpr-exec":
        assert cpr_exec(qmp_path) is None
        assert new_info(qmp_path)["status"] == "completed"
        seen = len(p.text())   # (the same console goes on: count what comes from now)
    else:
        new, sock, new_qmp = start_incoming_smp(vmm_procs, tmp_path, "new")
        cpr_transfer(qmp_path, sock)
        assert p.wait(15) == 0
        p, qmp_path = new, new_qmp
        seen = 0
    assert sleeping_states(qmp_path) == ["halted", "uninitialized"]
    # The sleeper wakes here, on the next IPI (on a slow host the old VMM may have
    # printed a wake-up or two of its own before the stop: count on from there).
    deadline = time.monotonic() + 10
    while not [n for n in re.findall(r"^cpu 2 woke (\d+)$", p.text()[seen:], re.M)
               if int(n) > woke]:
        assert time.monotonic() < deadline, "the halted vCPU never woke after the update"
        time.sleep(0.05)
    check_totals(p, "q")
    assert p.wait(15) == 0


# -- the same guest on QEMU ----------------------------------------------------------------------
@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
@pytest.mark.parametrize("machine,vcpus", [("microvm", 2), ("microvm", 4), ("q35", 2)])
def test_smp_guest_on_qemu(guests, machine, vcpus):
    """QEMU's own MADT (its RSDP comes in start_info too) and INIT-SIPI: the same results."""
    base = list(QEMU_BASE)
    if machine == "q35":
        base[base.index("-M") + 1] = "q35"
    cmd = [QEMU, *base, "-smp", str(vcpus), "-kernel", str(SMP),
           "-append", f"beat_ms=200 tsc_slack={TSC_SKEW_MAX}"]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    try:
        out = b""
        deadline = time.monotonic() + 30
        while f"cpu {vcpus - 1} beat 3 ".encode() not in out:
            assert time.monotonic() < deadline and p.poll() is None, out.decode()
            if select.select([p.stdout], [], [], 0.5)[0]:
                out += p.stdout.read1(4096)
        p.stdin.write(b"q")
        p.stdin.flush()
        rest, _ = p.communicate(timeout=30)
        text = (out + rest).decode(errors="replace").replace("\r\n", "\n")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert re.search(rf"smp: ACPI MADT \(RSDP at \w+ by \w+\): {vcpus} CPUs", text), text
    assert f"smp: {vcpus} CPUs online (INIT-SIPI)" in text
    m = re.search(TOTALS, text)
    assert m and m.group(1) == "done", text
    assert_totals(m)
    assert_beats_continuous(text, vcpus)
    assert p.returncode == qexit(0), text


# -- live migration over TCP (issue 13's path) --------------------------------------------------
@pytest.mark.parametrize("load", ["ipis", "sleepers"])
def test_migration_to_another_host_keeps_every_vcpu(guests, vmm_procs, tmp_path, load):
    """The same guest moved between the two simulated hosts (bench/twohosts.py) by a
    precopy migration: every vCPU's counters go on on hostB, every IPI arrives once,
    no TSC regression beyond the host's skew; with sleepers, the halted vCPU and the
    one never started come back as they were and the sleeper wakes on the next IPI."""
    from bench.twohosts import two_hosts
    from test_migration import ENV, migrate, status
    extra = "sleepers=1 maxcpus=3 wake_ms=1000" if load == "sleepers" else ""
    with two_hosts() as hosts:
        src_qmp, dst_qmp = tmp_path / "src.qmp", tmp_path / "dst.qmp"
        src = vmm_procs(["run", "--kernel", str(SMP), "--vcpus", "4", "--memory", "128M",
                         "--cmdline", f"beat_ms=200 ipi_us=1000 tsc_slack={TSC_SKEW_MAX} "
                         f"{extra}".strip(), "--qmp", str(src_qmp)],
                        ns=hosts.host_a, env=ENV, stdin=subprocess.PIPE)
        running = 2 if extra else 4   # (sleepers: CPU 2 sleeps, CPU 3 was never started)
        wait_beats(src, running, 1)
        if extra:
            src.wait_for(r"^cpu 2 woke 1$")
            assert sleeping_states(src_qmp) == ["halted", "uninitialized"]
        link = hosts.link_ip(hosts.host_b)
        dst = vmm_procs(["run", "--incoming", f"tcp:{link}:0", "--qmp", str(dst_qmp)],
                        ns=hosts.host_b, env=ENV, stdin=subprocess.PIPE)
        q = qmp_connect(dst_qmp)
        try:
            port = qmp(q, "query-migrate")["socket-address"][0]["port"]
        finally:
            close(q)
        woke = len(re.findall(r"^cpu 2 woke \d+$", src.text(), re.M))
        info, _ = migrate(src_qmp, f"tcp:{link}:{port}")
        assert info["status"] == "completed", info
        assert status(src_qmp) == "postmigrate"
        time.sleep(0.3)          # the source's last lines, still in its pipe, are read
        before = src.text()
        wait_beats(dst, running, 2, before=before)
        if extra:
            assert sleeping_states(dst_qmp) == ["halted", "uninitialized"]
            dst.wait_for(rf"^cpu 2 woke {woke + 1}$")
        check_totals(dst)
        assert_beats_continuous(join_output(src.text(), dst.text()), running)
        check_totals(dst, "q")
        assert dst.wait(15) == 0
