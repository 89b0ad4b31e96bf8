"""Device states written by earlier pyvmm releases, in this release's layout.

vmm/compat.py (the state tree's one conversion entry point, before the schema
check) calls devices_from_0_1 for a blob pyvmm 0.1.0 wrote (format 3).  Never
imported on a resume of a current state.
"""

from __future__ import annotations


def devices_from_0_1(devices: dict) -> dict:
    """See _convert.  A tree not shaped as 0.1.0's (its serial state has no "kind"
    beside its registers) is returned as it is: one already in this layout (a state
    that says no version is taken for 0.1.0's), or one the schema check that follows
    will name what is wrong with."""
    serial = devices.get("serial") if isinstance(devices, dict) else None
    if not isinstance(serial, dict) or "kind" in serial:
        return devices
    try:
        return _convert(devices)
    except (KeyError, TypeError, AttributeError, ValueError):
        return devices


def _convert(devices: dict) -> dict:
    """The `state["devices"]` subtree pyvmm 0.1.0 wrote (blob format 3), in this
    release's layout.

    0.1.0: {"serial": {...}, "debug_exit": {}, "nets": [{"index", "backend", "tap",
    "transport": {..., "queues": [{num, ready, desc, driver, device}], "device":
    {"features", "active", "queues": [{num, desc, avail, used, ready, last_avail_idx}],
    "status", "config", "mac", "isr"}}}]}: each queue was saved twice.  0.1.0's
    restore took the addresses from the transport's copy and the ring position
    (last_avail_idx) from the device's, so the one queue state here does too.
    """
    out = {"serial": {"kind": "serial", "version": 1, "fds": [], "state": devices["serial"]},
           "debug-exit": {"kind": "debug-exit", "version": 1, "fds": [], "state": {}}}
    for net in devices.get("nets", []):
        transport = dict(net["transport"])
        device = transport.pop("device")
        transport["queues"] = [
            {"num": q["num"], "ready": bool(q["ready"]), "desc": q["desc"], "avail": q["driver"],
             "used": q["device"], "next_avail": ring["last_avail_idx"]}
            for q, ring in zip(transport["queues"], device["queues"])]
        virtio = {"features": device["features"], "status": device["status"],
                  "mac": device["mac"], "isr": device["isr"]}
        out[f"net{net['index']}"] = {
            "kind": "net", "version": 1, "fds": ["tap"],
            "state": {"index": net["index"], "backend": net["backend"], "tap": net["tap"],
                      "transport": transport, "virtio": virtio}}
    return out
