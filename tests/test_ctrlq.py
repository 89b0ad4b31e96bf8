"""virtio-net's control queue (VIRTIO_NET_F_CTRL_VQ) and VIRTIO_NET_F_GUEST_ANNOUNCE, driven
from the driver's side without a guest: the device model (devices/virtio_net.py) behind the
virtio-mmio transport, in real guest memory (a memfd), with the Python data path on a
socketpair.  The guest's own announcement after a migration is tests/test_migration.py's
test_guest_announces_itself_after_the_move; the state through a save/restore is
tests/test_persist.py's net round trip; the last test here takes a real guest's control
queue through a cpr-exec and a cpr-transfer and drives it with QMP announce-self.

Here: the commands (ANNOUNCE_ACK, anything else refused with VIRTIO_NET_ERR), the config
status and interrupt of an announce request, and every malformed chain a driver could post,
answered or given back without harm (the next command still works, nothing outside guest
RAM is touched, the data path stays up).
"""

from __future__ import annotations

import os
import re
import socket
import struct

import pytest

from bench.lab import GUEST_IP, netns_with_tap
from conftest import ROOT, need_kvm
from test_cpr import (QmpFailed, close, cpr_exec, cpr_transfer, new_info, qmp, qmp_connect,
                      start_incoming)
from test_datapath import FakeVm, SocketTap, driver_bring_up, rd, wr
from virtq_driver import (CTRL, EVENT_IDX, F_INDIRECT, F_NEXT, F_WRITE, INDIRECT_DESC, MEM_SIZE,
                          VERSION_1, Queue, put_table)
from vmm.net import RX, TX

CTRL_VQ, GUEST_ANNOUNCE, STATUS = 1 << 17, 1 << 21, 1 << 16
ANNOUNCE, ANNOUNCE_ACK = 3, 0
OK, ERR = 0, 1
ACK_AT = 0x7F0000              # where each test command's ack byte lives


class Ctrl:
    """A virtio-net device whose driver negotiated `features`, its control queue at hand."""

    def __init__(self, features=VERSION_1 | STATUS | CTRL_VQ | GUEST_ANNOUNCE | INDIRECT_DESC):
        from vmm.devices.virtio_net import VirtioNet
        from vmm.memory import GuestMemory
        from vmm.net.backend_python import PyNetBackend
        from vmm.virtio.mmio import VirtioMmio
        self.mem = GuestMemory(MEM_SIZE)
        self.sock, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.net = VirtioNet(SocketTap(self.sock), bytes.fromhex("525400123456"),
                             lambda: PyNetBackend(self.mem))
        self.vm = FakeVm()
        self.t = VirtioMmio(self.net, 0xD000_0000, 5, self.vm, self.mem)
        self.rx, self.tx = Queue(self.mem, RX, 16), Queue(self.mem, TX, 16)
        self.q = Queue(self.mem, CTRL, 16)
        driver_bring_up(self.t, self.rx, self.tx, features,
                        *((self.q,) if features & CTRL_VQ else ()))

    def kick(self):
        from vmm.virtio import mmio as M
        wr(self.t, M.QUEUE_NOTIFY, CTRL)

    def command(self, cls: int, cmd: int, data: bytes = b"") -> tuple[int, int]:
        """One well-formed command: (the ack byte, the used length)."""
        self.mem.write(ACK_AT, b"\xee")
        self.q.add([(*self.q.buf(bytes((cls, cmd)) + data), 0), (ACK_AT, 1, F_WRITE)])
        self.kick()
        (_, length), = self.q.get_used()
        return self.mem.read(ACK_AT, 1)[0], length

    def post(self, head: int) -> list[tuple[int, int]]:
        """Make the chain at `head` available, kick; what the device gave back."""
        self.q.publish(head)
        self.kick()
        return self.q.get_used()

    def config_status(self) -> int:
        from vmm.virtio import mmio as M
        return struct.unpack("<H", self.t.read(M.CONFIG + 6, 2))[0]

    def close(self):
        self.t.reset()
        self.sock.close()
        self.peer.close()
        self.mem.close()


