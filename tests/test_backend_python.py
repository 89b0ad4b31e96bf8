"""What only the Python data path (vmm/net/backend_python.py) has: running without a GuestMemory
(views of the memory table's host addresses) and its control errors' messages.

What every backend must do is in test_datapath.py, on the same driver-side rig
(tests/virtq_driver.py).
"""

import pytest

from virtq_driver import HALF, TX, Rig, frame, wait_for
from vmm.errors import DeviceError
from vmm.memory import GuestMemory, MiB
from vmm.net.backend_python import PyNetBackend


def test_host_address_table():
    """Without a GuestMemory the backend reaches RAM through the table's host addresses,
    and only what the table holds."""
    r = Rig(lambda mem: PyNetBackend(None), table="lower-half")
    try:
        r.post_tx(frame(33))
        r.dev.start()
        r.kick_q(TX)
        assert r.peer.recv(4096) == frame(33)
        r.txq.wait_used(1)
        r.txq.add([(HALF + 0x100, 100, 0)])       # in RAM, not in the table
        r.kick_q(TX)
        assert wait_for(lambda: r.dev.error() is not None)
        assert "outside guest RAM" in r.dev.error()
        r.peer.settimeout(0.01)
        with pytest.raises(TimeoutError):
            r.peer.recv(4096)
    finally:
        r.close()


def test_control_errors():
    mem = GuestMemory(8 * MiB)
    b = PyNetBackend(mem)
    try:
        with pytest.raises(DeviceError, match="set_owner first"):
            b.set_features(0)
        b.set_owner()
        with pytest.raises(DeviceError, match="already has an owner"):
            b.set_owner()
        with pytest.raises(DeviceError, match="no queue 2"):
            b.set_vring_num(2, 16)
        with pytest.raises(DeviceError, match="does not match"):
            b.set_mem_table([(0, 4096, 1234)])
        with pytest.raises(DeviceError, match="before set_mem_table"):
            b.start()
        b.reset_owner()
    finally:
        mem.close()
