"""What a machine's shape and its saved state contain: one schema, checked whole
before anything touches KVM.

A blob or a `hello` can pass every check of the format (magic, version,
checksum, lengths) and still not be what pyvmm saved: a field missing, a string
where a number belongs, an array that would size a C allocation.  The restore
code reads its input trusting this module to have refused all of that first,
with one line naming the field: `state: devices.serial.state.lsr: missing`,
`shape: memory.size: expected int, got str`.

The save side is the source of truth: this tree mirrors `Machine.shape()`,
`Machine.save_state()` and `Migration._save()`, with the kernel structs' sizes
taken from the structs themselves; each device's state is described by its own
State class (vmm/devices/__init__.py), found through the device registry.
`tests/test_schema.py` checks that every field a real machine saves is
described here, so the two cannot drift apart silently.  Fields this schema
does not name are ignored (never read).

Its imports are inside functions on purpose: the tree is built on first use from
the modules it describes (several of which import this one), and the check runs
on the cpr-exec resume path, where every import is downtime.
"""

from __future__ import annotations

from .state import StateError

U8, U16, U32, U64 = 0xFF, 0xFFFF, 0xFFFF_FFFF, (1 << 64) - 1
IOAPIC_PINS = 24   # a net device's interrupt is one of them (GSI FIRST_GSI + index)
MOST_DEVICES = 256


class _Fail(Exception):
    """(internal) a field is wrong: its path from the root, and why."""

    def __init__(self, path, why: str):
        self.path, self.why = _render(path), why


def _kind(value) -> str:
    if isinstance(value, bool):
        return "bool"
    return {dict: "map", list: "list"}.get(type(value), type(value).__name__)


def _show(value) -> str:
    """A value for an error message, cut short (it may be hostile and huge)."""
    if isinstance(value, int) and abs(value) >= 1 << 256:
        return "a huge number"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _at(path, key):
    """The path of a field inside `path`: kept as a (parent, key) pair and only
    spelled out when a check fails (the check runs inside the downtime, where
    formatting every field's name cost more than checking it)."""
    return (path, key)


def _render(path) -> str:
    """A path as people read it: `devices.serial.state.lsr`, `vcpus[0]`."""
    keys = []
    while isinstance(path, tuple):
        path, key = path
        keys.append(key)
    text = path or ""
    for key in reversed(keys):
        if isinstance(key, int):
            text += f"[{key}]"
        else:
            key = key if len(key) <= 40 else key[:37] + "..."
            text = f"{text}.{key}" if text else key
    return text


class Int:
    """An integer (not a bool) in [lo, hi]."""

    def __init__(self, lo: int = 0, hi: int = U64):
        self.lo, self.hi = lo, hi

    def check(self, v, path):
        if type(v) is not int:
            raise _Fail(path, f"expected int, got {_kind(v)}")
        if not self.lo <= v <= self.hi:
            raise _Fail(path, f"{_show(v)} is out of range {self.lo}..{self.hi}")


class Bool:
    def check(self, v, path):
        if type(v) is not bool:
            raise _Fail(path, f"expected bool, got {_kind(v)}")


class Str:
    def __init__(self, *choices: str):
        self.choices = choices

    def check(self, v, path):
        if type(v) is not str:
            raise _Fail(path, f"expected str, got {_kind(v)}")
        if self.choices and v not in self.choices:
            raise _Fail(path, f"{_show(v)} is not one of {', '.join(map(repr, self.choices))}")


class Bytes:
    """Bytes of an exact size, one of some sizes, at most `most`, or a whole
    number of `unit`-byte records; `problem(value)` may say what else is wrong."""

    def __init__(self, size=None, *, sizes=(), most=None, unit=None, problem=None):
        self.sizes = (size,) if size is not None else tuple(sizes)
        self.most, self.unit, self.problem = most, unit, problem

    def check(self, v, path):
        if type(v) is not bytes:
            raise _Fail(path, f"expected bytes, got {_kind(v)}")
        n = len(v)
        if self.sizes and n not in self.sizes:
            raise _Fail(path, f"expected {' or '.join(map(str, self.sizes))} bytes, got {n} "
                        "(a state from another kernel or pyvmm version?)")
        if self.most is not None and n > self.most:
            raise _Fail(path, f"{n} bytes, at most {self.most}")
        if self.unit and n % self.unit:
            raise _Fail(path, f"{n} bytes is not a whole number of {self.unit}-byte records")
        if self.problem:
            why = self.problem(v)
            if why:
                raise _Fail(path, why)


class Nullable:
    def __init__(self, spec):
        self.spec = spec

    def check(self, v, path):
        if v is not None:
            self.spec.check(v, path)


