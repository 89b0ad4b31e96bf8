"""Device models: one device per file (kvmtool style), the contract they all meet,
and the registry that finds them.

The contract (as Firecracker's persist.rs): a device has a typed, versioned saved
state (a `State` subclass) and the parts the machine walks, in one list, for every
device alike:

    create(ctx, index, spec) -> Device    a new device, from the machine's config
    save() -> State                        what it is now (after quiesce, during a live update)
    restore(ctx, state, fds) -> Device     *constructs* the device from a saved state and
                                           the fds it named (fds(): {"tap": fd} -> "net0.tap")
    quiesce / notify(event) / resume       the live update's stop, notifier chain and go
    log_dirty(log)                         live migration: log the guest RAM it writes
    close()                                at VMM exit

KINDS is the registry: a device's kind (its name on the command line, `--device
KIND[,OPTS]`, and in saved state) -> "module:Class" in this package.  Adding a
device is one new file here and one line in KINDS; the machine, the live update and
the state schema find it through device_class().  Modules are imported only when a
machine has (or a saved state names) a device of their kind: on the cpr-exec resume
path every import is downtime (which is also why the contract lives here, in the
package everyone imports anyway, and not in a module of its own).

The machine saves each device as one entry of `state["devices"]`, keyed by its id:

    {"serial": {"kind": "serial", "version": 1, "fds": [], "state": {...}},
     "net0":   {"kind": "net", "version": 1, "fds": ["tap"], "state": {...}}}

`State` is a small typed record, not `dataclasses`: importing that module costs
~35 ms in the cpr-exec image (it pulls in `inspect`).  Its FIELDS are the schema
specs of vmm/schema.py, so a state's type and the check of a saved tree have one
source.  A state written by pyvmm 0.1.0 is converted by vmm/devices/compat.py.
"""

from __future__ import annotations

from ..schema import List, Map

KINDS = {
    "serial": "serial:SerialDevice",
    "debug-exit": "debug_exit:DebugExitDevice",
    "net": "net:NetDevice",
    "scratch": "scratch:Scratch",
}

#: What every machine has, before what its config adds: (kind, spec) pairs.
DEFAULT_DEVICES = (("serial", ""), ("debug-exit", ""))


_classes: dict = {}   # kind -> class, once imported (looked up inside the downtime)


def device_class(kind: str):
    """The class of a registered device kind (its module imported now)."""
    cls = _classes.get(kind)
    if cls is not None:
        return cls
    from ..errors import VmmError
    where = KINDS.get(kind)
    if where is None:
        raise VmmError(f"no device kind {kind!r}: choose one of {', '.join(KINDS)}")
    module, _, name = where.partition(":")
    cls = _classes[kind] = getattr(__import__(f"{__name__}.{module}", fromlist=[name]), name)
    return cls


class State:
    """A device's saved state: the fields in FIELDS (name -> schema spec, a nested
    State class, or List(StateClass)), at version VERSION.  Converts to and from
    the plain tree a state blob holds."""

    VERSION = 1
    FIELDS: dict = {}
    #: How an older saved tree becomes this version's: {version: function(tree) -> the
    #: tree at version + 1}, a new tree (the saved one is left as it was).  The schema
    #: check and the restore both go through upgrade(), so an entry saved at an older
    #: VERSION of the same pyvmm (e.g. a live update from a build before a device grew a
    #: field) is checked and restored as this version's.
    UPGRADES: dict = {}
    _map = None

    def __init__(self, **values):
        if values.keys() != self.FIELDS.keys():
            missing = [n for n in self.FIELDS if n not in values]
            extra = [n for n in values if n not in self.FIELDS]
            raise TypeError(f"{type(self).__name__}: missing {missing}, unknown {extra}")
        self.__dict__.update(values)

    def __eq__(self, other):
        return type(self) is type(other) and self.to_tree() == other.to_tree()

    def __repr__(self):
        inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.FIELDS)
        return f"{type(self).__name__}({inner})"

    def to_tree(self) -> dict:
        return {name: _to_tree(getattr(self, name)) for name in self.FIELDS}

    @classmethod
    def from_tree(cls, tree: dict) -> "State":
        """The state from a tree that passed check() (the schema did the validating)."""
        return cls(**{name: _from_tree(spec, tree[name]) for name, spec in cls.FIELDS.items()})

    @classmethod
    def upgrade(cls, version: int, tree: dict) -> dict:
        """The tree saved at `version`, in this VERSION's layout (KeyError: no way there)."""
        while version != cls.VERSION:
            tree = cls.UPGRADES[version](tree)
            version += 1
        return tree

    @classmethod
    def check(cls, tree, path: str) -> None:
        """(vmm.schema's spec protocol) the tree fits FIELDS, or _Fail naming the field."""
        if cls.__dict__.get("_map") is None:
            cls._map = Map(cls.FIELDS)
        cls._map.check(tree, path)


