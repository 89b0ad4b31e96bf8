"""After a migration, tell the network where the guest is now (QEMU's announce-self).

A switch (or a Linux bridge) learned the guest's MAC on the source host's port;
until it sees a frame from that MAC on the destination's, it sends the guest's
traffic the old way.  Like QEMU, the destination sends a few broadcast RARP
frames with the guest's MAC as source on each of its taps, at 50, 150, 250,
350 and 450 ms after the guest runs again (QEMU's announce-initial 50 ms,
-step 100 ms, -rounds 5).  The frames go into the tap as if the guest had sent
them, with the tap's virtio-net header in front.
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


def announce(machine) -> None:
    """Start announcing every NIC's MAC on its tap (a thread; returns at once)."""
    from ..net import VNET_HDR_LEN
    frames = [(d.tap.fd, bytes(VNET_HDR_LEN) + rarp_frame(d.virtio.mac))
              for d in machine.devices if d.KIND == "net" and d.virtio.mac]
    if not frames:
        return

    def rounds():
        time.sleep(INITIAL)
        for _ in range(ROUNDS):
            for fd, frame in frames:
                try:
                    os.write(fd, frame)
                except OSError:
                    return   # the tap is gone (the VMM is exiting)
            time.sleep(STEP)
    threading.Thread(target=rounds, name="announce", daemon=True).start()