class List:
    """A list of `item`s, at most `most` long (or `items`: a fixed tuple, one spec each)."""

    def __init__(self, item=None, most: int = 1 << 16, *, items=None):
        self.item, self.most, self.items = item, most, items

    def check(self, v, path):
        if type(v) is not list:
            raise _Fail(path, f"expected list, got {_kind(v)}")
        if self.items is not None:
            if len(v) != len(self.items):
                raise _Fail(path, f"expected {len(self.items)} items, got {len(v)}")
            for i, (spec, x) in enumerate(zip(self.items, v)):
                spec.check(x, _at(path, i))
            return
        if len(v) > self.most:
            raise _Fail(path, f"{len(v)} items, at most {self.most}")
        spec = self.item
        for i, x in enumerate(v):
            spec.check(x, _at(path, i))


class Map:
    """A map with these fields (all required but `optional`); `rule(value)` may then
    say what is wrong across fields.  Other keys are ignored."""

    def __init__(self, fields: dict, optional=(), rule=None):
        self.fields, self.optional, self.rule = fields, frozenset(optional), rule

    def check(self, v, path):
        if type(v) is not dict:
            raise _Fail(path, f"expected map, got {_kind(v)}")
        for key, spec in self.fields.items():
            if key in v:
                spec.check(v[key], _at(path, key))
            elif key not in self.optional:
                raise _Fail(_at(path, key), "missing")
        if self.rule:
            why = self.rule(v)
            if why:
                raise _Fail(path, why)


class Names:
    """A map from names (str) to values of one spec."""

    def __init__(self, value, most: int = 1024):
        self.value, self.most = value, most

    def check(self, v, path):
        if type(v) is not dict:
            raise _Fail(path, f"expected map, got {_kind(v)}")
        if len(v) > self.most:
            raise _Fail(path, f"{len(v)} entries, at most {self.most}")
        for key, x in v.items():
            self.value.check(x, _at(path, key))


class DeviceEntry:
    """One saved device (vmm/devices/__init__.py): its kind, from the registry, picks
    the spec of its state (that device's State class, its module imported only now)."""

    head = Map({"kind": Str(), "version": Int(0, U32), "fds": List(Str(), 16), "state": Map({})})

    def __init__(self, kinds):
        self.kinds = kinds   # the device registry (vmm.devices.KINDS)

    def resolve(self, v):
        """The State class for entry `v` (a map with a known kind)."""
        from .devices import device_class
        return device_class(v["kind"]).State

    def check(self, v, path):
        self.head.check(v, path)
        if v["kind"] not in self.kinds:
            raise _Fail(_at(path, "kind"), f"{_show(v['kind'])} is not a device this pyvmm has")
        state = self.resolve(v)
        tree = v["state"]
        if v["version"] != state.VERSION:
            if v["version"] not in state.UPGRADES:
                raise _Fail(_at(path, "version"), f"{v['kind']} state version {v['version']}, "
                            f"this pyvmm reads version {state.VERSION}")
            try:
                tree = state.upgrade(v["version"], tree)
            except (KeyError, TypeError, ValueError, AttributeError, IndexError):
                raise _Fail(_at(path, "state"), f"{v['kind']} state version {v['version']} "
                            "is malformed: it cannot be converted") from None
        state.check(tree, _at(path, "state"))


class Schema:
    """A whole tree's spec; check() raises StateError naming the first bad field."""

    def __init__(self, name: str, spec):
        self.name, self.spec = name, spec

    def check(self, tree):
        try:
            self.spec.check(tree, "")
        except _Fail as f:
            raise StateError(f"{self.name}: {f.path}: {f.why}" if f.path
                             else f"{self.name}: {f.why}") from None
        except RecursionError:   # (the decoders bound depth; this is the last guard)
            raise StateError(f"{self.name}: nests too deeply") from None
        return tree


