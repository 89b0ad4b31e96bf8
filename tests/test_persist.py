"""The device persistence contract (vmm/devices/__init__.py): each device's save -> blob ->
restore round trip, the devices part of the state schema, the conversion of a state
pyvmm 0.1.0 wrote, and a device added through the contract alone (scratch: one file and
a registry line) going through a real cpr-exec and a real cpr-transfer."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from bench.lab import netns_with_tap
from conftest import ROOT, need_kvm
from vmm.devices import KINDS, DeviceContext, State, device_class, entry
from vmm.devices.bus import Bus
from vmm.devices.compat import devices_from_0_1
from vmm.errors import VmmError
from vmm.schema import Int, Names, Schema, DeviceEntry
from vmm.state import StateError, dumps, loads

DEVICES = Schema("devices", Names(DeviceEntry(KINDS)))


class FakeVm:
    def __init__(self):
        self.irqs = []

    def irq_line(self, irq, level):
        self.irqs.append((irq, level))


def context(out=None, exits=None):
    out = [] if out is None else out
    exits = [] if exits is None else exits
    return DeviceContext(FakeVm(), None, Bus(), Bus(), out.append, exits.append, None)


def round_trip(dev, ctx, fds=None):
    """dev's entry through a blob and the schema, restored by its class into `ctx` and
    attached there; the new device's entry must be the saved one."""
    tree = DEVICES.check(loads(dumps({"d": {dev.id: entry(dev)}}))["d"])
    saved = tree[dev.id]
    cls = device_class(saved["kind"])
    new = cls.restore(ctx, cls.State.from_tree(saved["state"]), fds or {})
    new.attach(ctx)
    assert new.id == dev.id and entry(new) == saved
    return new


# -- the record -------------------------------------------------------------------------------
class Pair(State):
    FIELDS = {"a": Int(0, 9), "b": Int(0, 9)}


def test_state_is_typed_and_converts_to_a_tree_and_back():
    p = Pair(a=1, b=2)
    assert p.to_tree() == {"a": 1, "b": 2} and Pair.from_tree(p.to_tree()) == p
    assert p != Pair(a=1, b=3)
    with pytest.raises(TypeError, match=r"missing \['b'\], unknown \['c'\]"):
        Pair(a=1, c=2)


# -- one round trip per device ------------------------------------------------------------------
def test_every_registered_kind_has_a_device_class():
    for kind in KINDS:
        cls = device_class(kind)
        assert cls.KIND == kind and issubclass(cls.State, State)
    with pytest.raises(VmmError, match="no device kind 'nope'"):
        device_class("nope")


def test_serial_round_trip():
    ctx = context()
    dev = device_class("serial").create(ctx, 0, "")
    dev.attach(ctx)
    ctx.pio_bus.write(0x3F8 + 7, b"\x5a")     # scratch register
    ctx.pio_bus.write(0x3F8 + 3, b"\x03")     # LCR: 8N1
    dev.uart.enqueue_input(b"hi")
    ctx2 = context()
    new = round_trip(dev, ctx2)
    assert ctx2.pio_bus.read(0x3F8 + 7, 1) == b"\x5a"
    assert ctx2.pio_bus.read(0x3F8, 1) == b"h"    # the receive FIFO came along


def test_debug_exit_round_trip():
    ctx, exits = context(), []
    dev = device_class("debug-exit").create(ctx, 0, "")
    ctx2 = context(exits=exits)
    round_trip(dev, ctx2)
    ctx2.pio_bus.write(0xF4, b"\x07")
    assert exits == [7]                           # the new one reports to its own machine


