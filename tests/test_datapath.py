"""Conformance suite for the virtio-net data path: every backend behind the vhost-like API
(the C path, vmm/net/backend_c.py; the Python path, backend_python.py; vhost-net,
backend_vhost.py) must move frames, honour notification suppression, refuse malformed
chains without touching memory it was not given, and stop and resume at exact ring
indices (what a CPR live update needs).

The test plays the guest driver (tests/virtq_driver.py): split rings in real guest RAM (a
memfd) and a datagram socketpair as the tap.  What only one backend has (the C path's
walk_chain and poll, the Python path's host-address table, vhost's ioctls) is tested in
test_backend_c.py, test_backend_python.py and test_backend_vhost.py.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from virtq_driver import (EVENT_IDX, F_INDIRECT, F_NEXT, F_WRITE, GUEST_CSUM, GUEST_TSO4, HALF,
                          HDR, INDIRECT_DESC, MEM_SIZE, MRG_RXBUF, RX, TABLE_BASE, TX, VERSION_1,
                          AVAIL_F_NO_INTERRUPT, Queue, Rig, backend_class, frame, frame_number,
                          put_table, wait_for)
from vmm.errors import DeviceError

ROOT = Path(__file__).resolve().parent.parent
HAVE_VHOST = os.path.exists("/dev/vhost-net")
NO_VHOST = "no /dev/vhost-net on this host"


def backend_param(name):
    if name == "vhost" and not HAVE_VHOST:
        return pytest.param(name, marks=pytest.mark.skip(reason=NO_VHOST))
    return name


BACKENDS = [backend_param(b) for b in ("c", "python", "vhost")]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def need_socketpair_backend(backend):
    if backend == "vhost":
        pytest.skip("vhost-net takes a tap or packet socket as its backend, not this rig's "
                    "socketpair: vhost is covered by test_real_tap_in_netns[vhost]")


@pytest.fixture
def make_rig(backend):
    """make_rig(features=..., num=..., table=...) -> a Rig on this backend, closed at teardown."""
    need_socketpair_backend(backend)
    rigs = []

    def make(**kw):
        rigs.append(Rig(backend_class(backend), **kw))
        return rigs[-1]
    yield make
    for r in rigs:
        r.close()
    assert not [t for t in threading.enumerate() if t.name == "pyvmm-net"], \
        "a Python data-path thread outlived its device"


@pytest.fixture
def rig(make_rig):
    return make_rig()


def interrupts(rig) -> int:
    """Interrupts on either queue's call fd (a ring error may be signalled on either: the
    transport has one interrupt line, so pyvmm gives both queues the same irqfd)."""
    return rig.calls(RX) + rig.calls(TX)


# -- TX ---------------------------------------------------------------------------------------
def test_tx_one_packet(rig):
    pkt = frame(1, 200)
    h = rig.txq.add([(*rig.txq.buf(pkt[:HDR]), 0), (*rig.txq.buf(pkt[HDR:]), 0)])
    rig.dev.start()
    rig.kick_q(TX)
    assert rig.peer.recv(70000) == pkt
    assert rig.txq.wait_used(1) == [(h, 0)]
    assert wait_for(lambda: rig.calls(TX) >= 1)
    assert rig.dev.isr_read() & 1
    rig.dev.isr_ack(1)
    assert rig.dev.isr_read() == 0
    rig.dev.stop()
    st = rig.stats()
    # (no claim on "kicks": a started device looks at its rings once anyway, so it may
    # send the frame before it reads the kick)
    assert st["tx_packets"] == 1 and st["tx_bytes"] == 200
    assert rig.dev.error() is None


def test_tx_many_packets_recycled(rig):
    """More frames than the ring holds, of many sizes: all sent, in order, descriptors reused;
    the TX ring's index is then exactly the count, the RX one untouched."""
    rig.dev.start()
    total, sent, got = 2000, 0, []
    reader = threading.Thread(target=lambda: [got.append(rig.peer.recv(70000))
                                              for _ in range(total)])
    reader.start()
    while sent < total:
        rig.txq.get_used()
        while sent < total and rig.txq.free:
            rig.post_tx(frame(sent, 60 + sent % 1400))
            sent += 1
        rig.kick_q(TX)
        time.sleep(0.0005)
    reader.join(30)
    assert [frame_number(p) for p in got] == list(range(total))
    assert all(p == frame(i, 60 + i % 1400) for i, p in enumerate(got))
    assert wait_for(lambda: rig.txq.used_idx() == total & 0xFFFF)
    rig.dev.stop()
    assert rig.dev.get_vring_base(TX) == total
    assert rig.dev.get_vring_base(RX) == 0
    assert rig.stats()["tx_packets"] == total


# -- RX ---------------------------------------------------------------------------------------
def test_rx_into_posted_buffers(rig):
    heads = rig.post_rx(4)
    rig.dev.start()
    pkts = [frame(i, 100 + 300 * i) for i in range(3)]
    for p in pkts:
        rig.peer.send(p)
    used = rig.rxq.wait_used(3)
    assert [h for h, _ in used] == heads[:3]
    for (h, length), p in zip(used, pkts):
        assert length == len(p)
        data = rig.rx_payload(h, length)
        assert data[:10] == p[:10] and data[10:12] == struct.pack("<H", 1)   # num_buffers
        assert data[HDR:] == p[HDR:]
    assert wait_for(lambda: rig.calls(RX) >= 1)
    rig.dev.stop()
    assert rig.dev.get_vring_base(RX) == 3
    assert rig.stats()["rx_packets"] == 3


