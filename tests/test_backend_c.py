"""What only the C data path (csrc/vnet.c, virtq.c) has: walk_chain, the synchronous poll,
errno-level control errors, the 64 KiB frame limit, memory-table changes while running.

What every backend must do is in test_datapath.py, on the same driver-side rig
(tests/virtq_driver.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

try:
    from vmm.net import _vnet  # noqa: F401
except ImportError:
    subprocess.run([sys.executable, str(ROOT / "vmm/net/_build_vnet.py")], check=True,
                   cwd=ROOT, stdout=subprocess.DEVNULL)

from virtq_driver import (EVENT_IDX, F_NEXT, HALF, INDIRECT_DESC, RX,  # noqa: E402
                          TX, VERSION_1, Rig, frame, wait_for)
from vmm.errors import DeviceError  # noqa: E402
from vmm.net.backend_c import CNetBackend  # noqa: E402


@pytest.fixture
def make_rig():
    rigs = []

    def make(**kw):
        rigs.append(Rig(CNetBackend, **kw))
        return rigs[-1]
    yield make
    for r in rigs:
        r.close()


@pytest.fixture
def rig(make_rig):
    return make_rig()


def test_queue_indices_agree_with_the_header():
    """The C side numbers the queues in csrc/vnet.h; Python everywhere in vmm.net."""
    from vmm.net import RX, TX
    from vmm.net.backend_c import lib
    assert (lib.VNET_RX, lib.VNET_TX, lib.VNET_NQUEUES) == (RX, TX, 2)


def test_walk_chain_reports_without_breaking(make_rig):
    r = make_rig(features=VERSION_1 | INDIRECT_DESC)
    pkt = frame(5, 600)
    h = r.post_tx_indirect(pkt)
    assert r.dev.walk_chain(TX, h) == (3, len(pkt))
    a, n = r.txq.buf(frame(0))
    r.txq.put_desc(1, a, n, F_NEXT, 2)             # a loop: 1 -> 2 -> 1
    r.txq.put_desc(2, a, n, F_NEXT, 1)
    with pytest.raises(DeviceError) as e:
        r.dev.walk_chain(TX, 1)
    assert e.value.errno == 40                     # ELOOP
    with pytest.raises(DeviceError):
        r.dev.walk_chain(TX, 256)
    assert r.dev.error() is None


def test_poll_is_one_synchronous_pass(make_rig):
    """poll() (the fuzzer's entry, and a test's) moves what is queued and decides the
    interrupts before it returns; it refuses while the thread runs."""
    r = make_rig(features=VERSION_1 | EVENT_IDX)
    r.post_tx(frame(0))
    r.dev.poll()
    assert r.txq.used_idx() == 1 and r.calls(TX) == 1
    r.txq.set_used_event(2)
    r.post_tx(frame(1))
    r.dev.poll()
    assert r.txq.used_idx() == 2 and r.calls(TX) == 0   # used 1 -> 2 does not pass 2
    r.post_tx(frame(2))
    r.dev.poll()
    assert r.txq.used_idx() == 3 and r.calls(TX) == 1   # used 2 -> 3 does
    assert [r.peer.recv(200) for _ in range(3)] == [frame(i) for i in range(3)]
    r.dev.start()
    with pytest.raises(DeviceError) as e:
        r.dev.poll()
    assert e.value.errno == 16                          # EBUSY
    r.dev.stop()


def test_tx_chain_longer_than_a_frame_breaks_device(make_rig):
    """The C path refuses a TX chain longer than any frame (64 KiB and the header); the
    Python path leaves that to the tap (which refuses it: tx_dropped)."""
    r = make_rig(table="lower-half")
    r.txq.add([(0x400000, 40000, 0), (0x500000, 40000, 0)])
    r.dev.start()
    r.kick_q(TX)
    assert wait_for(lambda: r.dev.error() is not None)
    assert "longer than" in r.dev.error()
    r.dev.stop()
    assert r.dev.get_vring_base(TX) == 0 and r.txq.used_idx() == 0


def test_set_owner_twice_is_ebusy():
    d = CNetBackend()
    with pytest.raises(DeviceError) as e:
        d.set_features(VERSION_1)
    assert e.value.errno == 1          # EPERM: not owned
    d.set_owner()
    with pytest.raises(DeviceError) as e:
        d.set_owner()
    assert e.value.errno == 16         # EBUSY
    assert "busy" in str(e.value)
    d.reset_owner()
    d.set_owner()
    d.close()


def test_control_errors(rig):
    with pytest.raises(DeviceError):
        rig.dev.set_vring_num(RX, 100)           # not a power of two
    with pytest.raises(DeviceError):
        rig.dev.set_vring_num(5, 256)
    with pytest.raises(DeviceError):
        rig.dev.set_vring_addr(TX, 0x1008, 0, 0)  # misaligned descriptor table
    with pytest.raises(DeviceError):
        rig.dev.set_mem_table([(0, 1 << 20, 0x1000), (0x80000, 1 << 20, 0x200000)])  # overlap
    with pytest.raises(DeviceError):
        rig.dev.set_mem_table([(0xFFFF_FFFF_FFFF_0000, 1 << 20, 0x1000)])  # wraps
    with pytest.raises(DeviceError):
        rig.dev.set_features(1 << 34)            # packed ring
    with pytest.raises(DeviceError):
        rig.dev.set_backend(rig.dev_sock.fileno(), 7)
    rig.dev.start()
    with pytest.raises(DeviceError) as e:
        rig.dev.set_vring_num(RX, 128)
    assert e.value.errno == 16
    rig.dev.stop()


def test_mem_table_change_while_running(rig):
    rig.dev.start()
    with pytest.raises(DeviceError):             # would leave the rings unmapped
        rig.dev.set_mem_table([(0, 0x10000, rig.mem.host_base)])
    rig.dev.set_mem_table([(0, HALF, rig.mem.host_base)])
    rig.txq.add([(HALF + 0x100, 100, 0)])        # now outside the table
    rig.kick_q(TX)
    assert wait_for(lambda: rig.dev.error() is not None)
    assert "outside guest memory" in rig.dev.error()
    rig.dev.stop()
