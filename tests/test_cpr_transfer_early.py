"""cpr-transfer's early start (x-early-start, `pyvmm cpr --early-start`): the new VMM's
handoff thread runs the guest the moment it has written the vCPU and VM state, before
the blob arrives and the devices are restored; a new VMM that fails after that hands
the guest back with its state as it is then, and the old VMM resumes it from there.

Real updates between two pyvmm processes, a 1 ms ticker guest: its tick counter and
clock must never go back, across the update and across a hand-back."""

from __future__ import annotations

import time

import pytest

from conftest import need_kvm
from test_cpr import (TRANSFER_FAULTS, assert_ticks_go_on, close, cpr_transfer, new_info, qmp,
                      qmp_connect, start_incoming, start_ticker, ticks, wait_migration)

pytestmark = pytest.mark.usefixtures("kvm")

EARLY_STEP = ("handoff: VM and vCPU state written, the guest runs (the early start: "
              "a thread of the new pyvmm, in C)")


@pytest.fixture(scope="module")
def kvm():
    need_kvm()


def early_transfer(qmp_path, cpr_sock, faults=()):
    return cpr_transfer(qmp_path, cpr_sock, faults, early=True)


def assert_one_guest_history(seen):
    """(tick, t_us) pairs from the logs of both VMMs, sorted: one guest's history.

    A hand-back that resumed the state saved at the stop would run the ticks the
    new VMM printed again (a run of repeated ticks, the clock going back).  What a
    correct update may leave: the guest writes a line a byte at a time, so a switch
    between the VMMs can cut one line (its start in one log, its end in the other),
    and with a hand-back one log holds the old VMM's start of a line, then the end of
    another (the new VMM's middle part is in its own log): such a line reads a tick
    number or time that is not the guest's, and its own tick is missing.  At most
    one such line at each of the two switches."""
    # The guest's history: the longest chain of ticks whose number and time both go
    # up.  Everything else may only be those cut lines (two per switch at most: its
    # two reads of a wrong value), and only the two cut lines' own ticks may be missing.
    chain = longest_chain(seen)
    assert len(seen) - len(chain) <= 4, f"ticks ran twice or time went back: {seen}"
    ns = [n for n, _ in chain]
    missing = sum(b - a - 1 for a, b in zip(ns, ns[1:]))
    assert missing <= 2, f"ticks lost: {missing} ({ns})"


def longest_chain(seen):
    """The longest subsequence of (tick, t_us) with both strictly increasing."""
    import bisect
    pts = sorted(set(seen), key=lambda p: (p[0], -p[1]))
    tails, tail_at, prev = [], [], {}
    for p in pts:
        i = bisect.bisect_left(tails, p[1])
        prev[p] = tail_at[i - 1] if i else None
        if i == len(tails):
            tails.append(p[1])
            tail_at.append(p)
        else:
            tails[i], tail_at[i] = p[1], p
    out, p = [], tail_at[-1] if tail_at else None
    while p is not None:
        out.append(p)
        p = prev[p]
    return out[::-1]


def status(qmp_path):
    q = qmp_connect(qmp_path)
    try:
        return qmp(q, "query-status")["status"]
    finally:
        close(q)


def test_guest_runs_before_the_device_restore(guests, vmm_procs, tmp_path):
    """The guest runs again (resume) when the handoff thread started it, before the
    new VMM's device restore is done (on an idle host: before it has even loaded the
    blob); Python's take-over comes after, and the ticker goes on without its counter
    or clock going back."""
    old, old_qmp = start_ticker(vmm_procs, tmp_path, period=1000)
    new, sock, new_qmp = start_incoming(vmm_procs, tmp_path)
    old.wait_for(r"tick 20 ")
    assert early_transfer(old_qmp, sock)["status"] == "completed"
    info = new_info(new_qmp)
    steps = dict(info["x-steps"])
    marks = dict(info["x-timeline"])
    assert steps[EARLY_STEP] == marks["resume"]
    assert marks["stop"] < marks["transfer"] <= marks["restore"] < marks["resume"]
    # (on an idle host the guest runs before the blob is even loaded; under load the
    # thread may be scheduled later, but always before the device restore's claim)
    assert marks["resume"] < steps["new: restore done, the early start's claim made final"]
    assert steps["new: state blob loaded"] < steps["new: device state written"]
    take_over = next(t for s, t in steps.items() if s.startswith("new: early vCPU threads stopped"))
    assert steps["new: device state written"] \
        < steps["new: restore done, the early start's claim made final"] <= take_over
    assert 0 < info["x-downtime-us"] < 1_000_000
    last_old = ticks(old.text())[-1][0]
    new.wait_for(rf"tick {last_old + 50} ")
    assert_ticks_go_on(new, 5)
    assert status(new_qmp) == "running"


def test_failure_after_the_early_start_hands_the_guest_back(guests, vmm_procs, tmp_path):
    """The new VMM runs the guest early for a second (target-slow-restore), then its
    restore fails (target-restore): it stops the guest and hands it back; the old VMM
    writes that state into its vCPUs and resumes.  The guest ticked in the new VMM
    meanwhile, and the old VMM's ticks go on from there: nothing repeated, no clock
    going back (resuming the state saved at the stop would repeat those ticks)."""
    old, old_qmp = start_ticker(vmm_procs, tmp_path, period=1000)
    new, sock, _ = start_incoming(vmm_procs, tmp_path)
    old.wait_for(r"tick 20 ")
    info = early_transfer(old_qmp, sock, faults=["target-slow-restore", "target-restore"])
    assert info["status"] == "failed", info
    assert "gave it back" in info["error-desc"], info
    assert status(old_qmp) == "running"
    new.wait(15)
    in_new = ticks(new.text())
    assert len(in_new) > 50, new.text()[-500:]   # it ran there for about a second
    before = [t for t in ticks(old.text()) if t[0] < in_new[0][0]]
    old.wait_for(rf"tick {in_new[-1][0] + 20} ")
    after = [t for t in ticks(old.text()) if t[0] > in_new[-1][0]]
    # the old VMM's log: up to the stop, then on from the new VMM's last tick
    old_ns = [n for n, _ in ticks(old.text())]
    assert not set(old_ns) & {n for n, _ in in_new[:-1]}, "ticks run twice"
    joined = before + in_new + after
    assert_one_guest_history(joined)


