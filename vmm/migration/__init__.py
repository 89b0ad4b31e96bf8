"""Live migration to another host: precopy over TCP with KVM's dirty log (docs/MIGRATION.md).

CPR hands a guest to a new VMM on the same RAM; migration copies the RAM to a
pyvmm on another host while the guest keeps running, then moves the rest the
way CPR does (the same stop, device save/restore and state blob, the same
rollback when anything fails before the destination runs the guest).

    stream.py    the wire format: a versioned header, then framed sections with a CRC-32C
    pages.py     which pages to send (KVM's dirty log ORed with the data path's), C packing
    sender.py    the source: passes, convergence, auto-converge, stop, commit or roll back
    receiver.py  the destination: listen, rebuild RAM and the machine, resume, announce
    announce.py  the RARP frames that tell the network where the guest went (announce-self)
"""

#: The QMP migration address transports a TCP migration takes.
def is_tcp(addr: dict | None) -> bool:
    """Is this MigrationAddress a TCP socket (QEMU's tcp:HOST:PORT)?"""
    return bool(addr) and addr.get("transport") == "socket" and addr.get("type") == "inet"
