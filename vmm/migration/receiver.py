"""The destination's side of a live migration over TCP.

`pyvmm run --incoming tcp:HOST:PORT --net tap,ifname=NAME` (or `--incoming defer`
with --net, then QMP migrate-incoming) opens its own taps first, listens, and
takes one source.  HELO gives the machine's shape: RAM of that size in our own
memfd, an empty VM with parked vCPUs (CPR's build_machine).  PAGE sections are
written into RAM as they come (csrc/migrate.c), STAT holds the saved state: the
machine and devices are restored on our taps (in --net order), RSTD tells the
source, GO!! resumes the guest, RUNS says so, and the guest's MACs are announced
on the taps (announce.py).  Any failure before GO!! sends FAIL with the reason,
closes everything (RAM, VM, taps, the listener) and the VMM exits 1 with one
line: the source resumes its guest.

The interface is cpr.target.Incoming's (prepare, complete, start, abort, close,
status), so `pyvmm run --incoming` drives both alike.
"""

from __future__ import annotations

import os
import socket
import time

from .. import state as state_format
from ..cpr.target import IncomingAborted, Waiting
from ..errors import VmmError
from .stream import StreamError, expect, recv_header, recv_section, send_section


def parse_incoming(values: list[str], nets: list[str]):
    """The TCP address to listen on from --incoming, deferred or not: (address or None,
    deferred), or None when this is not a TCP migration (CPR's --incoming forms).
    `--incoming defer` is a TCP migration when --net is given (the destination needs its
    own taps; a cpr-transfer brings the old VMM's)."""
    from ..qmp.args import CommandError
    from ..qmp.migration_args import parse_migration_uri
    from . import is_tcp
    if values == ["defer"]:
        return (None, True) if nets else None
    if len(values) != 1 or values[0].startswith(("{", "cpr-transfer:")):
        return None
    try:
        addr = parse_migration_uri(values[0])
    except CommandError as e:
        raise VmmError(f"--incoming: {e.desc}") from None
    return (addr, False) if is_tcp(addr) else None


def discard_queued(fd: int) -> None:
    """Throw away the frames a tap queued before the guest ran here.  A switch floods a
    frame for a MAC it has not learned (yet, or any more) to every port, so this tap may
    hold copies of frames the guest already answered in the source: delivered now, they
    would be answered twice (a ping's DUP!).  Losing the few that arrived during the
    downtime is what the downtime means anyway."""
    while True:
        try:
            if not os.read(fd, 65536):
                return
        except OSError:   # EAGAIN: empty (the tap is non-blocking)
            return


def open_taps(specs: list[str]) -> list:
    """The destination's own taps, one per --net (in order: net0, net1...)."""
    from ..devices.net import parse_spec
    from ..net.tap import Tap
    taps = []
    try:
        for spec in specs:
            opts = parse_spec(spec)
            if "fd" in opts:
                taps.append(Tap.from_fd(int(opts["fd"])))
            elif "ifname" in opts:
                taps.append(Tap.open(opts["ifname"]))
            else:
                taps.append(Tap.create())
    except BaseException:
        for tap in taps:
            tap.close()
        raise
    return taps


