"""One pyvmm configuration of the sweep: `reps` live updates, one record each."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from bench.downtime.heartbeat import heartbeat_views, joined_lines
from bench.downtime.stats import PHASES
from bench.lab import GUEST_IP, in_ns, netns_with_tap, wait_until_no_child
from bench.vmms import (ROOT, THIS, BenchError, Cleanup, Guest, do_update, qmp_connect,
                        start_incoming, start_vmm)
from vmm.memory import GiB


def steps_after_stop(info: dict) -> list:
    """query-migrate's finer steps as [what, µs after the stop], kept in results.json
    so that a slow update can be explained afterwards."""
    t_stop = dict(info.get("x-timeline", [])).get("stop")
    if t_stop is None:
        return []
    return [[what, (t - t_stop) / 1000] for what, t in info.get("x-steps", [])]


def run_pyvmm(reg: Cleanup, mode: str, size: int, ram: str, load: str, reps: int,
              on_rep, source=THIS, vcpus: int | None = None) -> list[dict]:
    """`reps` live updates of one configuration; one record per update.

    The ticker guest is booted afresh for each update (its maxgap is a running
    maximum); the pattern guest is booted once, touches all its RAM, and then
    is updated `reps` times in a row (chained new VMMs for cpr-transfer), and so is
    the vCPU sweep's smp guest (`vcpus`: every vCPU busy, IPIs in flight).  With an
    older `source` (an upgrade) every update starts from a guest booted under it.
    """
    g = Guest(ram, load, size, vcpus)
    results = []
    ns = tap = None
    if load == "udp":
        ns, tap = reg.stack.enter_context(netns_with_tap())
    fresh_each = g.ticks or load == "udp" or source is not THIS
    cur = cur_qmp = None
    n = 0
    for rep in range(reps):
        if cur is None or fresh_each:
            reg.reap()
            cur, cur_qmp = start_vmm(reg, g, f"vm{rep}", ns, tap, source)
            chain = [cur]
            cur.wait_for(g.ready, timeout=max(60, size / GiB * 40))
            from_version = None
            if source is not THIS:   # what really ran the guest before the update
                with qmp_connect(cur_qmp) as q:
                    from_version = q.execute("query-version")["package"]
        time.sleep(0.2 if g.ticks else 0.05)
        sock = new_qmp = None
        if mode == "transfer":
            n += 1
            new, sock, new_qmp = start_incoming(reg, f"new{n}", ns)
        stream = None
        if load == "udp":
            stream = subprocess.Popen(in_ns(ns, sys.executable, "-m", "bench.traffic", GUEST_IP,
                                            "1500", "0.001"), stdout=subprocess.PIPE,
                                      text=True, cwd=ROOT)
            time.sleep(0.5)
        try:
            info, t_cmd, t_done = do_update(mode, cur_qmp, sock, new_qmp, source.exec_command)
        except BaseException:
            if stream:
                stream.kill()
                stream.wait()
            raise
        if mode == "exec":
            # Let the holder tear the old VM down (at nice 19) before the next update:
            # each update is measured from a settled host, not on top of the last one's exit.
            wait_until_no_child(cur.pid, lambda comm, state: comm == "pyvmm-holder", 30)
        rec = {"mode": mode, "size": size, "ram": ram, "load": load, "rep": rep,
               "host_us": info["x-downtime-us"],
               "phases_us": {k: info.get("x-phases-us", {}).get(k) for k in PHASES},
               "steps_us": steps_after_stop(info)}
        if from_version:
            rec["from"] = from_version
        if vcpus is not None:
            rec["vcpus"] = vcpus
        if mode == "transfer":
            chain.append(new)
            if cur.proc.wait(30) != 0:
                raise BenchError(f"old pyvmm exited {cur.proc.returncode}: {cur.stderr[-2000:]}")
            cur, cur_qmp = new, new_qmp
        if g.ticks:
            time.sleep(0.3)
            rec.update(heartbeat_views(joined_lines(chain), t_cmd, t_done))
        if stream:
            out, _ = stream.communicate(timeout=60)
            r = json.loads(out)
            got = r["got"]
            rec.update({"net_gap_us": r["max_gap_ms"] * 1000 if r["max_gap_ms"] else None,
                        "udp_sent": r["sent"], "udp_lost": r["sent"] - len(set(got)),
                        "udp_dup": len(got) - len(set(got))})
        results.append(rec)
        on_rep()
    reg.reap()
    return results