def _is_state(spec) -> bool:
    return isinstance(spec, type) and issubclass(spec, State)


def _to_tree(value):
    if isinstance(value, State):
        return value.to_tree()
    if isinstance(value, list):
        return [_to_tree(v) for v in value]
    return value


def _from_tree(spec, value):
    if _is_state(spec):
        return spec.from_tree(value)
    if isinstance(spec, List) and _is_state(spec.item):
        return [spec.item.from_tree(v) for v in value]
    return value


class DeviceContext:
    """What a device may use of the machine it is built into."""

    def __init__(self, vm, memory, pio_bus, mmio_bus, console, request_exit, uart_fast):
        self.vm = vm
        self.memory = memory
        self.pio_bus = pio_bus
        self.mmio_bus = mmio_bus
        self.console = console            # callable taking bytes (FdConsole: has .fd)
        self.request_exit = request_exit  # request_exit(code): the guest asked to stop
        self.uart_fast = uart_fast        # the vCPU loop's UART fast path (struct), for serial


class Device:
    """Base of every device: the contract above, its optional parts as no-ops."""

    KIND = ""            # its name in the registry (vmm/devices/__init__.py) and saved state
    State = State        # its saved-state class
    id = ""              # unique in a machine; its passed fds are named "<id>.<name>"

    @classmethod
    def create(cls, ctx: DeviceContext, index: int, spec: str) -> "Device":
        """A new device; `index` counts the devices of this kind before it, `spec` is
        what the command line said after the kind (e.g. `value=5`)."""
        raise NotImplementedError

    @classmethod
    def restore(cls, ctx: DeviceContext, state: State, fds: dict[str, int]) -> "Device":
        """The device a save() described, on the fds it named (not started yet: the
        machine calls resume() when the guest goes on)."""
        raise NotImplementedError

    @classmethod
    def warm_up(cls) -> None:
        """In a new VMM before the stop, for a kind whose throwaway copy cannot be made
        (one that passes fds: making it would open what it owns): import what restore()
        will, so that it does not import inside the downtime."""

    def attach(self, ctx: DeviceContext) -> str:
        """Put the device on its bus; returns a kernel cmdline snippet ("" for none)."""
        return ""

    def save(self) -> State:
        raise NotImplementedError

    def fds(self) -> dict[str, int]:
        """Fds a new VMM needs to take the device over, by short name."""
        return {}

    def quiesce(self) -> None:
        """Stop touching guest RAM and the outside (the guest is paused)."""

    def notify(self, event: str) -> None:
        """The notifier chain: "setup" (let go of what the new VMM takes), "failed"
        (take it back, the update was abandoned), "done"."""

    def resume(self) -> None:
        """Run again (after an abandoned update in the old VMM, on "go" in the new one)."""

    def log_dirty(self, log) -> None:
        """Live migration (vmm/migration/): mark in `log` (vmm.net.backend_c.DirtyLog)
        every page of guest RAM this device writes itself, which KVM's dirty log does not
        see; None stops.  A device that writes guest RAM and cannot log it raises
        VmmError (the migration is refused before it starts)."""

    def summary(self) -> dict:
        """What `pyvmm state` shows of the device."""
        return {"name": self.id, "type": self.KIND}

    def close(self) -> None:
        """Free what the device holds (VMM exit)."""


def entry(device: Device) -> dict:
    """A device's entry in state["devices"] (its id is the key)."""
    return {"kind": device.KIND, "version": device.State.VERSION, "fds": list(device.fds()),
            "state": device.save().to_tree()}