class Receiver(Waiting):
    """One incoming TCP migration (see the module's docstring)."""

    def __init__(self, addr: dict | None, nets: list[str], console=None, *,
                 deferred: bool = False, memory=None):
        """memory: RAM made (and preallocated) before the source came (`-m SIZE
        --mem-prealloc`); the guest's must then be the same size, or it is refused."""
        from .sender import STALL_TIMEOUT, STALL_TIMEOUT_ENV
        super().__init__(deferred)
        self.console = console
        self.timeout = 3 * float(os.environ.get(STALL_TIMEOUT_ENV, STALL_TIMEOUT))
        self.sock = None
        self.machine = None
        self.memory = memory
        self.arrival = None
        self.address = None   # where we listen: {"host", "port"} (port 0 is resolved)
        self.state = None
        self.t_start = self.t_go = None
        self.received = 0
        self.passes = 0
        self.taps = open_taps(nets)
        try:
            if addr is not None:
                self._listen(addr)
        except BaseException:
            self.close()
            raise

    def _listen(self, addr: dict) -> None:
        host, port = addr["host"], addr["port"]
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self.listener = socket.create_server((host, int(port)), family=family)
        except (OSError, ValueError) as e:
            raise VmmError(f"--incoming tcp:{host}:{port}: cannot listen there: "
                           f"{getattr(e, 'strerror', None) or e}") from None
        self.address = {"host": host, "port": str(self.listener.getsockname()[1])}
        if self.started:
            self._set_status("setup")

    def info(self) -> dict:
        """query-migrate on the destination (QEMU's incoming MigrationInfo)."""
        info = {"status": self.status}
        if self.address is not None:
            info["socket-address"] = [{"type": "inet", **self.address}]
        if self.t_start is not None:
            info["ram"] = {"transferred": self.received, "dirty-sync-count": self.passes}
        return info

    # -- the monitor's side: migrate-incoming, quit (Waiting) ---------------------------------
    def _listen_on(self, main_addr: dict) -> None:
        from . import is_tcp
        if not is_tcp(main_addr):
            raise VmmError("this pyvmm waits for a migration over TCP (it was given --net): "
                           "migrate-incoming uri=tcp:HOST:PORT")
        self._listen(main_addr)

    def _peer_socket(self):
        return self.sock

    # -- the sequence -------------------------------------------------------------------------
    def prepare(self) -> None:
        """Accept the source, build the machine, take RAM until the state comes."""
        from ..cpr.target import warm_up_empty
        warm_up_empty(["net"] if self.taps else [])   # (off the setup time: see there)
        self._wait_for_peer()
        self.sock, _ = self.listener.accept()
        self.listener.close()
        self.listener = None
        self.sock.settimeout(self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # (RSTD, RUNS)
        self.t_start = time.monotonic_ns()
        self._set_status("active")
        try:
            recv_header(self.sock)
            hello = self._build(expect(self.sock, b"HELO"))
            from .pages import Applier
            pages = Applier(self.memory)
            pages.prealloc(hello.get("populated"))
            send_section(self.sock, b"REDY")
            self._receive_ram(pages)
        except BaseException as e:
            self._refuse(e)
            raise

    def _build(self, payload) -> dict:
        from ..cpr.target import build_machine, warm_up
        from ..memory import GuestMemory
        from ..schema import check
        hello = state_format.loads(bytes(payload))
        nets = hello.get("nets")   # (a blob's body is always a map)
        if not isinstance(nets, list) or not all(isinstance(n, str) for n in nets):
            raise StreamError("migration stream is corrupt: its HELO section does not name "
                              "the guest's NICs")
        shape = check("shape", hello.get("shape"))
        if len(nets) != len(self.taps):
            raise VmmError(f"the guest has {len(nets)} NIC(s) ({', '.join(nets) or 'none'}) "
                           f"and this pyvmm was given {len(self.taps)} --net: give one "
                           "--net tap,ifname=NAME per NIC")
        self.nets = nets
        mem = shape["memory"]
        hugetlb = bool(mem.get("hugetlb", False))
        if self.memory is None:
            self.memory = GuestMemory(mem["size"], hugetlb=hugetlb)
        elif (self.memory.size, self.memory.hugetlb) != (mem["size"], hugetlb):
            def ram(size, huge):
                return f"{size // (1 << 20)} MiB" + (" of huge pages" if huge else "")
            raise VmmError(f"the guest has {ram(mem['size'], hugetlb)} of RAM and this pyvmm "
                           f"was started with {ram(self.memory.size, self.memory.hugetlb)}: "
                           "give the destination the guest's -m (and --hugetlb), or no -m")
        try:
            self.machine = build_machine(shape, -1, {}, self.console, memory=self.memory)
            warm_up(self.machine, shape)
        except BaseException:
            self.memory.close()
            self.memory = None
            raise
        return hello

    def _receive_ram(self, pages) -> None:
        """PAGE sections into RAM until STAT: C takes them (pages.receive, no Python and
        no GIL between sections) and hands back every other section's header; a PASS
        is acknowledged at once (PACK n: all of pass n is in RAM here)."""
        budget = 16 << 20   # (bytes between two looks at self.aborted)
        timeout_ms = max(1, int(self.timeout * 1000))
        other = 0   # (the payloads of the sections that are not PAGE)
        try:
            while True:
                if self.aborted:
                    raise IncomingAborted("quit while the migration was coming")
                head = pages.receive(self.sock, budget, timeout_ms)
                self.received = pages.received + other
                if head is None:
                    continue
                tag, payload = recv_section(self.sock, head=head)
                other += len(payload)
                self.received = pages.received + other
                if tag == b"PASS":
                    self.passes += 1
                    try:
                        send_section(self.sock, b"PACK", bytes(payload))
                    except OSError as e:
                        raise StreamError(f"migration connection lost: {e}") from None
                elif tag == b"STAT":
                    self.state = bytes(payload)
                    return
                else:
                    raise StreamError(f"migration stream out of order: {tag.decode()} "
                                      "while RAM was coming")
        finally:
            self.received = pages.received + other

    def complete(self):
        """Restore, RSTD, wait for GO!!, resume, RUNS, announce.  Returns the machine.
        (`settled` is clear meanwhile: the guest is stopped on its way here.)"""
        self.settled.clear()
        try:
            return self._complete()
        finally:
            self.settled.set()

    def _complete(self):
        from ..schema import check
        m = self.machine
        try:
            tree = state_format.loads(self.state)
            saved = check("saved", tree.get("state"))
            m.restore_state(saved, advance_time=False)   # (another host's clock)
            # The devices take copies of our tap fds (what restore_devices does not claim it
            # closes; ours are closed with the receiver, the devices' with the machine).
            fds = {f"{id}.tap": os.dup(tap.fd) for id, tap in zip(self.nets, self.taps)}
            m.restore_devices(saved, fds)
            send_section(self.sock, b"RSTD")
            expect(self.sock, b"GO!!")
        except BaseException as e:
            self._refuse(e)
            raise
        self.t_go = time.monotonic_ns()
        for tap in self.taps:
            discard_queued(tap.fd)
        m.resume_devices()
        if tree.get("running", True):
            m.resume()
        try:
            send_section(self.sock, b"RUNS")
        except OSError:
            pass   # the guest is ours from GO!! on, whatever became of the source
        self.sock.close()
        self.sock = None
        for tap in self.taps:   # (the devices hold their own copies)
            tap.close()
        self.taps = []
        self.status = "completed"
        self.arrival = Arrival(self)
        from .announce import announce
        announce(m)
        return m

    def _refuse(self, error: BaseException) -> None:
        """Tell the source why (it resumes its guest), best effort; then read what it still
        sends until it hangs up (at most 2 s), so that closing with unread data (a TCP
        reset) does not throw the reason away before the source has read it."""
        if self.sock is None or self.aborted:
            return
        try:
            self.sock.settimeout(1.0)
            send_section(self.sock, b"FAIL", str(error).encode()[:4000])
            self.sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and self.sock.recv(1 << 16):
                pass
        except OSError:
            pass
        self._set_status("failed")

    def close(self) -> None:
        """Free what is not the machine's: the listener, the connection, unclaimed taps,
        and RAM that never got a machine."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        for tap in self.taps:
            tap.close()
        self.taps = []
        if self.machine is None and self.memory is not None:
            self.memory.close()
            self.memory = None
        self._close_wake()


class Arrival:
    """How the guest came (for query-migrate on the destination once it runs)."""

    mode = "normal"

    def __init__(self, receiver: Receiver):
        self.total_ms = (receiver.t_go - receiver.t_start) // 1_000_000
        self.received = receiver.received
        self.passes = receiver.passes

    def info(self) -> dict:
        return {"status": "completed", "total-time": self.total_ms,
                "ram": {"transferred": self.received, "dirty-sync-count": self.passes}}
