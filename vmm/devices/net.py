"""A network interface as the machine sees it: tap + virtio-net + virtio-mmio window.

This is the glue between `--net tap,...`, the device model and the live-update
sequence.  Its cpr_* methods are the device's part of stop -> notify -> save:

    cpr_quiesce     stop the data path, read the ring indices, take the state
    cpr_notify      "setup": release the backend (vhost RESET_OWNER);
                    "failed": take it back; "done": nothing left to do
    cpr_fds         the tap fd, named "netN.tap"
    cpr_restore     (new VMM) the same device on the passed tap, rings programmed
                    from the saved indices but not started
    cpr_unquiesce   start the data path (rollback in the old VMM, "go" in the new)
"""

from __future__ import annotations


from ..errors import DeviceError, VmmError

MMIO_BASE = 0xD000_0000
MMIO_SIZE = 0x1000
FIRST_GSI = 5
BACKENDS = ("c", "python", "vhost")


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
        from ..net.pypath import PyNetBackend
        return lambda: PyNetBackend(mem)
    if name == "vhost":
        from ..net.vhost import VhostNetBackend
        return lambda: VhostNetBackend(mem)
    from ..net.cpath import CNetBackend
    return lambda: CNetBackend(mem)


class NetDevice:
    """One virtio-net interface of a machine."""

    def __init__(self, index: int, tap, mac: bytes | None, backend: str, vm, mem):
        from ..virtio.mmio import VirtioMmio
        from .virtio_net import VirtioNet
        self.index = index
        self.name = f"net{index}"
        self.tap = tap
        self.backend_name = backend
        self.base = MMIO_BASE + index * MMIO_SIZE
        self.gsi = FIRST_GSI + index
        self.net = VirtioNet(tap, mac, backend_factory(backend, mem))
        self.transport = VirtioMmio(self.net, self.base, self.gsi, vm, mem)
        self.saved: dict | None = None

    @classmethod
    def from_spec(cls, index: int, spec: str, vm, mem) -> "NetDevice":
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
        return cls(index, tap, mac, opts.get("backend", "c"), vm, mem)

    def attach(self, mmio_bus) -> str:
        """Map the registers; returns the kernel cmdline snippet that announces the device."""
        mmio_bus.insert(self.base, MMIO_SIZE, self.transport)
        return self.transport.cmdline()

    # -- live update ----------------------------------------------------------------------
    def cpr_quiesce(self) -> None:
        self.net.quiesce()
        self.saved = self.state()

    def cpr_unquiesce(self) -> None:
        self.net.defer_start = False
        if self.net.owned:
            self.net.resume()

    def cpr_notify(self, event: str) -> None:
        if event == "setup":
            self.net.release()
        elif event == "failed":
            if self.net.wiring is not None:
                self.net.reacquire()

    def cpr_fds(self) -> dict[str, int]:
        return {f"{self.name}.tap": self.tap.fd}

    def state(self) -> dict:
        return {"index": self.index, "backend": self.backend_name, "tap": self.tap.name,
                "transport": self.transport.state()}

    def cpr_state(self) -> dict:
        return self.saved if self.saved is not None else self.state()

    def restore(self, saved: dict) -> None:
        """(new VMM) program the device from saved state; the rings start on cpr_unquiesce."""
        self.net.defer_start = True
        self.transport.set_state(saved["transport"])
        if self.transport.failure:
            raise DeviceError(f"{self.name}: restore failed: {self.transport.failure}")

    def summary(self) -> dict:
        t = self.transport
        return {"name": self.name, "type": "virtio-net-mmio", "base": f"{self.base:#x}",
                "gsi": self.gsi, "tap": self.tap.name, "backend": self.backend_name,
                "status": t.status, "features": f"{self.net.acked:#x}",
                "queues": [{"num": q["num"], "last_avail_idx": q["last_avail_idx"]}
                           for q in t.state()["device"]["queues"]],
                "stats": self.net.stats()}

    def close(self) -> None:
        self.net.close()
        self.transport.close()
        self.tap.close()