def test_rx_waits_for_buffers_without_loss(rig):
    rig.dev.start()
    pkts = [frame(i, 500) for i in range(40)]
    for p in pkts:
        rig.peer.send(p)
    time.sleep(0.05)                       # a chance to misbehave: nothing to write into
    assert rig.rxq.used_idx() == 0
    got = []
    for _ in range(8):                     # 5 buffers at a time, kick each time
        rig.post_rx(5)
        rig.kick_q(RX)
        got += [rig.rx_payload(h, n)[HDR:] for h, n in rig.rxq.wait_used(5)]
    assert got == [p[HDR:] for p in pkts]
    rig.dev.stop()
    st = rig.stats()
    assert st["rx_dropped"] == 0 and st["rx_packets"] == 40


def test_rx_frame_too_big_for_buffer_is_dropped_and_buffer_reused(rig):
    rig.post_rx(1, 512)
    rig.dev.start()
    rig.peer.send(frame(0, 1000))
    rig.peer.send(frame(1, 300))
    (h, n), = rig.rxq.wait_used(1)
    assert rig.rx_payload(h, n)[HDR:] == frame(1, 300)[HDR:]
    rig.dev.stop()
    assert rig.stats()["rx_dropped"] == 1


@pytest.mark.parametrize("gso", [False, True])
def test_mrg_rxbuf_spans_chains(make_rig, gso):
    r = make_rig(features=VERSION_1 | MRG_RXBUF | (GUEST_CSUM | GUEST_TSO4 if gso else 0))
    heads = r.post_rx(100, 1024)            # 100 KiB: room for a 64 KiB GSO frame
    r.dev.start()
    big, small = frame(7, 3000 - HDR), frame(8, 100)
    r.peer.send(big)
    r.peer.send(small)
    used = r.rxq.wait_used(4)
    assert [h for h, _ in used] == heads[:4]
    assert [n for _, n in used] == [1024, 1024, 952, len(small)]
    assert r.rx_payload(heads[0], 1024)[10:12] == struct.pack("<H", 3)
    data = b"".join(r.rx_payload(h, n) for h, n in used[:3])
    assert data[HDR:] == big[HDR:]
    assert r.rx_payload(heads[3], len(small))[10:12] == struct.pack("<H", 1)
    r.dev.stop()
    assert r.dev.get_vring_base(RX) == 4     # the chains gathered but not filled were given back


def test_mrg_rxbuf_spills_into_more_chains(make_rig):
    """A frame longer than what the device gathers before reading (about one MTU frame)
    spills its tail into further buffers; the ones left over serve the next frame."""
    r = make_rig(features=VERSION_1 | MRG_RXBUF)
    heads = r.post_rx(14, 512)
    r.dev.start()
    pkt = frame(9, 5000 - HDR)
    r.peer.send(pkt)
    used = r.rxq.wait_used(10)
    assert [h for h, _ in used] == heads[:10]
    assert [n for _, n in used] == [512] * 9 + [5000 - 9 * 512]
    got = b"".join(r.rx_payload(h, n) for h, n in used)
    assert got[HDR:] == pkt[HDR:]
    assert struct.unpack_from("<H", got, 10)[0] == 10
    r.peer.send(frame(10, 20))
    assert r.rxq.wait_used(1) == [(heads[10], HDR + 20)]
    r.dev.stop()
    assert r.stats()["rx_dropped"] == 0


def test_mrg_rxbuf_waits_for_enough_buffers(make_rig):
    """With MRG_RXBUF and less buffer space than a full-size frame, the device waits for more
    buffers (as vhost-net does) instead of reading the frame and dropping it."""
    r = make_rig(features=VERSION_1 | MRG_RXBUF)
    r.post_rx(1, 1024)                      # less than one MTU frame
    r.dev.start()
    r.peer.send(frame(1, 1400))
    time.sleep(0.05)
    assert r.rxq.used_idx() == 0
    r.post_rx(1, 1024)
    r.kick_q(RX)
    assert [n for _, n in r.rxq.wait_used(2)] == [1024, 1412 - 1024]
    r.dev.stop()
    assert r.stats()["rx_dropped"] == 0


def test_indirect_tx_and_rx(make_rig):
    r = make_rig(features=VERSION_1 | INDIRECT_DESC)
    pkt = frame(5, 600)
    h = r.post_tx_indirect(pkt)
    # RX: two writable segments in an indirect table (WRITE on the table is ignored)
    bufs = [r.rxq.buf(HDR), r.rxq.buf(1500)]
    rtable = put_table(r.mem, TABLE_BASE + 0x1000,
                       [(*bufs[0], F_WRITE | F_NEXT, 1), (*bufs[1], F_WRITE, 0)])
    rh = r.rxq.add([(*rtable, F_INDIRECT | F_WRITE)])
    r.peer.send(frame(9, 700))
    r.dev.start()
    r.kick_q(TX)
    assert r.peer.recv(70000) == pkt
    assert r.txq.wait_used(1) == [(h, 0)]
    assert r.rxq.wait_used(1) == [(rh, len(frame(9, 700)))]
    assert r.mem.read(bufs[1][0], 700) == frame(9, 700)[HDR:]
    assert r.mem.read(bufs[0][0] + 10, 2) == struct.pack("<H", 1)
    assert r.dev.error() is None


