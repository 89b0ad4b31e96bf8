"""`pyvmm cpr`: drive a live update of a running pyvmm through its QMP socket.

With --trace it prints the sequence as a timeline, each step with its time,
so a student can read stop -> notify -> save -> transfer -> restore -> resume
against what each step does.  wait_migration() is the one wait on
`query-migrate` until a live update settles: the benchmarks and the tests use it too.
"""

from __future__ import annotations

import sys
import time

from ..cpr.timeline import PHASES
from ..errors import VmmError
from .qmp import START_WAIT_S, QmpClient, QmpError, wait_for_path

SETTLED = ("completed", "failed", "cancelled")


def wait_migration(query, timeout: float, *, gone=(QmpError, OSError, EOFError),
                   poll: float = 0.01) -> dict | None:
    """Poll `query()` (a `query-migrate` on the VMM the guest is leaving) until the
    live update settles: completed, failed or cancelled; that answer.  None if the
    VMM went away first (`query` raised one of `gone`): after a cpr-transfer the old
    VMM exits, after a cpr-exec its socket is the new image's.  VmmError after
    `timeout` seconds.  `query` is any callable, so any QMP client can ask (the
    tests use qemu.qmp's, as an independent client)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            info = query()
        except gone:
            return None
        if info.get("status") in SETTLED:
            return info
        time.sleep(poll)
    raise VmmError("timed out waiting for the live update to finish")


def cmd_cpr(args) -> int:
    mode = "cpr-" + args.mode
    if mode == "cpr-transfer" and not args.uri:
        raise VmmError("--mode transfer needs --uri PATH: the socket the new pyvmm was started "
                       "with (pyvmm run --incoming cpr-transfer:PATH)")
    if args.trace_plot:
        from .trace_plot import check
        check(args.trace_plot)
    params = {"mode": mode}
    if args.early_start:
        if mode != "cpr-transfer":
            raise VmmError("--early-start is for --mode transfer (a cpr-exec's new image "
                           "always starts the guest early)")
        params["x-early-start"] = True
    if args.fault:
        params["x-fault"] = args.fault.split(",")
    client = QmpClient(args.socket, timeout=args.timeout, wait=START_WAIT_S)
    # (a new pyvmm started a moment ago may not listen yet; if none comes, the VMM's own
    # refusal below says so)
    if mode == "cpr-transfer":
        wait_for_path(args.uri, START_WAIT_S, "new pyvmm's socket")
    started = False
    try:
        client.execute("migrate-set-parameters", **params)
        started = True   # (from here on the VMM may have begun: Ctrl-C does not stop it)
        if mode == "cpr-transfer":
            addr = {"transport": "socket", "type": "unix", "path": args.uri}
            client.execute("migrate", channels=[{"channel-type": "main", "addr": addr},
                                                {"channel-type": "cpr", "addr": addr}])
        else:
            client.execute("migrate", uri="exec:")
        info = _wait_for_result(client, args.timeout)
    except QmpError as e:
        raise VmmError(f"the VMM refused: {e}") from None
    except KeyboardInterrupt:
        if started:
            where = args.socket if mode == "cpr-exec" else f"{args.socket} (or the new VMM's)"
            print(f"pyvmm: interrupted; the live update goes on in the VMM: see its outcome "
                  f"with `pyvmm state --socket {where}` or QMP query-migrate "
                  "(migrate_cancel stops it before the point of no return)", file=sys.stderr)
        raise
    finally:
        client.close()

    if info is None:   # the old VMM went away: the new one reports the whole sequence
        new_socket = args.socket if mode == "cpr-exec" else args.new_qmp
        if new_socket:
            info = _query_new(new_socket, args.timeout)
        else:
            info = {"status": "completed"}
    status = info.get("status")
    if status != "completed" and args.trace:
        print_trace(info)
    if args.trace_plot:
        from .trace_plot import draw
        try:
            draw(info, args.trace_plot)
        except VmmError as e:   # (the update's own outcome, below, matters more)
            print(f"pyvmm: --trace-plot: {e}", file=sys.stderr)
    if status != "completed":
        where = ("the guest is no longer in the old pyvmm" if info.get("x-after-go")
                 else "the guest goes on in the old pyvmm")
        print(f"pyvmm: live update {status}: {info.get('error-desc', 'no reason given')}; "
              f"{where}", file=sys.stderr)
        return 1
    if args.trace:
        print_trace(info)
    if "x-downtime-us" in info:
        print(f"live update ({mode}) completed: downtime {info['x-downtime-us'] / 1000:.2f} ms "
              f"(stop -> guest running in the new pyvmm)")
    else:
        print(f"live update ({mode}) completed")
    return 0


def _wait_for_result(client, timeout: float):
    """The final MIGRATION status from the old VMM, or None if it exited/exec'd first."""
    info = wait_migration(lambda: client.execute("query-migrate"), timeout)
    if info is not None and info["status"] == "completed" and "x-downtime-us" not in info:
        return None
    return info


