"""vmm/schema.py against what pyvmm really saves: every field a machine saves is
described (so the schema cannot fall behind the save side), and what it saves passes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, need_kvm
from bench.lab import netns_with_tap

SAVE_AND_CHECK = """
import json, sys
from vmm.machine import Machine, MachineConfig
from vmm.schema import check, undescribed
m = Machine(MachineConfig(kernel=sys.argv[1], memory=64 << 20, vcpus=2,
                          console=lambda data: None, nets=[f"tap,ifname={sys.argv[2]}"],
                          devices=["scratch"]))
try:
    m.create()
    m.boot()
    state = m.save_state()
    check("saved", state)
    check("shape", m.shape())
    print(json.dumps({"undescribed": undescribed("saved", state),
                      "devices": {id: d["kind"] for id, d in state["devices"].items()}}))
finally:
    m.close()
"""


def test_schema_describes_every_field_a_machine_saves(guests):
    """A 2-vCPU machine with a virtio-net and a scratch device: its save_state() passes the schema and
    has no field the schema does not name.  (A new field saved without its schema entry
    fails here.)"""
    need_kvm()
    with netns_with_tap() as (ns, tap):
        p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", SAVE_AND_CHECK,
                            str(guests / "ticker.elf"), tap], cwd=ROOT, capture_output=True,
                           text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out == {"undescribed": [], "devices": {"serial": "serial", "debug-exit": "debug-exit",
                                                  "scratch": "scratch", "net0": "net"}}, out


def test_undescribed_finds_a_new_field():
    """The check above can fail: a field the schema does not name is reported by path."""
    from vmm.schema import undescribed
    shape = {"arch": "x86_64", "vcpus": 1, "memory": {"size": 1 << 26, "new": 1},
             "cpuid": [b"\0" * 8], "extra": 2}
    assert undescribed("shape", shape) == ["memory.new", "extra"]


@pytest.mark.parametrize("tree,message", [
    ([], "shape: expected map, got list"),
    ({"arch": "arm64"}, "shape: arch: 'arm64' is not one of 'x86_64'"),
    ({"arch": "x86_64", "vcpus": True}, "shape: vcpus: expected int, got bool"),
    ({"arch": "x86_64", "vcpus": 65}, "shape: vcpus: 65 is out of range 1..64"),
])
def test_shape_refusals_name_the_field(tree, message):
    from vmm.schema import check
    from vmm.state import StateError
    with pytest.raises(StateError) as e:
        check("shape", tree)
    assert str(e.value) == message