def test_shared_kick_fd_wakes_both_queues(rig):
    rig.dev.set_vring_kick(TX, rig.kick[RX])
    rig.post_rx(2)
    rig.dev.start()
    rig.post_tx(frame(0))
    rig.kick_q(RX)
    assert rig.peer.recv(200) == frame(0)
    rig.peer.send(frame(1))
    rig.rxq.wait_used(1)
    rig.dev.stop()


# -- notifications ------------------------------------------------------------------------------
def settle(rig, used):
    """Let the device send TX frames until the TX used index is `used`, and finish deciding
    whether to interrupt for them: a frame then received in a fresh RX buffer is handled
    after that decision (the device serves both queues from one thread, in order)."""
    rig.kick_q(TX)
    assert wait_for(lambda: rig.txq.used_idx() == used)
    rig.post_rx(1)
    rig.peer.send(frame(0xFFFF))
    rig.kick_q(RX)
    rig.rxq.wait_used(1)


def test_event_idx_interrupt_suppression(make_rig):
    r = make_rig(features=VERSION_1 | EVENT_IDX)
    r.txq.set_used_event(0)
    r.post_tx(frame(0))
    r.dev.start()
    settle(r, 1)                 # used 0 -> 1 crosses used_event 0: interrupt
    assert r.calls(TX) == 1
    assert r.txq.avail_event() == 1  # drained: asks for a kick on the next entry
    r.txq.set_used_event(3)
    for i in (1, 2):                 # used -> 2, 3: no interrupt
        r.post_tx(frame(i))
        settle(r, i + 1)
        assert r.calls(TX) == 0
    r.post_tx(frame(3))
    settle(r, 4)                 # used -> 4 crosses used_event 3
    assert r.calls(TX) == 1
    r.post_tx(frame(4))
    r.post_tx(frame(5))
    r.txq.set_used_event(4)          # a batch crossing the event: one interrupt
    settle(r, 6)
    assert r.calls(TX) == 1
    assert r.txq.avail_event() == 6
    assert r.stats()["interrupts"] == 3 + r.calls(RX)    # (RX: the settling frames')
    assert [r.peer.recv(200) for _ in range(6)] == [frame(i) for i in range(6)]


def test_no_interrupt_flag_without_event_idx(rig):
    rig.txq.set_avail_flags(AVAIL_F_NO_INTERRUPT)
    rig.post_tx(frame(0))
    rig.dev.start()
    settle(rig, 1)
    assert rig.calls(TX) == 0
    rig.txq.set_avail_flags(0)
    rig.post_tx(frame(1))
    settle(rig, 2)
    assert rig.calls(TX) == 1


def test_event_idx_kicks_wake_the_thread(make_rig):
    """Each kick after avail_event is honoured: no frame waits for a later one."""
    r = make_rig(features=VERSION_1 | EVENT_IDX)
    r.dev.start()
    for i in range(50):
        r.post_tx(frame(i))
        r.kick_q(TX)
        assert wait_for(lambda: r.txq.used_idx() == i + 1)
        assert wait_for(lambda: r.txq.avail_event() == i + 1)
        r.txq.get_used()
    assert [r.peer.recv(200) for _ in range(50)] == [frame(i) for i in range(50)]


# -- malformed chains ---------------------------------------------------------------------------
# Each makes a bad TX chain in a rig whose memory table is the lower half of RAM only; the
# message each backend gives says what is wrong (vhost-net only says "bad ring").
def bad_loop(r):
    a, n = r.txq.buf(frame(0))
    r.txq.put_desc(0, a, n, F_NEXT, 1)
    r.txq.put_desc(1, a, n, F_NEXT, 0)
    r.txq.publish(0)


def bad_loop_self(r):
    r.txq.put_desc(0, *r.txq.buf(frame(0)), F_NEXT, 0)
    r.txq.publish(0)


def bad_oob(r):                            # buffer in RAM, not in the memory table
    r.txq.add([(HALF + 0x1000, 100, 0)])


def bad_oob_straddle(r):
    r.txq.add([(HALF - 50, 100, 0)])


def bad_oob_wrap(r):                       # gpa + len overflows 64 bits
    r.txq.add([(0xFFFF_FFFF_FFFF_FF00, 0x200, 0)])


def bad_zero_len(r):
    r.txq.add([(*r.txq.buf(HDR), 0), (r.txq.buf(10)[0], 0, 0)])


def bad_head(r):
    r.txq.publish(300)


def bad_write_in_tx(r):
    r.txq.add([(*r.txq.buf(100), F_WRITE)])