# -- the tree ------------------------------------------------------------------------------
def _build():
    from .cpr.faults import POINTS
    from .devices import KINDS
    from .kvm.ffi import ffi
    from .kvm.vcpu import _SIMPLE_STATE, MAX_MSRS, MSR_ENTRY_SIZE, cpuid_bytes_problem
    from .kvm.vm import IRQCHIPS, MAX_VCPUS
    from .memory import MIN_RAM

    i64 = Int(-(1 << 63), (1 << 63) - 1)
    u32, u64 = Int(0, U32), Int(0, U64)
    fd = Int(0, (1 << 31) - 1)

    def shape_rule(s):
        if len(s["cpuid"]) != s["vcpus"]:
            return f"cpuid: {len(s['cpuid'])} entries for {s['vcpus']} vCPUs"
        return None

    shape = Map({
        "arch": Str("x86_64"),
        "vcpus": Int(1, MAX_VCPUS),
        "memory": Map({"size": Int(MIN_RAM, 1 << 52), "name": Str(), "hugetlb": Bool(),
                       "regions": List(List(items=(u64, u64, u64)), 8)},
                      optional=("name", "hugetlb", "regions")),
        "kernel": Nullable(Str()),
        "cmdline": Str(),
        "cpuid": List(Bytes(problem=cpuid_bytes_problem), MAX_VCPUS),
        "devices": List(Str(*KINDS), len(KINDS)),   # the kinds of its devices
    }, optional=("kernel", "cmdline", "devices"), rule=shape_rule)

    vcpu = Map({name: Bytes(ffi.sizeof(ctype)) for name, (ctype, *_) in _SIMPLE_STATE.items()}
               | {"msrs": Bytes(unit=MSR_ENTRY_SIZE, most=MAX_MSRS * MSR_ENTRY_SIZE)},
               optional=list(_SIMPLE_STATE) + ["msrs"])
    vm = Map({"irqchip": Map({name: Bytes(ffi.sizeof("struct kvm_irqchip")) for name in IRQCHIPS}),
              "pit": Bytes(ffi.sizeof("struct kvm_pit_state2")),
              "clock_ns": u64}, optional=("irqchip", "pit"))
    config = Map({"console": Nullable(Str()), "qmp": Nullable(Str()), "nets": List(Str(), 64)},
                 optional=("console", "qmp", "nets"))
    faults = List(Str(*POINTS), len(POINTS))

    def cpr_rule(c):
        if c["mode"] == "cpr-exec" and "ram" not in c["fds"]:
            return "fds: no RAM fd named \"ram\""
        return None

    mark = List(items=(Str(), Nullable(i64)))
    cpr = Map({"mode": Str("cpr-transfer", "cpr-exec"), "timeline": List(mark, 256),
               "steps": List(mark, 1024), "fds": Names(fd, 256), "config": config,
               "faults": faults, "pyvmm": Str(), "protocol": Int(1, U32),
               "mmio_writes": List(List(items=(Int(), Bytes(most=8))), 64)},
              optional=("steps", "config", "faults", "pyvmm", "protocol", "mmio_writes"),
              rule=cpr_rule)

    def state_rule(s):
        n = s["machine"]["vcpus"]
        if len(s["vcpus"]) != n:
            return f"vcpus: {len(s['vcpus'])} vCPU states for a machine of {n}"
        return None

    state = Map({
        "machine": shape,
        "vm": vm,
        "vcpus": List(vcpu, MAX_VCPUS),
        "devices": Names(DeviceEntry(KINDS), MOST_DEVICES),
        "time": Map({"host_ns": i64, "tsc_khz": u32}),
        "cpr": cpr,
    }, rule=state_rule)

    # cpr-transfer's hand-back: the guest's vCPU and VM state from a new VMM that ran it
    # early and then failed (vmm/cpr/handoff.py), for the old VMM to take it back.
    handback = Map({"vm": vm, "vcpus": List(vcpu, MAX_VCPUS),
                    "time": Map({"host_ns": i64, "tsc_khz": u32}),
                    "mmio_writes": List(List(items=(Int(), Bytes(most=8))), 64)})

    hello = Map({"shape": Map({}), "config": config, "faults": faults, "pyvmm": Str(),
                 "commit": Bool(), "handoff": Bool(), "early": Bool()},
                optional=("config", "faults", "pyvmm", "commit", "handoff", "early"))
    state_msg = Map({"fds": List(Str(), 256), "t_transfer": Nullable(i64),
                     "steps": List(mark, 8), "handoff": Bool()},
                    optional=("t_transfer", "steps", "handoff"))
    return {"shape": Schema("shape", shape), "state": Schema("state", state),
            "saved": Schema("state", Map(dict(state.fields), optional=("cpr",), rule=state_rule)),
            "hello": Schema("hello", hello), "state-msg": Schema("state message", state_msg),
            "handback": Schema("hand-back state", handback)}


_SCHEMAS: dict | None = None


def schema(name: str) -> Schema:
    """"shape", "state" (a live update's blob), "saved" (the same without its "cpr"
    part: a machine's own save_state()), "hello" and "state-msg" (channel messages)."""
    global _SCHEMAS
    if _SCHEMAS is None:
        _SCHEMAS = _build()
    return _SCHEMAS[name]


def undescribed(name: str, tree) -> list[str]:
    """Paths of fields in `tree` that schema `name` does not name (for the test that
    keeps this schema and the save side in step)."""
    out: list[str] = []

    def walk(spec, v, path):
        if isinstance(spec, DeviceEntry) and type(v) is dict:
            spec = Map(dict(spec.head.fields, state=spec.resolve(v)))
        if isinstance(spec, type) and hasattr(spec, "FIELDS"):   # a device's State class
            spec = Map(spec.FIELDS)
        if isinstance(spec, Nullable):
            if v is not None:
                walk(spec.spec, v, path)
        elif isinstance(spec, Map) and type(v) is dict:
            for key, x in v.items():
                if key in spec.fields:
                    walk(spec.fields[key], x, _at(path, key))
                else:
                    out.append(_render(_at(path, key)))
        elif isinstance(spec, Names) and type(v) is dict:
            for key, x in v.items():
                walk(spec.value, x, _at(path, key))
        elif isinstance(spec, List) and type(v) is list:
            for i, x in enumerate(v):
                walk(spec.items[i] if spec.items else spec.item, x, _at(path, i))
    walk(schema(name).spec, tree, "")
    return out


def check(name: str, tree):
    """The tree, if it fits schema `name`; StateError naming the first field that does not."""
    return schema(name).check(tree)