def test_scratch_round_trip_and_options():
    ctx = context()
    dev = device_class("scratch").create(ctx, 0, "value=0x10")
    dev.attach(ctx)
    assert ctx.mmio_bus.read(0xD100_0000, 4) == (0x10).to_bytes(4, "little")
    ctx.mmio_bus.write(0xD100_0001, b"\x12")
    ctx2 = context()
    new = round_trip(dev, ctx2)
    assert new.value == 0x1210 and ctx2.mmio_bus.read(0xD100_0000, 2) == b"\x10\x12"
    for spec, message in (("value=x", "not a number"), ("size=4", "only option is value=N"),
                          ("value=0x100000000", "does not fit")):
        with pytest.raises(VmmError, match=message):
            device_class("scratch").create(ctx, 0, spec)
    with pytest.raises(VmmError, match="one at most"):
        device_class("scratch").create(ctx, 1, "")


@pytest.mark.parametrize("mutate,message", [
    (lambda e: e.update(kind="nope"), "devices: x.kind: 'nope' is not a device this pyvmm has"),
    (lambda e: e.update(version=2),
     "devices: x.version: scratch state version 2, this pyvmm reads version 1"),
    (lambda e: e["state"].update(value="1"), "devices: x.state.value: expected int, got str"),
    (lambda e: e.pop("fds"), "devices: x.fds: missing"),
])
def test_schema_checks_a_device_entry_by_its_kind(mutate, message):
    e = entry(device_class("scratch").create(context(), 0, ""))
    mutate(e)
    with pytest.raises(StateError) as err:
        DEVICES.check({"x": e})
    assert str(err.value) == message


def test_a_net_state_of_another_version_is_converted_or_refused():
    """Version 1 (before the control queue) is converted for the check; one that cannot be
    converted, or a version never written, is refused naming what is wrong."""
    v1 = loads((ROOT / "tests/data/devices-net-v1.state").read_bytes())["devices"]
    assert DEVICES.check(v1) is v1 and v1["net0"]["version"] == 1   # (checked, not changed)
    assert len(v1["net0"]["state"]["transport"]["queues"]) == 2
    broken = dict(v1["net0"], state=dict(v1["net0"]["state"], virtio=None))
    with pytest.raises(StateError) as err:
        DEVICES.check({"net0": broken})
    assert str(err.value) == ("devices: net0.state: net state version 1 is malformed: it "
                              "cannot be converted")
    for version in (0, 3):
        with pytest.raises(StateError) as err:
            DEVICES.check({"net0": dict(v1["net0"], version=version)})
        assert str(err.value) == (f"devices: net0.version: net state version {version}, this "
                                  "pyvmm reads version 2")


def test_devices_from_0_1_leaves_other_trees_as_they_are():
    """A tree already in this layout (a state that says no version is taken for 0.1.0's)
    or not a devices tree at all is returned unchanged, for the schema to judge."""
    current = {"serial": entry(device_class("serial").create(context(), 0, ""))}
    for tree in (current, {}, {"serial": 5}, []):
        assert devices_from_0_1(tree) is tree
    v01 = loads((ROOT / "tests/data/devices-0.1.0.state").read_bytes())["devices"]
    converted = devices_from_0_1(v01)
    assert list(converted) == ["serial", "debug-exit", "net0"]
    assert devices_from_0_1(converted) is converted