def bad_next_range(r):
    r.txq.put_desc(0, *r.txq.buf(100), F_NEXT, 999)
    r.txq.publish(0)


def bad_avail_idx(r):
    r.mem.write(r.txq.avail + 2, struct.pack("<H", 1000))


def ind(r, length, addr=TABLE_BASE, flags=F_INDIRECT):
    r.txq.add([(addr, length, flags)])


def bad_ind_len(r):
    put_table(r.mem, TABLE_BASE, [(*r.txq.buf(100), 0, 0)] * 2)
    ind(r, 24)


def bad_ind_zero(r):
    ind(r, 0)


def bad_ind_nested(r):
    put_table(r.mem, TABLE_BASE, [(TABLE_BASE + 0x1000, 16, F_INDIRECT, 0)])
    ind(r, 16)


def bad_ind_oob(r):
    ind(r, 64, addr=HALF - 32)


def bad_ind_loop(r):
    a, n = r.txq.buf(100)
    put_table(r.mem, TABLE_BASE, [(a, n, F_NEXT, 1), (a, n, F_NEXT, 0)])
    ind(r, 32)


def bad_ind_next(r):
    put_table(r.mem, TABLE_BASE, [(*r.txq.buf(100), F_NEXT, 1), (*r.txq.buf(100), F_NEXT, 2)])
    ind(r, 32)


def bad_ind_and_next(r):
    a, n = r.txq.buf(100)
    put_table(r.mem, TABLE_BASE, [(a, n, 0, 0)])
    r.txq.put_desc(0, TABLE_BASE, 16, F_INDIRECT | F_NEXT, 1)
    r.txq.put_desc(1, a, n, 0, 0)
    r.txq.publish(0)


def bad_ind_too_many(r):                  # 1100 one-byte segments > the iovec limit
    a, _ = r.txq.buf(2000)
    put_table(r.mem, TABLE_BASE, [(a + k, 1, F_NEXT, k + 1) for k in range(1099)] +
              [(a, 1, 0, 0)])
    ind(r, 16 * 1100)


def bad_ind_unnegotiated(r):              # (this rig has no INDIRECT_DESC)
    put_table(r.mem, TABLE_BASE, [(*r.txq.buf(100), 0, 0)])
    ind(r, 16)


BAD_TX = {   # case: (make, C's words, the Python path's words)
    "loop": (bad_loop, "loops", "loops"),
    "loop_self": (bad_loop_self, "loops", "loops"),
    "oob": (bad_oob, "outside guest memory", "outside guest RAM"),
    "oob_straddle": (bad_oob_straddle, "outside", "outside"),
    "oob_wrap": (bad_oob_wrap, "outside", "outside"),
    "zero_len": (bad_zero_len, "zero-length", "zero-length"),
    "head": (bad_head, "head index 300", "head 300"),
    "write_in_tx": (bad_write_in_tx, "write-only", "device-writable"),
    "next_range": (bad_next_range, "out of range", "next descriptor 999"),
    "avail_idx": (bad_avail_idx, "avail index", "avail index"),
    "ind_len": (bad_ind_len, "multiple of 16", "indirect table of 24 bytes"),
    "ind_zero": (bad_ind_zero, "multiple of 16", "indirect table of 0 bytes"),
    "ind_nested": (bad_ind_nested, "nested", "indirect descriptor inside"),
    "ind_oob": (bad_ind_oob, "indirect table", "outside guest RAM"),
    "ind_loop": (bad_ind_loop, "loops", "loops"),
    "ind_next": (bad_ind_next, "out of range", "outside a 2-entry table"),
    "ind_and_next": (bad_ind_and_next, "INDIRECT and NEXT", "chained to another"),
    "ind_too_many": (bad_ind_too_many, "segments", "too long"),
    "ind_unnegotiated": (bad_ind_unnegotiated, "without", "without VIRTIO_F_INDIRECT_DESC"),
}


def device_owned(rig) -> list[tuple[int, int]]:
    """(gpa, len) of what a device may write even to refuse a chain: each used ring's
    flags and avail_event (asking the driver to kick, or not)."""
    return [(q.used, 2) for q in (rig.rxq, rig.txq)] + \
        [(q.used + 4 + 8 * q.num, 2) for q in (rig.rxq, rig.txq)]


def ram_but(rig, skip) -> bytes:
    ram = bytearray(rig.mem.read(0, MEM_SIZE))
    for gpa, n in skip:
        ram[gpa:gpa + n] = bytes(n)
    return bytes(ram)


def message_for(backend, c_words, py_words):
    return {"c": c_words, "python": py_words, "vhost": "bad ring"}[backend]


