"""The guest's and the host's view of the ticker's heartbeat across a live update.

The ticker guest prints `tick N t_us=T maxgap_us=G` every HEARTBEAT_US; the host
stamps each line as it arrives (bench/lab.py WatchedProcess).  From those lines:
the guest's own largest gap, its clock between two ticks, and the host's gap.
"""

from __future__ import annotations

import re

from bench.lab import WatchedProcess

TICK_RX = re.compile(r"tick (\d+) t_us=(\d+) maxgap_us=(\d+)")


def joined_lines(procs: list[WatchedProcess]) -> list[tuple[float, str]]:
    """Stdout of the VMMs that ran the guest one after another, a split line joined."""
    out: list[tuple[float, str]] = []
    carry = ""
    for i, p in enumerate(procs):
        lines = p.snapshot()
        if carry and lines:
            lines[0] = (lines[0][0], carry + lines[0][1])
            carry = ""
        if p.partial and lines and i + 1 < len(procs):
            carry = lines.pop()[1]
        out += lines
    return out


def heartbeat_views(lines, t_cmd: float, t_done: float) -> dict:
    """Guest maxgap before/after the update; largest host-side gap between two ticks."""
    ticks = [(t, int(m.group(1)), int(m.group(3)), int(m.group(2))) for t, line in lines
             if (m := TICK_RX.search(line))]
    before = [x for x in ticks if x[0] < t_cmd]
    after = [x for x in ticks if x[0] >= t_cmd]
    if not before or not after:
        return {}
    window = [before[-1]] + [x for x in after if x[0] <= t_done + 0.2]
    gaps = [(b[0] - a[0]) * 1e6 for a, b in zip(window, window[1:])]
    ns = [x[1] for x in window]
    gmax_before = before[-1][2]
    gmax_after = max(x[2] for x in window)
    # the guest's own clock (t_us, from its TSC) between two consecutive ticks: unlike
    # maxgap it also sees a pause that caught the guest inside its write syscall
    tgaps = [b[3] - a[3] for a, b in zip(window, window[1:]) if b[1] == a[1] + 1]
    return {"heartbeat_gap_us": max(gaps) if gaps else None,
            "guest_tick_gap_us": max(tgaps) if tgaps else None,
            "guest_maxgap_before_us": gmax_before,
            "guest_maxgap_after_us": gmax_after,
            # the guest's gap is visible only if it beat the largest one seen before
            "guest_gap_us": gmax_after if gmax_after > gmax_before else None,
            "ticks_continuous": ns == list(range(ns[0], ns[0] + len(ns)))}
