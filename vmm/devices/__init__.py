"""Device models: one device per file (kvmtool style), each meeting the contract of
vmm/devices/persist.py.

KINDS is the registry: a device's kind (its name on the command line, `--device
KIND[,OPTS]`, and in saved state) -> "module:Class" in this package.  Adding a
device is one new file here and one line below; the machine, the live update and
the state schema find it through device_class().  Modules are imported only when a
machine has (or a saved state names) a device of their kind: on the cpr-exec resume
path every import is downtime.
"""

KINDS = {
    "serial": "serial:SerialDevice",
    "debug-exit": "debug_exit:DebugExitDevice",
    "net": "net:NetDevice",
    "scratch": "scratch:Scratch",
}

#: What every machine has, before what its config adds: (kind, spec) pairs.
DEFAULT_DEVICES = (("serial", ""), ("debug-exit", ""))


def device_class(kind: str):
    """The class of a registered device kind (its module imported now)."""
    from ..errors import VmmError
    where = KINDS.get(kind)
    if where is None:
        raise VmmError(f"no device kind {kind!r}: choose one of {', '.join(KINDS)}")
    module, _, name = where.partition(":")
    return getattr(__import__(f"{__name__}.{module}", fromlist=[name]), name)