@pytest.mark.parametrize("case", sorted(BAD_TX))
def test_bad_tx_chain_breaks_device(make_rig, backend, case):
    make, c_words, py_words = BAD_TX[case]
    r = make_rig(table="lower-half",
                 features=VERSION_1 | (0 if case == "ind_unnegotiated" else INDIRECT_DESC))
    make(r)
    before = ram_but(r, device_owned(r))
    r.dev.start()
    r.kick_q(TX)
    assert wait_for(lambda: r.dev.error() is not None)
    assert message_for(backend, c_words, py_words) in r.dev.error(), r.dev.error()
    assert wait_for(lambda: r.dev.isr_read() & 2)
    assert wait_for(lambda: interrupts(r) >= 1)
    # the device stays started, but leaves rings, memory and the tap alone
    r.kick_q(TX)
    r.kick_q(RX)
    r.peer.send(frame(1))
    time.sleep(0.02)
    assert r.dev.running()
    r.dev.stop()
    assert ram_but(r, device_owned(r)) == before
    assert r.dev.get_vring_base(TX) == 0 and r.txq.used_idx() == 0
    assert r.dev_sock.recv(200) == frame(1)        # not read from the "tap"
    r.peer.settimeout(0.01)
    with pytest.raises(socket.timeout):
        r.peer.recv(100)                           # nothing was sent


@pytest.mark.parametrize("case", ["readonly", "oob", "loop", "head", "small"])
def test_bad_rx_chain_breaks_device(make_rig, backend, case):
    r = make_rig(table="lower-half", features=VERSION_1 | INDIRECT_DESC)
    q = r.rxq
    if case == "readonly":
        q.add([(*q.buf(2048), 0)])
    elif case == "oob":
        q.add([(HALF + 0x100, 2048, F_WRITE)])
    elif case == "loop":
        q.put_desc(0, *q.buf(64), F_WRITE | F_NEXT, 0)
        q.publish(0)
    elif case == "head":
        q.publish(256)
    else:
        q.add([(*q.buf(4), F_WRITE)])      # cannot even hold the header
    r.peer.send(frame(0))
    before = ram_but(r, device_owned(r))
    r.dev.start()
    if case == "small" and backend == "python":
        # the Python path drops a frame its buffer cannot hold (as vhost-net does) and
        # leaves the ring as it was; the C path calls the ring broken
        assert wait_for(lambda: r.stats()["rx_dropped"] == 1)
        r.dev.stop()
        assert r.dev.error() is None and r.rxq.used_idx() == 0
        assert r.dev.get_vring_base(RX) == 0
        return
    assert wait_for(lambda: r.dev.error() is not None)
    if backend == "c":
        assert r.dev.error().startswith("rx queue: ")
    r.dev.stop()
    assert ram_but(r, device_owned(r)) == before
    assert r.dev.get_vring_base(RX) == 0
    assert r.dev_sock.recv(200) == frame(0)   # the frame is still in the "tap"


def test_restart_after_error_redetects_it(make_rig):
    """A stop and start (as in a CPR) does not make a broken ring usable: the device sees it
    again and signals it again."""
    r = make_rig(table="lower-half")
    bad_zero_len(r)
    r.dev.start()
    r.kick_q(TX)
    assert wait_for(lambda: r.dev.isr_read() & 2)
    r.dev.stop()
    r.dev.isr_ack(2)
    interrupts(r)
    r.dev.start()
    assert wait_for(lambda: r.dev.isr_read() & 2)
    assert wait_for(lambda: interrupts(r) >= 1)
    assert "zero-length" in r.dev.error()
    r.dev.stop()
    assert r.dev.get_vring_base(TX) == 0 and r.txq.used_idx() == 0


# -- ownership ------------------------------------------------------------------------------
def test_owner_is_exclusive(backend):
    """Like vhost's SET_OWNER: nothing before it, not twice, and free again after
    reset_owner."""
    if backend == "vhost":
        pytest.skip("vhost-net's owner rules: test_backend_vhost.py::test_owner_and_features")
    d = backend_class(backend)()
    try:
        with pytest.raises(DeviceError):
            d.set_features(VERSION_1)
        d.set_owner()
        with pytest.raises(DeviceError):
            d.set_owner()
        with pytest.raises(DeviceError):
            d.set_vring_num(2, 256)             # virtio-net has queues 0 and 1
        with pytest.raises(DeviceError):
            d.start()                           # nothing configured
        d.reset_owner()
        d.set_owner()
    finally:
        d.close()


def test_start_refuses_rings_outside_the_memory_table(rig):
    rig.dev.set_vring_addr(TX, 0xFF0000_0000, 0xFF0001_0000, 0xFF0002_0000)
    with pytest.raises(DeviceError):
        rig.dev.start()
    assert not rig.dev.running()
    rig.dev.set_vring_addr(TX, rig.txq.desc, rig.txq.avail, rig.txq.used)
    rig.dev.start()
    assert rig.dev.running()
    rig.dev.reset_owner()                       # stops the thread, forgets the fds
    assert not rig.dev.running()
    os.fstat(rig.kick[TX])                      # ... without closing them
    os.fstat(rig.dev_sock.fileno())


# -- stop, save the ring indices, resume (CPR) ----------------------------------------------------
def test_stop_leaves_memory_and_tap_alone(rig):
    rig.post_rx(8)
    rig.dev.start()
    rig.dev.stop()
    rig.peer.send(frame(0))
    rig.post_tx(frame(1))
    snap = rig.mem.read(0, MEM_SIZE)
    rig.kick_q(TX)
    rig.kick_q(RX)
    time.sleep(0.05)
    assert rig.mem.read(0, MEM_SIZE) == snap
    assert rig.dev_sock.recv(200) == frame(0)      # still queued: not drained after stop