def _query_new(path: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            with QmpClient(path, timeout=5) as c:
                info = c.execute("query-migrate")
                if info:
                    return info
        except (OSError, EOFError, VmmError) as e:
            last = e
        time.sleep(0.02)
    raise VmmError(f"cannot reach the new pyvmm at {path}: {last}")


def print_trace(info: dict) -> None:
    """The timeline in causal order: phases and steps by their CLOCK_MONOTONIC stamps.

    Each step is stamped where it happens (a message's send before sendmsg, its
    receipt after recvmsg returns), and the clock is shared by every process, so
    time order is causal order: a receipt never precedes its send.  Steps of the
    cpr-exec prebuilder and of cpr-transfer's handoff thread (threads beside the
    new VMM's main thread) are caused by nothing around them: they are marked `‖`
    and only ordered by the clock."""
    from ..cpr.timeline import CONCURRENT, lane
    marks = info.get("x-timeline", [])
    if not marks:
        return
    what = dict(PHASES)
    t0 = marks[0][1]
    print(f"{'phase':<10} {'starts at':>12} {'takes':>11}   what happens")
    steps = sorted(info.get("x-steps", []), key=lambda s: s[1])
    concurrent = set()
    for i, (phase, t) in enumerate(marks):
        t_next = marks[i + 1][1] if i + 1 < len(marks) else None
        took = (t_next - t) / 1e6 if t_next is not None else None
        took_s = f"{took:8.3f} ms" if took is not None else "          -"
        print(f"{phase:<10} {(t - t0) / 1e6:9.3f} ms {took_s}   {what.get(phase, '')}")
        # the finer steps inside this phase (for the last one, from its start on: after a
        # cpr-exec's early start, Python's resume path runs while the guest does)
        for step, ts in steps:
            if (t <= ts < t_next) if t_next is not None else ts >= t:
                bullet = "·"
                if lane(step) in CONCURRENT:
                    bullet = "‖"
                    concurrent.add(lane(step))
                print(f"{'':<10} {(ts - t0) / 1e6:9.3f} ms {'':>11}   {bullet} {step}")
    print("(times: CLOCK_MONOTONIC, shared by both processes; each step is stamped where it "
          "happens, so a message's receipt comes after its send)")
    if "prebuilder" in concurrent:
        print("(‖: the prebuilder, a thread the new image starts before Python's main(); it "
              "runs beside the\n main thread, so its steps interleave with the main thread's "
              "by the clock, not by cause,\n until the main thread waits for it)")
    if "handoff" in concurrent:
        print("(‖: the handoff thread (--early-start), which the new pyvmm starts before "
              "\"prepared\"; it writes\n the VM and vCPU state the old one hands over and runs "
              "the guest, beside the main thread,\n so its step falls among the others by the "
              "clock, not by cause)")
