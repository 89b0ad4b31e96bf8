"""A network interface as the machine sees it: tap + virtio-net + virtio-mmio window.

(The device kind "net", one per `--net`.  Its parts: the virtio-net model,
devices/virtio_net.py, as `self.virtio`; the host side, vmm/net/: the tap and the
data-path backend that moves the frames.)

This is the glue between `--net tap,...`, the device model and the live-update
sequence.  Its part of stop -> notify -> save (the contract: vmm/devices/__init__.py):

    quiesce     stop the data path, write the ring positions into the queues, take the state
    notify      "setup": release the backend (vhost RESET_OWNER);
                "failed": take it back; "done": nothing left to do
    fds         the tap fd ("tap": passed as "netN.tap")
    restore     (new VMM) the same device on the passed tap, rings programmed
                from the saved positions but not started
    resume      start the data path (rollback in the old VMM, "go" in the new)

The tap, data-path and virtio modules are imported inside functions on purpose:
a new VMM imports, inside the downtime, only the data path its state names.
"""

from __future__ import annotations

from ..errors import DeviceError, VmmError
from ..schema import IOAPIC_PINS, Int, Str
from ..virtio.mmio import MMIO_SIZE, MmioState
from . import Device, State
from .virtio_net import VirtioNetState

MMIO_BASE = 0xD000_0000     # netN's window: MMIO_BASE + N * MMIO_SIZE
FIRST_GSI = 5
BACKENDS = ("c", "python", "vhost")


class NetState(State):
    """Which interface (index: its MMIO window and GSI), on which data path and tap
    (the tap's name, for people: the tap itself is the passed fd), and the
    transport's and the device's state.  Version 2: the control queue (a third queue
    in the transport) and the device's `announce`; a version 1 tree is converted."""
    VERSION = 2
    FIELDS = {"index": Int(0, IOAPIC_PINS - 1 - FIRST_GSI), "backend": Str(*BACKENDS),
              "tap": Str(), "transport": MmioState, "virtio": VirtioNetState}
    UPGRADES = {1: lambda tree: _net_from_1(tree)}


def _net_from_1(tree: dict) -> dict:
    """A version 1 net state (no control queue) as version 2: the device was never asked to
    announce, and its control queue was never set up (the transport's reset queue)."""
    from ..virtio import Queue
    from .virtio_net import CTRL, CTRL_QUEUE_SIZE
    queues = list(tree["transport"]["queues"])
    if len(queues) == CTRL:
        queues.append(Queue(CTRL_QUEUE_SIZE, num=CTRL_QUEUE_SIZE).to_tree())
    return dict(tree, transport=dict(tree["transport"], queues=queues),
                virtio=dict(tree["virtio"], announce=False))


def parse_spec(spec: str) -> dict:
    """`tap,ifname=NAME[,mac=52:54:00:..][,backend=c|python|vhost]` or `tap,fd=N`."""
    kind, _, rest = spec.partition(",")
    if kind != "tap":
        raise VmmError(f"--net {spec!r}: only tap networking exists: --net tap,ifname=NAME")
    opts = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in ("ifname", "fd", "mac", "backend"):
            raise VmmError(f"--net {spec!r}: unknown option {item!r} (use ifname=, fd=, mac=, "
                           "backend=)")
        opts[key] = value
    import re
    if "mac" in opts and not re.fullmatch(r"([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}", opts["mac"]):
        raise VmmError(f"--net: MAC {opts['mac']!r} should look like 52:54:00:12:34:56")
    if opts.get("backend", "c") not in BACKENDS:
        raise VmmError(f"--net: backend {opts['backend']!r}: choose c, python or vhost")
    if "fd" in opts and not opts["fd"].isdigit():
        raise VmmError(f"--net: fd={opts['fd']!r} is not a number")
    return opts


def backend_factory(name: str, mem):
    if name == "python":
        from ..net.backend_python import PyNetBackend
        return lambda: PyNetBackend(mem)
    if name == "vhost":
        from ..net.backend_vhost import VhostNetBackend
        return lambda: VhostNetBackend(mem)
    from ..net.backend_c import CNetBackend
    return lambda: CNetBackend(mem)