def test_restart_from_saved_base(rig):
    """The CPR sequence: stop, read the indices, let go, set up a new device from them; a
    frame the guest queued meanwhile is sent, none twice."""
    for i in range(3):
        rig.post_tx(frame(i))
    rig.dev.start()
    rig.kick_q(TX)
    assert [rig.peer.recv(4096) for _ in range(3)] == [frame(i) for i in range(3)]
    rig.txq.wait_used(3)
    rig.dev.stop()
    base = {q: rig.dev.get_vring_base(q) for q in (RX, TX)}
    assert base == {RX: 0, TX: 3}
    rig.dev.reset_owner()
    rig.post_tx(frame(42))                         # queued while no device is looking
    rig.replace_device(base)
    rig.dev.start()
    rig.kick_q(TX)
    assert rig.peer.recv(4096) == frame(42)
    rig.txq.wait_used(1)
    rig.dev.stop()
    assert rig.stats()["tx_packets"] == 1
    rig.peer.settimeout(0.05)
    with pytest.raises(socket.timeout):
        rig.peer.recv(4096)


def test_stop_restore_continues_without_loss_or_duplicates(rig):
    """Swap the backend for a fresh object (as a CPR does) many times under traffic."""
    total_tx, total_rx = 3000, 3000
    got_tx, got_rx = [], []
    stop = threading.Event()

    def sender():                      # the outside world feeding the "tap"
        for i in range(total_rx):
            while True:
                try:
                    rig.peer.send(frame(i, 64 + i % 500))
                    break
                except (BlockingIOError, socket.timeout):
                    time.sleep(0.001)

    def receiver():
        rig.peer.settimeout(0.2)
        while not stop.is_set() or len(got_tx) < total_tx:
            try:
                got_tx.append(rig.peer.recv(70000))
            except socket.timeout:
                if stop.is_set():
                    break

    rig.dev.start()
    threads = [threading.Thread(target=sender), threading.Thread(target=receiver)]
    for t in threads:
        t.start()
    rng = random.Random(1)
    sent = 0
    deadline = time.monotonic() + 60
    swaps = 0
    while (sent < total_tx or len(got_rx) < total_rx) and time.monotonic() < deadline:
        rig.txq.get_used()
        while sent < total_tx and rig.txq.free and rng.random() < 0.9:
            rig.post_tx(frame(sent, 64 + sent % 700))
            sent += 1
        rig.kick_q(TX)
        got_rx += [rig.rx_payload(h, n) for h, n in rig.rxq.get_used()]
        if rig.rxq.free:
            rig.post_rx(min(len(rig.rxq.free), rng.randrange(1, 16)), 1600)
            rig.kick_q(RX)
        if rng.random() < 0.05:        # live update: stop, read indices, new object, restore
            rig.dev.stop()
            base = {q: rig.dev.get_vring_base(q) for q in (RX, TX)}
            assert base[TX] == rig.txq.used_idx() and base[RX] == rig.rxq.used_idx()
            rig.replace_device(base)
            rig.dev.start()
            swaps += 1
        time.sleep(0.0002)
    stop.set()
    for t in threads:
        t.join(10)
    assert swaps > 5
    assert [frame_number(p) for p in got_tx] == list(range(total_tx))
    assert [p[HDR:] for p in got_rx] == [frame(i, 64 + i % 500)[HDR:] for i in range(total_rx)]


# -- counters under load ----------------------------------------------------------------------
def test_echo_under_load_counters_agree(rig):
    """The test plays netecho: every frame received is sent back at once, with many in
    flight.  The peer gets each exactly once, in order; the counters say the same (TX never
    ahead of RX: a stale used entry would make the driver echo a frame twice)."""
    total, window = 3000, 64
    rig.post_rx(128, 1600)
    rig.dev.start()
    echoed, got = 0, []
    sent = 0
    deadline = time.monotonic() + 60
    while len(got) < total and time.monotonic() < deadline:
        while sent < total and sent - len(got) < window:
            rig.peer.send(frame(sent, 64 + sent % 1400))
            sent += 1
        rig.txq.get_used()
        for h, n in rig.rxq.get_used():
            rig.post_tx(rig.rx_payload(h, n))
            echoed += 1
            rig.rxq.add([(*rig.rxq.buf(1600), F_WRITE)])
        rig.kick_q(TX)
        rig.kick_q(RX)
        try:
            rig.peer.settimeout(0.001)
            while True:
                got.append(rig.peer.recv(70000))
        except socket.timeout:
            pass
    rig.dev.stop()
    assert [frame_number(p) for p in got] == list(range(total))
    assert all(p[HDR:] == frame(i, 64 + i % 1400)[HDR:] for i, p in enumerate(got))
    st = rig.stats()
    assert st["rx_packets"] == st["tx_packets"] == echoed == total, st
    assert st["rx_dropped"] == 0 and st["tx_dropped"] == 0, st