@pytest.fixture
def ctrl():
    c = Ctrl()
    yield c
    c.close()


def test_control_queue_kicks_come_to_python_not_to_the_data_path(ctrl):
    """Queues 0 and 1 are KVM ioeventfds for the backend; queue 2's QueueNotify exits."""
    assert sorted(ctrl.vm.ioeventfds) == [RX, TX]
    assert ctrl.t.kick_fds[CTRL] == -1 and ctrl.net.queues[CTRL].ready


def test_unknown_commands_get_virtio_net_err(ctrl):
    from vmm.virtio import mmio as M
    for cls, cmd in ((0, 0), (1, 1), (4, 0), (ANNOUNCE, 1), (255, 255)):
        assert ctrl.command(cls, cmd, b"\x01") == (ERR, 1), (cls, cmd)
    # an ack nobody asked for is refused too (as QEMU)
    assert ctrl.command(ANNOUNCE, ANNOUNCE_ACK) == (ERR, 1)
    assert rd(ctrl.t, M.INTERRUPT_STATUS) & 1        # the used buffers were signalled
    assert os.eventfd_read(ctrl.vm.irqfds[5]) >= 1


def test_announce_request_sets_the_status_interrupts_and_the_ack_clears_it(ctrl):
    from vmm.virtio import mmio as M
    generation = rd(ctrl.t, M.CONFIG_GENERATION)
    assert ctrl.config_status() == 1                 # link up
    assert ctrl.net.request_announce()
    ctrl.t.config_changed()
    assert ctrl.config_status() == 1 | 2             # ... and VIRTIO_NET_S_ANNOUNCE
    assert rd(ctrl.t, M.INTERRUPT_STATUS) & 2        # a configuration change interrupt
    assert rd(ctrl.t, M.CONFIG_GENERATION) == generation + 1
    wr(ctrl.t, M.INTERRUPT_ACK, 2)
    assert ctrl.command(ANNOUNCE, ANNOUNCE_ACK) == (OK, 1)
    assert ctrl.config_status() == 1 and not ctrl.net.announce
    assert ctrl.command(ANNOUNCE, ANNOUNCE_ACK) == (ERR, 1)   # once
    # the ack through an indirect table works alike
    assert ctrl.net.request_announce()
    ctrl.mem.write(0x7E0000, bytes((ANNOUNCE, ANNOUNCE_ACK)))
    base, length = put_table(ctrl.mem, 0x30000, [(0x7E0000, 2, F_NEXT, 1), (ACK_AT, 1, F_WRITE, 0)])
    ctrl.q.put_desc(0, base, length, F_INDIRECT)
    assert ctrl.post(0) == [(0, 1)] and ctrl.mem.read(ACK_AT, 1) == bytes((OK,))
    assert not ctrl.net.announce


def test_a_driver_without_the_features_sees_the_device_as_before():
    """No CTRL_VQ: no control queue is set up, a stray kick on it is ignored, nothing asks
    the guest to announce; GUEST_ANNOUNCE without CTRL_VQ is refused (§5.1.3.1)."""
    c = Ctrl(features=VERSION_1 | STATUS)
    try:
        assert not c.t.queues[CTRL].ready
        c.kick()
        assert c.q.used_idx() == 0
        assert not c.net.request_announce() and c.config_status() == 1
        assert not c.net.ack_features(VERSION_1 | GUEST_ANNOUNCE)
        assert c.net.ack_features(VERSION_1 | GUEST_ANNOUNCE | CTRL_VQ)
    finally:
        c.close()


OUTSIDE = MEM_SIZE + 0x1000     # a guest-physical address past the end of RAM