# -- the net device, and a state pyvmm 0.1.0 wrote, on real KVM -----------------------------------
NET_ROUND_TRIP = """
import json, os, sys, time
from vmm import state as fmt
from vmm.devices.compat import devices_from_0_1
from vmm.machine import Machine, MachineConfig
from vmm.schema import check

def machine(**kw):
    return Machine(MachineConfig(memory=64 << 20, console=lambda data: None, **kw))

out = []
old = Machine(MachineConfig(kernel=sys.argv[1], memory=64 << 20, console=out.append,
                            nets=[f"tap,ifname={sys.argv[2]}"], cmdline="stats=0 announce=1"))
new = legacy = older = None
try:
    old.create(); old.boot(); old.start()
    deadline = time.monotonic() + 20
    while b"netecho: ctrl class" not in b"".join(out):
        assert time.monotonic() < deadline, b"".join(out)
        time.sleep(0.02)
    old.pause()
    asked = old.device("net0").announce()   # the paused guest cannot ack it: saved as set
    old.quiesce_devices()
    state = fmt.loads(fmt.dumps(old.save_state()))
    check("saved", state)
    old.notify_devices("setup")
    tap = old.cpr_fds()["net0.tap"]
    new = machine(); new.create(restoring=True)
    new.restore_devices(state, {"net0.tap": os.dup(tap)})
    net = new.device("net0")
    result = {"same": new.save_devices() == state["devices"],
              "activated": net.transport.activated, "asked": asked,
              "announce": net.virtio.announce, "config_status": net.transport.read(0x106, 2).hex(),
              "ctrl_next_avail": net.transport.queues[2].next_avail,
              "ctrl_ready": net.transport.queues[2].ready}

    # 0.1.0's tree (tests/data/devices-0.1.0.state, saved by 0.1.0 from netecho), converted
    v01 = fmt.loads(open(sys.argv[3], "rb").read())["devices"]
    converted = devices_from_0_1(v01)
    check("saved", dict(state, devices=converted))
    legacy = machine(); legacy.create(restoring=True)
    legacy.restore_devices({"devices": converted}, {"net0.tap": os.dup(tap)})
    net = legacy.device("net0")
    result["v01_queues"] = [[q.num, q.desc, q.avail, q.used, q.next_avail]
                            for q in net.transport.queues]
    result["v01_mac"] = net.virtio.mac.hex()
    result["v01_activated"] = net.transport.activated
    result["v01_serial_lcr"] = legacy.device("serial").uart.lcr
    legacy.close()
    legacy = None

    # a net state of version 1 (the previous layout, before the control queue; saved by
    # that pyvmm from netecho: tests/data/devices-net-v1.state) passes the schema and restores
    v1 = fmt.loads(open(sys.argv[4], "rb").read())["devices"]
    check("saved", dict(state, devices=v1))
    older = machine(); older.create(restoring=True)
    older.restore_devices({"devices": v1}, {"net0.tap": os.dup(tap)})
    net = older.device("net0")
    result["v1_version"] = v1["net0"]["version"]
    result["v1_queues"] = [[q.num, q.ready, q.next_avail] for q in net.transport.queues]
    result["v1_activated"] = net.transport.activated
    result["v1_announce"] = net.virtio.announce
    result["v1_saves_as"] = older.save_devices()["net0"]["version"]
    print(json.dumps(result))
finally:
    for m in (old, new, legacy, older):
        if m is not None:
            m.close()
"""


def test_net_round_trip_and_a_0_1_0_state(guests):
    """A netecho guest's live virtio-net device saved and restored into another machine on
    the same tap: the new device saves exactly what the old one did (its control queue and
    a pending announce request too); a net state of the previous version (1) restores.  Then the devices of a
    state pyvmm 0.1.0 saved (queues twice: addresses with the transport, ring positions
    with the device) converted by devices_from_0_1 pass the schema and restore, with the
    addresses from the transport's copy and the positions from the device's."""
    need_kvm()
    v01 = loads((ROOT / "tests/data/devices-0.1.0.state").read_bytes())["devices"]
    with netns_with_tap() as (ns, tap):
        p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", NET_ROUND_TRIP,
                            str(guests / "netecho.elf"), tap,
                            str(ROOT / "tests/data/devices-0.1.0.state"),
                            str(ROOT / "tests/data/devices-net-v1.state")],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["same"] and out["activated"]
    # netecho announce=1 negotiated the control queue and sent one command on it (its probe
    # of an unknown class); the announce request, not acked before the pause, came along
    assert out["asked"] and out["announce"] and out["config_status"] == "0300"
    assert out["ctrl_ready"] and out["ctrl_next_avail"] == 1
    t = v01["nets"][0]["transport"]
    assert out["v01_queues"][:2] == [[q["num"], q["desc"], q["driver"], q["device"],
                                      ring["last_avail_idx"]]
                                     for q, ring in zip(t["queues"], t["device"]["queues"])]
    assert out["v01_queues"][2] == [64, 0, 0, 0, 0]   # the control queue, never set up
    assert out["v01_queues"][0][4] == 3       # netecho had taken 3 RX buffers' worth
    assert out["v01_mac"] == t["device"]["mac"].hex() and out["v01_activated"]
    assert out["v01_serial_lcr"] == v01["serial"]["lcr"]
    # version 1: two queues (both set up by netecho), a third (the control queue) added unset
    assert out["v1_version"] == 1 and out["v1_activated"] and out["v1_announce"] is False
    assert [q[:2] for q in out["v1_queues"]] == [[256, True], [256, True], [64, False]]
    assert out["v1_saves_as"] == 2


