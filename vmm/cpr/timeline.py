"""Timestamps of each live-update phase, comparable across the two processes.

CLOCK_MONOTONIC is system-wide, so a mark taken in the old VMM and one taken
in the new VMM can be subtracted: that is how the host view of downtime runs
from the stop in the old process to the guest running in the new one.
"""

from __future__ import annotations

import time

# The phases in order, with what each one does (printed by `pyvmm cpr --trace`).
PHASES = [
    ("setup", "old: connect to the new pyvmm, pass RAM memfds, new maps RAM and builds an empty VM"),
    ("stop", "old: pause every vCPU (state consistent)"),
    ("quiesce", "old: stop each device's data path, read ring indices"),
    ("notify", "old: notifiers (setup): each device releases what it owns"),
    ("save", "old: save all state into a versioned, checksummed blob"),
    ("transfer", "old: pass the state and device fds (SCM_RIGHTS or exec)"),
    ("restore", "new: load the blob, write vCPU/VM/device state, re-own devices"),
    ("resume", "new: start the vCPUs: the guest runs again"),
    ("rollback", "old: the update failed: devices taken back, the guest runs on here"),
]


# Who runs each step, from its name's prefix (the lanes of `pyvmm cpr --trace-plot`).
# Steps of a thread that runs beside the main one (the cpr-exec prebuilder, the
# cpr-transfer handoff) are not caused by the steps around them: `--trace` flags them
# as concurrent.
CONCURRENT = ("prebuilder", "handoff")


def lane(step: str) -> str:
    """'old', 'new', 'prebuilder' (a thread of the new image), 'handoff' (a thread of
    cpr-transfer's new VMM) or 'holder'."""
    head = step.split(" ", 1)[0].rstrip(":")
    if head in CONCURRENT or head == "holder":
        return head
    return "old" if head == "old" else "new"


def now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


class Timeline:
    """Ordered (phase, start_ns) marks; a phase ends where the next one starts."""

    def __init__(self, marks=None, steps=None):
        self.marks: list[list] = [list(m) for m in (marks or [])]
        self.steps: list[list] = [list(m) for m in (steps or [])]   # finer, within phases

    def step(self, what: str, t: int | None = None) -> int:
        """A finer mark inside a phase (`pyvmm cpr --trace` prints it under its phase)."""
        t = now_ns() if t is None else t
        self.steps.append([what, t])
        return t

    def mark(self, phase: str, t: int | None = None) -> int:
        t = now_ns() if t is None else t
        self.marks.append([phase, t])
        return t

    def get(self, phase: str) -> int | None:
        for name, t in self.marks:
            if name == phase:
                return t
        return None

    def durations_us(self) -> dict[str, float]:
        """Phase -> microseconds until the next mark."""
        out = {}
        for (name, t), (_, t_next) in zip(self.marks, self.marks[1:]):
            out[name] = (t_next - t) / 1000
        return out

    def span_us(self, first: str, last: str) -> float | None:
        a, b = self.get(first), self.get(last)
        return None if a is None or b is None else (b - a) / 1000


def timeline_info(tl, mode) -> dict:
    """query-migrate in the new VMM: the whole sequence, both processes' marks."""
    info = {"status": "completed", "mode": mode}
    downtime = tl.span_us("stop", "resume")
    if downtime is not None:
        info["downtime"] = round(downtime / 1000)
        info["x-downtime-us"] = round(downtime, 1)
    first = "setup" if tl.get("setup") else "stop"
    total = tl.span_us(first, "resume")
    if total is not None:
        info["total-time"] = round(total / 1000)
        info["x-total-time-us"] = round(total, 1)
    if tl.get("setup") is not None and tl.get("stop") is not None:
        info["setup-time"] = round(tl.span_us("setup", "stop") / 1000)
    info["x-phases-us"] = {k: round(v, 1) for k, v in tl.durations_us().items()}
    info["x-timeline"] = tl.marks
    info["x-steps"] = sorted(tl.steps, key=lambda s: s[1])
    return info