def malformed(q, case):
    """Write the chain of one malformed case at descriptor 0; its head."""
    cmd = q.buf(bytes((ANNOUNCE, ANNOUNCE_ACK)))
    if case == "no_ack":            # readable only: nowhere to write the ack
        q.put_desc(0, *cmd, 0)
    elif case == "ack_first":       # device-writable before device-readable
        q.put_desc(0, ACK_AT, 1, F_WRITE | F_NEXT, 1)
        q.put_desc(1, *cmd, 0)
    elif case == "oob_command":     # the command outside guest RAM
        q.put_desc(0, OUTSIDE, 2, F_NEXT, 1)
        q.put_desc(1, ACK_AT, 1, F_WRITE)
    elif case == "oob_ack":         # the ack byte outside guest RAM
        q.put_desc(0, *cmd, F_NEXT, 1)
        q.put_desc(1, OUTSIDE, 1, F_WRITE)
    elif case == "straddle":        # the ack buffer runs past the end of RAM
        q.put_desc(0, *cmd, F_NEXT, 1)
        q.put_desc(1, MEM_SIZE - 1, 2, F_WRITE)
    elif case == "loop":
        q.put_desc(0, *cmd, F_NEXT, 1)
        q.put_desc(1, *cmd, F_NEXT, 0)
    elif case == "next_outside":    # next points past the descriptor table
        q.put_desc(0, *cmd, F_NEXT, q.num + 3)
    elif case == "zero_length":
        q.put_desc(0, cmd[0], 0, F_NEXT, 1)
        q.put_desc(1, ACK_AT, 1, F_WRITE)
    elif case == "indirect_nested":
        base, length = put_table(q.mem, 0x30000, [(0x30100, 16, F_INDIRECT, 0)])
        q.put_desc(0, base, length, F_INDIRECT)
    elif case == "indirect_outside":
        q.put_desc(0, OUTSIDE, 32, F_INDIRECT)
    elif case == "indirect_ragged":  # not a whole number of descriptors
        q.put_desc(0, 0x30000, 20, F_INDIRECT)
    elif case == "head_outside":
        return q.num + 1
    return 0


CASES = ["no_ack", "ack_first", "oob_command", "oob_ack", "straddle", "loop", "next_outside",
         "zero_length", "indirect_nested", "indirect_outside", "indirect_ragged",
         "head_outside"]


@pytest.mark.parametrize("case", CASES)
def test_a_malformed_chain_is_given_back_unanswered_without_harm(ctrl, case):
    """Each chain comes back in the used ring with length 0 (dropped, with a log line),
    nothing is written (not even the ack byte inside RAM), and the device goes on: the
    next command is answered and the data path still moves frames."""
    from vmm.virtio import DEVICE_NEEDS_RESET
    from vmm.virtio import mmio as M
    assert ctrl.net.request_announce()
    ctrl.mem.write(ACK_AT, b"\xee")
    head = malformed(ctrl.q, case)
    assert ctrl.post(head) == [(head, 0)]
    assert ctrl.mem.read(ACK_AT, 1) == b"\xee" and ctrl.net.announce
    assert not rd(ctrl.t, M.STATUS) & DEVICE_NEEDS_RESET
    assert ctrl.command(ANNOUNCE, ANNOUNCE_ACK) == (OK, 1)
    ctrl.tx.add([(*ctrl.tx.buf(bytes(12) + b"frame"), 0)])
    wr(ctrl.t, M.QUEUE_NOTIFY, TX)
    ctrl.peer.settimeout(3)
    assert ctrl.peer.recv(100) == bytes(12) + b"frame"


def test_a_short_command_gets_virtio_net_err(ctrl):
    ctrl.mem.write(ACK_AT, b"\xee")
    ctrl.q.add([(*ctrl.q.buf(bytes((ANNOUNCE,))), 0), (ACK_AT, 1, F_WRITE)])
    ctrl.kick()
    assert ctrl.q.get_used()[0][1] == 1 and ctrl.mem.read(ACK_AT, 1) == bytes((ERR,))


def test_an_avail_index_far_ahead_is_ignored(ctrl):
    """avail->idx more than a ring ahead: the ring is not trusted, nothing is consumed."""
    ctrl.mem.write(ctrl.q.avail + 2, struct.pack("<H", ctrl.q.num + 5))
    ctrl.kick()
    assert ctrl.q.used_idx() == 0 and ctrl.net.queues[CTRL].next_avail == 0