def test_old_failing_after_the_handoff_gets_the_guest_back(guests, vmm_procs, tmp_path):
    """The old VMM fails after it handed the state over (fault point save, after the
    handoff): whether the new VMM's thread had started the guest or not, the old VMM
    ends up running it, and the ticker goes on."""
    old, old_qmp = start_ticker(vmm_procs, tmp_path, period=1000)
    new, sock, _ = start_incoming(vmm_procs, tmp_path)
    old.wait_for(r"tick 20 ")
    info = early_transfer(old_qmp, sock, faults=["save"])
    assert info["status"] == "failed", info
    assert status(old_qmp) == "running"
    new.wait(15)
    in_new = ticks(new.text())
    last = in_new[-1][0] if in_new else ticks(old.text())[-1][0]
    old.wait_for(rf"tick {last + 20} ")
    assert_one_guest_history(sorted(set(ticks(old.text())) | set(in_new)))


def test_early_start_is_opt_in(guests, vmm_procs, tmp_path):
    """Without x-early-start the new VMM runs the guest only once its restore is done
    and claimed, as before (a crash of it until then rolls back)."""
    old, old_qmp = start_ticker(vmm_procs, tmp_path, period=1000)
    new, sock, new_qmp = start_incoming(vmm_procs, tmp_path)
    old.wait_for(r"tick 20 ")
    assert cpr_transfer(old_qmp, sock)["status"] == "completed"
    steps = dict(new_info(new_qmp)["x-steps"])
    assert EARLY_STEP not in steps
    assert steps["new: guest claimed (\"go\": the point of no return)"] < \
        dict(new_info(new_qmp)["x-timeline"])["resume"]


@pytest.mark.parametrize("fault", TRANSFER_FAULTS)
def test_fault_with_early_start(guests, vmm_procs, tmp_path, fault):
    """Every fault point of a cpr-transfer, with the early start: the update fails and
    the old VMM runs the guest on (taken back before the new VMM's thread claimed it,
    or handed back after), except when the new VMM dies while it runs the guest
    (a target-crash-* point, once its thread started the guest): then the guest went
    with it, and the old VMM must not run it again (postmigrate), whatever the timing."""
    old, old_qmp = start_ticker(vmm_procs, tmp_path, period=1000)
    new, sock, _ = start_incoming(vmm_procs, tmp_path)
    old.wait_for(r"tick 20 ")
    info = early_transfer(old_qmp, sock, faults=[fault])
    assert info["status"] == "failed", info
    if info.get("x-after-go"):
        # (a crash point is named by where the new VMM's main thread dies; its handoff
        # thread may have started the guest by then, even before the fds came)
        assert fault in ("target-crash-before-fds", "target-crash-after-fds"), info
        assert "went with it" in info["error-desc"], info
        n = len(ticks(old.text()))
        time.sleep(0.3)
        assert len(ticks(old.text())) == n, "the old VMM runs a guest it gave away"
        # (in postmigrate; with no QMP client left connected it exits, as after "go")
        try:
            assert status(old_qmp) == "postmigrate"
        except (OSError, ConnectionError, Exception) as e:
            if isinstance(e, AssertionError):
                raise
            assert old.wait(10) is not None   # it exited instead
        return
    assert status(old_qmp) == "running"
    # (a new VMM never contacted, fault point prepare, waits on: its log is empty; one
    # that ran the guest early wrote its last byte before it handed the guest back)
    last = ticks(old.text())[-1][0]
    old.wait_for(rf"tick {last + 20} ")
    assert_one_guest_history(sorted(set(ticks(old.text())) | set(ticks(new.text()))))


def test_cancel_after_the_early_start_is_too_late(guests, vmm_procs, tmp_path):
    """migrate_cancel while the new VMM runs the guest early and restores its devices
    (target-slow-restore: a second): past the point of no return, so the update
    completes in the new VMM, as a cancel after "go" does."""
    old, old_qmp = start_ticker(vmm_procs, tmp_path, period=1000)
    new, sock, new_qmp = start_incoming(vmm_procs, tmp_path)
    old.wait_for(r"tick 20 ")
    q = qmp_connect(old_qmp)
    try:
        qmp(q, "migrate-set-parameters", **{"mode": "cpr-transfer", "x-early-start": True,
                                             "x-fault": ["target-slow-restore"]})
        addr = {"transport": "socket", "type": "unix", "path": str(sock)}
        qmp(q, "migrate", channels=[{"channel-type": "main", "addr": addr},
                                    {"channel-type": "cpr", "addr": addr}])
        time.sleep(0.3)
        qmp(q, "migrate_cancel")
        info = wait_migration(q)
    finally:
        close(q)
    assert info["status"] == "completed", info
    assert status(new_qmp) == "running"
    assert_ticks_go_on(new, 5)