class NetDevice(Device):
    """One virtio-net interface of a machine."""

    KIND = "net"
    State = NetState

    def __init__(self, index: int, tap, mac: bytes | None, backend: str, vm, mem):
        from ..virtio.mmio import VirtioMmio
        from .virtio_net import VirtioNet
        self.index = index
        self.id = f"net{index}"
        self.tap = tap
        self.backend_name = backend
        self.base = MMIO_BASE + index * MMIO_SIZE
        self.gsi = FIRST_GSI + index
        self.virtio = VirtioNet(tap, mac, backend_factory(backend, mem))
        self.transport = VirtioMmio(self.virtio, self.base, self.gsi, vm, mem)
        self.saved: NetState | None = None   # taken at quiesce, before release

    @classmethod
    def warm_up(cls) -> None:
        """The tap's module and ioctls, the transport and the C data path (the default,
        and the only one a migration takes): 1-2 ms of imports in a new VMM, which the
        restore inside the downtime paid before (a state naming another data path still
        imports it there)."""
        import fcntl  # noqa: F401
        from ..net.backend_c import CNetBackend  # noqa: F401
        from ..net.tap import Tap  # noqa: F401
        from ..virtio.mmio import VirtioMmio  # noqa: F401
        from .virtio_net import VirtioNet  # noqa: F401

    @classmethod
    def create(cls, ctx, index: int, spec: str) -> "NetDevice":
        from ..net.tap import Tap
        opts = parse_spec(spec)
        if "fd" in opts:
            tap = Tap.from_fd(int(opts["fd"]))
        elif "ifname" in opts:
            tap = Tap.open(opts["ifname"])
        else:
            tap = Tap.create()
        mac = bytes.fromhex(opts["mac"].replace(":", "")) if "mac" in opts else \
            bytes([0x52, 0x54, 0x00, 0x12, 0x34, 0x56 + index])
        return cls(index, tap, mac, opts.get("backend", "c"), ctx.vm, ctx.memory)

    @classmethod
    def restore(cls, ctx, state: NetState, fds: dict[str, int]) -> "NetDevice":
        """(new VMM) the device on the passed tap, programmed from the saved state; the
        rings start on resume()."""
        from ..net.tap import Tap
        dev = cls(state.index, Tap.from_fd(fds["tap"]), None, state.backend, ctx.vm,
                  ctx.memory)
        try:
            dev.virtio.defer_start = True
            dev.virtio.restore(state.virtio)
            dev.transport.restore(state.transport)
            if dev.transport.failure:
                raise DeviceError(f"{dev.id}: restore failed: {dev.transport.failure}")
        except BaseException:
            # The tap fd stays open: it is still the caller's (a failed cpr-exec restore
            # execs again with the same fds).
            dev.virtio.close()
            dev.transport.close()
            raise
        return dev

    def attach(self, ctx) -> str:
        """Map the registers; returns the kernel cmdline snippet that announces the device."""
        ctx.mmio_bus.insert(self.base, MMIO_SIZE, self.transport)
        return self.transport.cmdline()

    # -- live update ----------------------------------------------------------------------
    def quiesce(self) -> None:
        self.virtio.quiesce()
        self.saved = self._state()

    def resume(self) -> None:
        self.saved = None
        self.virtio.defer_start = False
        if self.virtio.owned:
            self.virtio.resume()

    def notify(self, event: str) -> None:
        if event == "setup":
            self.virtio.release()
        elif event == "failed":
            if self.virtio.wiring is not None:
                self.virtio.reacquire()

    def fds(self) -> dict[str, int]:
        return {"tap": self.tap.fd}

    def announce(self) -> bool:
        """Ask the guest to announce itself (VIRTIO_NET_F_GUEST_ANNOUNCE: S_ANNOUNCE and a
        config interrupt), if its driver negotiated that; True if asked."""
        if not self.virtio.request_announce():
            return False
        self.transport.config_changed()
        return True

    def log_dirty(self, log) -> None:
        """Live migration: only the C data path logs the pages it writes (RX buffers,
        used rings); a migration without that log would lose what they received."""
        if self.backend_name != "c":
            if log is None:
                return
            raise VmmError(f"{self.id}: live migration needs the C data path (backend=c): "
                           f"the {self.backend_name} backend does not log its writes to "
                           "guest RAM")
        self.virtio.set_dirty_log(log)

    def _state(self) -> NetState:
        return NetState(index=self.index, backend=self.backend_name, tap=self.tap.name,
                        transport=self.transport.save(), virtio=self.virtio.save())

    def save(self) -> NetState:
        return self.saved if self.saved is not None else self._state()

    def summary(self) -> dict:
        t = self.transport
        return {"name": self.id, "type": "virtio-net-mmio", "base": f"{self.base:#x}",
                "gsi": self.gsi, "tap": self.tap.name, "backend": self.backend_name,
                "status": t.status, "features": f"{self.virtio.acked:#x}",
                "announce": self.virtio.announce,
                "queues": [{"num": q.num, "last_avail_idx": n}
                           for q, n in zip(t.queues, self.virtio.next_avail() or
                                           [q.next_avail for q in t.queues])],
                "stats": self.virtio.stats()}

    def close(self) -> None:
        self.virtio.close()
        self.transport.close()
        self.tap.close()