def test_event_idx_suppresses_the_interrupt_the_driver_does_not_want():
    c = Ctrl(features=VERSION_1 | CTRL_VQ | EVENT_IDX)
    try:
        call = c.vm.irqfds[5]
        c.q.set_used_event(5)                    # interrupt me only past used index 5
        assert c.command(0, 0) == (ERR, 1)
        with pytest.raises(BlockingIOError):
            os.eventfd_read(call)
        c.q.set_used_event(1)
        assert c.command(0, 0) == (ERR, 1)       # used index 1 -> 2 crosses the event
        assert os.eventfd_read(call) == 1
    finally:
        c.close()


def test_what_the_device_writes_is_in_the_migration_dirty_log(ctrl):
    """The VMM writes the ack byte and the used ring itself (KVM does not log that): a live
    migration's precopy must see those pages dirty, or a command answered during precopy
    would reach the destination unanswered."""
    from vmm.net.backend_c import DirtyLog
    log = DirtyLog(ctrl.mem.host_base, ctrl.mem.size)
    ctrl.net.dirty_log = log     # (set_dirty_log would hand it to the data path too: the
    assert log.collect() == 0    # Python one, here, logs nothing; the C one does)
    assert ctrl.command(0, 0) == (ERR, 1)
    pages = log.collect()
    want = {ctrl.mem.offset_of(ACK_AT, 1) // 4096, ctrl.mem.offset_of(ctrl.q.used, 8) // 4096}
    assert {n for n in range(pages.bit_length()) if pages >> n & 1} == want
    assert log.collect() == 0                        # collected once


# -- a real guest: the control queue through both live updates, and QMP announce-self -----------
def announce_self(qmp_path, **args):
    q = qmp_connect(qmp_path)
    try:
        return qmp(q, "announce-self", **{"initial": 0, "max": 100, "rounds": 1, "step": 50,
                                          **args})
    finally:
        close(q)


def net0(qmp_path) -> dict:
    q = qmp_connect(qmp_path)
    try:
        return next(d for d in qmp(q, "x-query-state")["devices"] if d["name"] == "net0")
    finally:
        close(q)


def test_the_control_queue_goes_through_cpr_exec_and_cpr_transfer(guests, vmm_procs, tmp_path):
    """netecho (announce=1) used its control queue once at boot; after a cpr-exec, and again
    after a cpr-transfer, QMP announce-self makes it announce itself and ack: the device
    took the next command from where the ring stood (netecho checks the used index moved
    by exactly one) and the pending bit is clear afterwards."""
    need_kvm()
    announced = r"netecho: announced \(gratuitous ARP\), acked"
    with netns_with_tap() as (ns, tap):
        old_qmp = tmp_path / "old.qmp"
        old = vmm_procs(["run", "--kernel", str(ROOT / "guest/build/netecho.elf"),
                         "--net", f"tap,ifname={tap}", "--qmp", str(old_qmp),
                         "--cmdline", f"ip={GUEST_IP} stats=0 announce=1"], ns=ns)
        old.wait_for(r"netecho: ctrl class 0 cmd 0 -> ack=1")
        assert cpr_exec(old_qmp) is None
        assert new_info(old_qmp)["status"] == "completed"
        assert net0(old_qmp)["queues"][2]["last_avail_idx"] == 1
        announce_self(old_qmp)
        old.wait_for(announced)
        new, sock, new_qmp = start_incoming(vmm_procs, tmp_path, ns=ns)
        cpr_transfer(old_qmp, sock)
        assert old.wait(15) == 0
        assert new_info(new_qmp)["status"] == "completed"
        announce_self(new_qmp, interfaces=["net0"])
        new.wait_for(announced)
        net = net0(new_qmp)
        assert net["announce"] is False and net["queues"][2]["last_avail_idx"] == 3, net
        with pytest.raises(QmpFailed, match="no NIC net7: this VM has net0"):
            announce_self(new_qmp, interfaces=["net7"])
        with pytest.raises(QmpFailed, match="'rounds' is missing"):
            q = qmp_connect(new_qmp)
            try:
                qmp(q, "announce-self", initial=50, max=550, step=100)
            finally:
                close(q)
    assert "ctrl queue: device used" not in old.text() + new.text()
    assert len(re.findall(announced, old.text() + new.text())) == 2
