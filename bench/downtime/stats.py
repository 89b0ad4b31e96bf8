"""Statistics over the sweep's records (one dict per live update)."""

from __future__ import annotations

import statistics

from vmm.cpr.timeline import PHASES as TIMELINE

# The phases a record's `phases_us` holds: the timeline's from the stop to the resume (the
# downtime of an update that completed: no setup before it, no rollback instead of it).
PHASES = [name for name, _ in TIMELINE if name not in ("setup", "rollback")]


def pct(values, q):
    v = sorted(values)
    if not v:
        return None
    k = (len(v) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def summary(values):
    v = [x for x in values if x is not None]
    if not v:
        return None
    return {"n": len(v), "median": statistics.median(v), "p95": pct(v, 0.95), "max": max(v)}


def paired(r) -> bool:
    """A pyvmm update run beside QEMU 10 (bench/downtime/qemu10.py): measured through
    the serial FIFO, reported in its own section, not mixed into the sweep's rows."""
    return r.get("vs") == "qemu10" and r["mode"] in ("exec", "transfer")


def group(records):
    """The RAM/load matrix's records by (mode, size, ram, load); the vCPU sweep's
    (`vcpus` set) and the QEMU 10 pairs have sections of their own."""
    groups: dict[tuple, list] = {}
    for r in records:
        if paired(r) or "vcpus" in r:
            continue
        groups.setdefault((r["mode"], r["size"], r["ram"], r["load"]), []).append(r)
    return groups