# -- a real tap ---------------------------------------------------------------------------------
TAP_SCRIPT = textwrap.dedent(r"""
    import socket, struct, subprocess, sys
    from virtq_driver import HDR, RX, TX, Rig, backend_class, hdr, wait_for
    from vmm.net.tap import Tap

    tap = Tap.create("vnt0")
    run = lambda *a: subprocess.run(a, check=True)
    run("ip", "link", "set", "lo", "up")
    run("ip", "addr", "add", "10.9.0.1/24", "dev", "vnt0")
    run("ip", "link", "set", "vnt0", "up")
    guest_mac = bytes.fromhex("525400123456")
    run("ip", "neigh", "add", "10.9.0.2", "lladdr", "52:54:00:12:34:56", "dev", "vnt0")
    r = Rig(backend_class(sys.argv[1]), tap_fd=tap.fd)
    r.post_rx(16)
    r.dev.start()
    # host -> guest: a UDP datagram to the guest's IP arrives in an RX buffer
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("10.9.0.1", 5555))
    u.sendto(b"hello guest", ("10.9.0.2", 7777))
    frames = []                      # (the kernel may send IPv6 frames to the tap too)
    udp_in = lambda: [d for d in frames
                      if d[HDR:HDR + 6] == guest_mac and d.endswith(b"hello guest")]
    assert wait_for(lambda: frames.extend(r.rx_payload(h, n) for h, n in r.rxq.get_used())
                    or udp_in()), f"UDP frame not received (got {len(frames)} others)"
    found = udp_in()
    assert len(found) == 1, found
    assert found[0][10:12] == struct.pack("<H", 1)          # num_buffers
    # guest -> host: a UDP datagram from 10.9.0.2 to the host's socket
    host_mac = bytes.fromhex(open("/sys/class/net/vnt0/address").read().strip().replace(":", ""))
    payload = b"hello host"
    udp = struct.pack("!HHHH", 7777, 5555, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                     socket.inet_aton("10.9.0.2"), socket.inet_aton("10.9.0.1"))
    s = sum(struct.unpack("!10H", ip)); s = (s & 0xFFFF) + (s >> 16); s = (s & 0xFFFF) + (s >> 16)
    ip = ip[:10] + struct.pack("!H", ~s & 0xFFFF) + ip[12:]
    eth = host_mac + guest_mac + b"\x08\x00"
    r.post_tx(hdr() + eth + ip + udp)
    r.kick_q(TX)
    u.settimeout(5)
    data, addr = u.recvfrom(100)
    assert data == payload and addr[0] == "10.9.0.2", (data, addr)
    r.txq.wait_used(1)
    r.dev.stop()
    assert r.dev.get_vring_base(TX) == 1
    assert r.dev.get_vring_base(RX) == r.rxq.used_idx()
    assert r.dev.error() is None
    print("TAP-OK", r.dev.stats())
    r.close()
""")


def test_real_tap_in_netns(tmp_path, backend):
    """Both directions through a real tap in a private network namespace: the kernel's UDP
    socket on one side, the test's driver on the other."""
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs root and /dev/net/tun to create a tap in a network namespace")
    ns = f"pyvmm-dp-{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", ns], capture_output=True).returncode:
        pytest.skip("cannot create a network namespace (ip netns add failed)")
    try:
        script = tmp_path / "tap_check.py"
        script.write_text(TAP_SCRIPT)
        env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}")
        p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, str(script), backend],
                           capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
        assert p.returncode == 0 and "TAP-OK" in p.stdout, p.stdout + p.stderr
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


# -- the whole device: virtio-mmio + VirtioNet + a backend, quiesced and resumed ------------------
class FakeVm:
    def __init__(self):
        self.ioeventfds, self.irqfds = {}, {}

    def add_ioeventfd(self, addr, length, fd, datamatch=None):
        self.ioeventfds[datamatch] = fd

    def remove_ioeventfd(self, addr, length, fd, datamatch=None):
        del self.ioeventfds[datamatch]

    def add_irqfd(self, fd, gsi):
        self.irqfds[gsi] = fd

    def remove_irqfd(self, fd, gsi):
        del self.irqfds[gsi]


class SocketTap:
    """A datagram socket standing in for a Tap."""

    def __init__(self, sock):
        self.sock, self.fd, self.offloads, self.up = sock, sock.fileno(), None, True

    def set_offloads(self, features):
        self.offloads = features

    def link_up(self):
        return self.up


def wr(t, off, value):
    t.write(off, struct.pack("<I", value))


def rd(t, off):
    return struct.unpack("<I", t.read(off, 4))[0]


def driver_bring_up(t, rx, tx, features, *more):
    """The driver's handshake through DRIVER_OK with queues rx, tx (and `more`, e.g. ctrl)."""
    from vmm.virtio import ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK
    from vmm.virtio import mmio as M
    wr(t, M.STATUS, ACKNOWLEDGE | DRIVER)
    for sel in (0, 1):
        wr(t, M.DEVICE_FEATURES_SEL, sel)
        offered = rd(t, M.DEVICE_FEATURES)
        wr(t, M.DRIVER_FEATURES_SEL, sel)
        wr(t, M.DRIVER_FEATURES, offered & (features >> 32 * sel))
    wr(t, M.STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK)
    assert rd(t, M.STATUS) & FEATURES_OK
    for i, q in enumerate((rx, tx, *more)):
        wr(t, M.QUEUE_SEL, i)
        wr(t, M.QUEUE_NUM, q.num)
        wr(t, M.QUEUE_DESC_LOW, q.desc)
        wr(t, M.QUEUE_DRIVER_LOW, q.avail)
        wr(t, M.QUEUE_DEVICE_LOW, q.used)
        wr(t, M.QUEUE_READY, 1)
    wr(t, M.STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)


