"""After a migration, tell the network where the guest is now (QEMU's announce-self).

A switch (or a Linux bridge) learned the guest's MAC on the source host's port;
until it sees a frame from that MAC on the destination's, it sends the guest's
traffic the old way.  Like QEMU, the destination sends a few broadcast RARP
frames with the guest's MAC as source on each of its taps, at 50, 150, 250,
350 and 450 ms after the guest runs again (QEMU's announce-initial 50 ms,
-step 100 ms, -rounds 5).  The frames go into the tap as if the guest had sent
them, with the tap's virtio-net header in front.

Then, as QEMU does for a virtio-net whose driver negotiated
VIRTIO_NET_F_GUEST_ANNOUNCE, the guest is asked to announce itself too (right
after the first RARP round): the device sets VIRTIO_NET_S_ANNOUNCE and raises a
config interrupt, the guest's driver sends its own gratuitous ARP (which also
tells its peers, not only the switch) and acks on the control queue
(devices/virtio_net.py).  A guest that did not negotiate it gets the RARP only.

QMP's `announce-self` does the same on demand, with its own timing and NICs.
"""

from __future__ import annotations

import os
import struct
import threading
import time

ROUNDS, INITIAL, STEP = 5, 0.050, 0.100
ETH_P_RARP = 0x8035


def rarp_frame(mac: bytes) -> bytes:
    """A broadcast RARP "reverse request" from `mac`, padded to the Ethernet minimum."""
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 3, mac, bytes(4), mac, bytes(4))
    frame = b"\xff" * 6 + mac + struct.pack("!H", ETH_P_RARP) + arp
    return frame.ljust(60, b"\0")


def announce(machine, *, initial: float = INITIAL, rounds: int = ROUNDS, step: float = STEP,
             interfaces=None) -> None:
    """Start announcing the MACs of the NICs (all, or those whose id is in `interfaces`)
    on their taps, `rounds` times, `initial` s from now and then every `step` s, and
    asking the guest to announce itself (a thread; returns at once)."""
    from ..net import VNET_HDR_LEN
    nets = [d for d in machine.devices if d.KIND == "net" and
            (interfaces is None or d.id in interfaces)]
    frames = [(d.tap.fd, bytes(VNET_HDR_LEN) + rarp_frame(d.virtio.mac))
              for d in nets if d.virtio.mac]
    if not nets or rounds < 1:
        return

    def run():
        time.sleep(initial)
        for i in range(rounds):
            for fd, frame in frames:
                try:
                    os.write(fd, frame)
                except OSError:
                    return   # the tap is gone (the VMM is exiting)
            if i == 0:
                for d in nets:
                    d.announce()   # (only if its driver negotiated GUEST_ANNOUNCE)
            time.sleep(step)
    threading.Thread(target=run, name="announce", daemon=True).start()