# -- a device added through the contract alone, through both live updates --------------------------
SCRATCH_TICK = re.compile(r"tick (\d+) t_us=\d+ maxgap_us=\d+ scratch=(\d+)")


def scratch_value(qmp_path) -> int:
    from test_cpr import close, qmp, qmp_connect
    q = qmp_connect(qmp_path)
    try:
        devices = qmp(q, "x-query-state")["devices"]
    finally:
        close(q)
    return next(d["value"] for d in devices if d["name"] == "scratch")


def test_scratch_device_goes_through_cpr_exec_and_cpr_transfer(guests, vmm_procs, tmp_path):
    """The ticker adds one to the scratch register every tick and prints what it read:
    across a cpr-exec and then a cpr-transfer every line reads 1000 + ticks before it, so
    the register's value went with the guest both times (a lost or reset state would
    restart it), and the host sees it too (x-query-state)."""
    need_kvm()
    from test_cpr import cpr_exec, cpr_transfer, new_info, start_incoming
    old_qmp = tmp_path / "old.qmp"
    old = vmm_procs(["run", "--kernel", str(guests / "ticker.elf"), "--qmp", str(old_qmp),
                     "--cmdline", "period_us=20000 scratch=0xd1000000",
                     "--device", "scratch,value=1000"])
    old.wait_for(r"tick 5 ")
    assert cpr_exec(old_qmp) is None
    assert new_info(old_qmp)["mode"] == "cpr-exec"
    n = int(SCRATCH_TICK.findall(old.text())[-1][0])
    old.wait_for(rf"tick {n + 5} ")
    assert scratch_value(old_qmp) >= 1000 + n + 5
    new, sock, new_qmp = start_incoming(vmm_procs, tmp_path)
    cpr_transfer(old_qmp, sock)
    assert old.wait(15) == 0
    assert new_info(new_qmp)["mode"] == "cpr-transfer"
    n = int(SCRATCH_TICK.findall(old.text())[-1][0])
    new.wait_for(rf"tick {n + 5} ")
    lines = SCRATCH_TICK.findall(old.text() + new.text())
    assert len(lines) >= 15
    assert [int(v) for _, v in lines] == [1000 + int(t) - 1 for t, _ in lines]
    assert [int(t) for t, _ in lines] == list(range(1, len(lines) + 1))
    assert scratch_value(new_qmp) >= 1000 + n + 5


def test_a_kind_that_passes_fds_imports_its_restore_path_before_the_stop(guests):
    """warm_up_restore (a new VMM, before the stop) cannot build a throwaway net device
    (it would open a tap), but imports what its restore needs: 1-2 ms of imports that
    ran inside the downtime before."""
    script = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from vmm.machine import Machine, MachineConfig
m = Machine(MachineConfig(kernel={str(guests / 'hello.elf')!r}, memory=16 << 20,
                          console=lambda b: None))
m.create()
wanted = ("vmm.net.tap", "vmm.net.backend_c", "vmm.devices.virtio_net", "fcntl")
before = [name for name in wanted if name in sys.modules]
m.warm_up_restore(["serial", "net"])
print(before, [name for name in wanted if name not in sys.modules])
m.close()
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("[]"), r.stdout   # every one imported by the warm-up
    assert "vmm.net.tap" not in r.stdout.split("]")[0], r.stdout   # (and not before it)