def test_virtio_net_end_to_end_with_live_update(backend):
    """The device as a guest sees it, through a live update: quiesce, save the state (through
    the state blob), let go; a new device on the same RAM and "tap" resumes where the rings
    stand, replays the kick a frame queued meanwhile would have sent; a broken chain then
    shows as DEVICE_NEEDS_RESET and a reset brings the device back."""
    need_socketpair_backend(backend)
    from vmm import state as state_blob
    from vmm.devices.virtio_net import VirtioNet, VirtioNetState
    from vmm.memory import GuestMemory
    from vmm.virtio import ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FEATURES_OK
    from vmm.virtio import mmio as M
    from vmm.virtio.mmio import MmioState, VirtioMmio
    mem = GuestMemory(MEM_SIZE)
    a, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)
    peer.settimeout(3)
    mac = bytes.fromhex("525400123456")
    rx, tx = Queue(mem, RX, 16), Queue(mem, TX, 16)
    make = backend_class(backend)
    net = VirtioNet(SocketTap(a), mac, lambda: make(mem))
    t = VirtioMmio(net, 0xD000_0000, 5, FakeVm(), mem)
    new_t = None
    try:
        assert t.read(M.CONFIG, 8) == mac + b"\x01\x00"
        feats = VERSION_1 | 1 << 5 | 1 << 16 | MRG_RXBUF | EVENT_IDX | 0b11
        driver_bring_up(t, rx, tx, feats)
        assert net.tap.offloads == feats
        assert rd(t, M.STATUS) == ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK

        tx.add([(*tx.buf(frame(40)), 0)])
        wr(t, M.QUEUE_NOTIFY, TX)
        assert peer.recv(4096) == frame(40)
        tx.wait_used(1)
        assert rd(t, M.INTERRUPT_STATUS) & 1
        wr(t, M.INTERRUPT_ACK, 1)

        rx.add([(*rx.buf(2048), F_WRITE)])
        wr(t, M.QUEUE_NOTIFY, RX)
        peer.send(frame(70))
        assert rx.wait_used(1)[0][1] == len(frame(70))

        # -- live update: old side
        net.quiesce()
        assert [q.next_avail for q in t.queues] == [1, 1, 0]   # (the control queue: unused)
        tree = state_blob.loads(state_blob.dumps({"transport": t.save().to_tree(),
                                                  "virtio": net.save().to_tree()}))
        saved = MmioState.from_tree(tree["transport"])
        saved_net = VirtioNetState.from_tree(tree["virtio"])
        net.release()
        t.close()
        assert tree["transport"]["queues"][1]["next_avail"] == 1
        tx.add([(*tx.buf(frame(41)), 0)])      # queued while no VMM is looking

        # -- new side: same RAM, same "tap" fd, new eventfds
        net2 = VirtioNet(SocketTap(a), None, lambda: make(mem))
        new_t = VirtioMmio(net2, 0xD000_0000, 5, FakeVm(), mem)
        net2.restore(saved_net)
        new_t.restore(saved)
        assert net2.mac == mac
        assert peer.recv(4096) == frame(41)    # the replayed kick found it
        tx.wait_used(1)
        assert new_t.save().status == saved.status

        # a broken chain shows up as DEVICE_NEEDS_RESET; a reset brings the device back
        tx.put_desc(0, tx.buf(64)[0], 64, F_NEXT, 0)
        tx.publish(0)
        wr(new_t, M.QUEUE_NOTIFY, TX)
        assert wait_for(lambda: rd(new_t, M.STATUS) & DEVICE_NEEDS_RESET)
        wr(new_t, M.STATUS, 0)
        assert rd(new_t, M.STATUS) == 0
        assert net2.tap.offloads == 0
    finally:
        if new_t is not None:
            new_t.reset()
        t.reset()
        a.close()
        peer.close()
        mem.close()
    assert not [th for th in threading.enumerate() if th.name == "pyvmm-net"]


def test_virtio_net_refuses_inconsistent_offloads():
    from vmm.devices.virtio_net import VirtioNet
    from vmm.net.backend_python import PyNetBackend
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        net = VirtioNet(SocketTap(a), None, PyNetBackend)
        assert not net.ack_features(VERSION_1 | GUEST_TSO4)        # without GUEST_CSUM
        assert not net.ack_features(VERSION_1 | 1 << 13 | 1)        # HOST_ECN without HOST_TSO
        assert net.ack_features(VERSION_1 | GUEST_TSO4 | GUEST_CSUM)
        assert not net.features & 1 << 5  # no MAC given: the guest picks one
        with pytest.raises(DeviceError, match="6 bytes"):
            VirtioNet(SocketTap(a), b"\x01\x02", PyNetBackend)
    finally:
        a.close()
        b.close()
