"""The source's side of a live migration over TCP: precopy passes, stop, last pass, state.

`Outgoing.run()` is the whole sequence, on its own thread (the guest keeps running
and the monitor keeps answering while RAM is copied):

    setup     connect, stream header, HELO (the machine's shape), dirty logging on
    active    pass 1 sends every page; each later pass the pages written since
              (KVM's log | the data path's log), until what is left would take less
              than downtime-limit at the throughput measured; auto-converge slows
              the vCPUs down when the guest dirties faster than the link copies
    device    stop (vCPUs paused, devices quiesced: CPR's stop), the last pass, the
              state blob (vm, vCPUs, devices: the machine's save_state(), as CPR's)
    commit    the destination says RSTD (restored), we send GO!!, it says RUNS

Before GO!! any failure or a migrate_cancel rolls back as CPR does: logging off,
devices resumed, the vCPUs resumed unless the guest was paused before.  After it
the guest is the destination's: this pyvmm stays paused (postmigrate) until quit.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import threading
import time

from .. import __version__
from .. import state as state_format
from ..errors import VmmError
from .pages import BATCH_PAGES, ENTRY, PAGE, DirtyTracker, PageSet
from .stream import (StreamError, expect, expect_failed, recv_section, send_header,
                     send_section)

#: How long a send or the destination's answer may stall before we give up (s);
#: PYVMM_MIGRATION_TIMEOUT overrides it.
STALL_TIMEOUT = 10.0
STALL_TIMEOUT_ENV = "PYVMM_MIGRATION_TIMEOUT"
#: QEMU's auto-converge defaults: cpu-throttle-initial, -increment, max-cpu-throttle.
THROTTLE_INITIAL, THROTTLE_STEP, THROTTLE_MAX = 20, 10, 99
#: Bytes one C call sends in a precopy pass at full speed before Python looks for a
#: cancel again (~10-40 ms on this host's veth).
SEND_BUDGET = 16 << 20
#: The slowest the destination may allocate pass 1's pages before REDY (bytes/s).
ALLOC_RATE = 100e6


class Cancelled(VmmError):
    """migrate_cancel arrived before GO!!."""


def ms(ns: int) -> int:
    return ns // 1_000_000


class Throttle:
    """Auto-converge: keep the vCPUs paused `percent` % of every 10 ms (QEMU sleeps its
    vCPU threads likewise), so the guest dirties pages more slowly than the link copies."""

    PERIOD = 0.010

    def __init__(self, machine):
        self.machine = machine
        self.percent = 0
        self._stop = threading.Event()
        self._thread = None

    def set(self, percent: int) -> None:
        self.percent = percent
        if self._thread is None and percent:
            self._thread = threading.Thread(target=self._run, name="mig-throttle", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        m = self.machine
        while not self._stop.is_set():
            off = self.PERIOD * self.percent / 100
            if m.running:   # (the vCPU threads alone: the run state stays "running")
                for t in m.threads:
                    t.pause()
                self._stop.wait(off)
                for t in m.threads:
                    t.resume()
            self._stop.wait(self.PERIOD - off)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


class Outgoing:
    """One live migration out of this process over TCP (what query-migrate reports on)."""

    mode = "normal"
    stays = True   # after it, the source waits for quit in postmigrate (as QEMU)

    def __init__(self, machine, addr: dict, *, downtime_limit_ms: int, max_bandwidth: int,
                 auto_converge: bool = False, emit=None):
        self.machine = machine
        self.host, self.port = addr["host"], addr["port"]
        self.downtime_limit_ms = downtime_limit_ms
        self.max_bandwidth = max_bandwidth    # bytes/s; 0: unlimited
        self.auto_converge = auto_converge
        self.emit = emit or (lambda name, data=None: None)
        try:
            self.timeout = float(os.environ.get(STALL_TIMEOUT_ENV, STALL_TIMEOUT))
        except ValueError:
            raise VmmError(f"{STALL_TIMEOUT_ENV} must be a number of seconds") from None
        self.status = "none"
        self.error: str | None = None
        self.committed = False
        self.done = threading.Event()
        # Clear while the guest is stopped here (the last pass, or a rollback): the QMP
        # monitor holds its clients off meanwhile (Controller.hold_off), as for CPR.
        self.settled = threading.Event()
        self.settled.set()
        self._cancel = threading.Event()
        self.sock: socket.socket | None = None
        # the figures of query-migrate
        self.t_start = time.monotonic_ns()
        self.t_active = self.t_stop = self.t_end = None
        self.transferred = 0
        self.precopy_bytes = self.downtime_bytes = 0
        self.passes = 0             # dirty-sync-count
        self.remaining = 0          # bytes
        self.dirty_rate = 0         # pages/s
        self.mbps = 0.0
        self.pages_per_second = 0
        self.expected_downtime = None
        self.pages: PageSet | None = None
        self._out = None   # the PAGE sections' buffer (C)
        self.tracker: DirtyTracker | None = None
        self.throttle = Throttle(machine)

    # -- reporting -------------------------------------------------------------------------
    def _set_status(self, status: str) -> None:
        self.status = status
        self.emit("MIGRATION", {"status": status})

    def info(self) -> dict:
        """query-migrate, in QEMU's MigrationInfo shape."""
        now = time.monotonic_ns()
        info = {"status": self.status}
        if self.status == "none":
            return info
        end = self.t_end or now
        info["total-time"] = ms(end - self.t_start)
        if self.t_active is not None:
            info["setup-time"] = ms(self.t_active - self.t_start)
        if self.t_stop is not None and self.t_end is not None and self.committed:
            info["downtime"] = ms(self.t_end - self.t_stop)
        elif self.expected_downtime is not None:
            info["expected-downtime"] = self.expected_downtime
        counts = self.pages.counts if self.pages is not None else None
        zero = counts.zero_pages if counts is not None else 0
        normal = counts.normal_pages if counts is not None else 0
        info["ram"] = {
            "transferred": self.transferred, "remaining": self.remaining,
            "total": self.machine.memory.size, "duplicate": zero, "normal": normal,
            "normal-bytes": normal * PAGE, "dirty-sync-count": self.passes,
            "dirty-pages-rate": self.dirty_rate, "mbps": round(self.mbps, 3),
            "pages-per-second": self.pages_per_second, "page-size": PAGE,
            "precopy-bytes": self.precopy_bytes, "downtime-bytes": self.downtime_bytes,
            "postcopy-requests": 0, "postcopy-bytes": 0, "multifd-bytes": 0,
            "dirty-sync-missed-zero-copy": 0,
        }
        if self.throttle.percent:
            info["cpu-throttle-percentage"] = self.throttle.percent
        if self.error:
            info["error-desc"] = self.error
        return info

    def cancel(self) -> None:
        """migrate_cancel: roll back, unless GO!! has gone already (then it is too late)."""
        if self.committed or self.done.is_set():
            return
        self._cancel.set()
        if self.status not in ("none", "setup"):
            self._set_status("cancelling")
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)   # wakes a send that waits on the peer
            except OSError:
                pass

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise Cancelled("migration cancelled")

    # -- the sequence ------------------------------------------------------------------------
    def run(self) -> bool:
        """Migrate; True once the guest has left (GO!! sent: `status` is then completed,
        or failed if the destination never said it runs it)."""
        try:
            return self._run()
        except Exception as e:   # (a bug): query-migrate must not say "active" forever
            if self.tracker is not None:
                self.tracker.stop()   # (the data path must not keep a pointer to its log)
            self.error = f"internal error: {type(e).__name__}: {e}"
            self._set_status("failed")
            return False
        finally:
            self.t_end = self.t_end or time.monotonic_ns()
            if self.sock is not None:
                self.sock.close()
            self.settled.set()
            self.done.set()

    def _run(self) -> bool:
        m = self.machine
        self._set_status("setup")
        # (kept on self: the data paths hold a pointer to its C log until stop())
        tracker = self.tracker = DirtyTracker(m)
        try:
            self._connect()
            tracker.start()          # refuses a device that cannot log (backend=python)
            self._check_cancel()
            # (after start: a page first written from now on is in the log)
            self.pages = PageSet(m.memory)
            self.pages.add_populated()
            self.remaining = self.pages.count() * PAGE
            self._hello()
        except Exception as e:
            tracker.stop()
            return self._failed(e, stopped=False)
        self.t_active = time.monotonic_ns()
        self._set_status("active")
        stopped = was_running = False
        try:
            self._precopy(tracker)
            # (stop) from here on, any failure resumes the guest (unless it was paused).
            self.throttle.stop()
            was_running = m.running
            self.t_stop = time.monotonic_ns()
            self.settled.clear()
            m.pause()
            stopped = True
            if was_running:
                self.emit("STOP")
            m.quiesce_devices()
            self._set_status("device")
            self.pages.add(tracker.sync())     # after the quiesce: every write is in
            self._pass(final=True)
            state = {"state": m.save_state(), "running": was_running, "pyvmm": __version__}
            self.downtime_bytes += self._send(b"STAT", state_format.dumps(state))
            self.transferred = self.precopy_bytes + self.downtime_bytes
            self._wait_for(b"RSTD")
            self._check_cancel()
            send_section(self.sock, b"GO!!")
            self.committed = True               # the point of no return
            self.settled.set()
        except Exception as e:
            self.throttle.stop()
            tracker.stop()
            return self._failed(e, stopped=stopped, was_running=was_running)
        return self._finish(tracker)

    def _connect(self) -> None:
        try:
            self.sock = socket.create_connection((self.host, int(self.port)),
                                                 timeout=self.timeout)
        except OSError as e:
            raise VmmError(f"cannot connect to the destination tcp:{self.host}:{self.port}: "
                           f"{e.strerror or e} (is `pyvmm run --incoming tcp:...` waiting "
                           "there?)") from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        send_header(self.sock)

    def _hello(self) -> None:
        """HELO (the machine's shape, and the pages pass 1 sends: the destination allocates
        them first), then wait for REDY: the destination's machine is built and its RAM
        allocated (setup-time), so pass 1 goes at the link's speed."""
        m = self.machine
        hello = {"shape": m.shape(), "nets": [d.id for d in m.devices if d.KIND == "net"],
                 "pyvmm": __version__, "populated": self.pages.bitmap()}
        send_section(self.sock, b"HELO", state_format.dumps(hello))
        # (allocating takes ~0.4 s per GiB here: allow for 100 MB/s on top of the stall)
        self._await(b"REDY", extra=self.remaining / ALLOC_RATE)

    def _precopy(self, tracker: DirtyTracker) -> None:
        """Passes until the rest fits in downtime-limit (at the throughput of the last)."""
        while True:
            self._check_cancel()
            t0 = time.monotonic()
            sent, _ = self._pass(final=False)
            # Until the destination has every page of this pass in its RAM: what the
            # socket buffers still hold (megabytes) would otherwise be drained inside
            # the downtime, and the rate would count sends into the buffers (measured:
            # a ticker guest's downtime of 17 ms median, 16 of them draining pass 1).
            self._wait_applied(self.passes)
            seconds = time.monotonic() - t0
            dirty = tracker.sync()
            self.pages.add(dirty)
            ndirty = dirty.bit_count()
            self.dirty_rate = int(ndirty / seconds) if seconds > 0 else 0
            left = self.pages.count()
            self.remaining = left * PAGE
            rate = sent / seconds if seconds > 0 and sent else 0   # bytes/s
            self.mbps = rate * 8 / 1e6
            self.expected_downtime = int(left * ENTRY * 1000 / rate) if rate else 0
            if self.expected_downtime <= self.downtime_limit_ms:
                return
            if self.auto_converge and self.passes >= 2 and \
                    ndirty * ENTRY > sent / 2:       # QEMU's throttle-trigger-threshold 50 %
                self.throttle.set(min(THROTTLE_MAX, self.throttle.percent + THROTTLE_STEP)
                                  if self.throttle.percent else THROTTLE_INITIAL)

    def _pass(self, *, final: bool) -> tuple[int, float]:
        """Send every page in the set, then PASS; (bytes sent, seconds taken).  Pages go
        from RAM into one buffer and from there to the socket, section after section, in
        one C call per SEND_BUDGET bytes (csrc/migrate.c pyvmm_mig_send: zero pages as
        8 bytes, no Python and no GIL in between); between calls, a cancel is seen and
        max-bandwidth paced."""
        import errno
        from ..kvm.ffi import ffi, lib
        self.passes += 1
        self.emit("MIGRATION_PASS", {"pass": self.passes})
        if self._out is None:
            self._out = ffi.new("uint8_t[]", lib.PYVMM_MIG_BUF)
        max_pages = BATCH_PAGES
        if final:
            budget = 1 << 62   # (the guest is stopped: all at once)
        elif self.max_bandwidth > 0:
            # sections of ~0.1 s at a low rate: a smooth pace, and no pause between two
            # sections long enough for the destination to take it for a stall; and per
            # C call ~0.1 s of data (at most SEND_BUDGET), not one section: each call
            # costs Python ~30 us, and at QEMU's "unlimited" 1 TiB/s one section per
            # call put 4,096 of them in a 4 GiB pass (~0.1 s of a single CPU, perf)
            max_pages = max(1, min(BATCH_PAGES, self.max_bandwidth // 10 // ENTRY))
            budget = max(max_pages * ENTRY, min(SEND_BUDGET, self.max_bandwidth // 10))
        else:
            budget = SEND_BUDGET
        counts = self.pages.counts
        before = counts.zero_pages + counts.normal_pages
        base = self.precopy_bytes + self.downtime_bytes
        timeout_ms = max(1, int(self.timeout * 1000))
        t0 = time.monotonic()
        sent = 0
        while True:
            if not final:
                self._check_cancel()
            r, n = self.pages.send(self.sock.fileno(), self._out, max_pages, budget,
                                  timeout_ms)
            sent += n
            self.transferred = base + sent
            self.remaining = self.pages.count() * PAGE   # (QEMU's: RAM bytes still to send)
            if r == 0:
                break
            if r < 0 or r == lib.PYVMM_MIG_PEER:
                self._check_cancel()
                if r == -errno.ETIMEDOUT:
                    raise StreamError(f"the destination took no data for {self.timeout:g} s "
                                      "(link down or the destination stopped?)")
                lost = (f"migration connection lost: {os.strerror(-r)}" if r < 0 else
                        "the destination hung up")
                raise StreamError(self._peer_reason() or lost)
            if self.max_bandwidth > 0 and not final:   # (never slow the stopped guest down)
                ahead = sent / self.max_bandwidth - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)
        sent += self._send(b"PASS", self.passes.to_bytes(8, "little"))
        seconds = time.monotonic() - t0
        if final:
            self.downtime_bytes += sent
        else:
            self.precopy_bytes += sent
        self.transferred = self.precopy_bytes + self.downtime_bytes
        if not final:   # (QEMU's figure is the precopy's)
            pages = counts.zero_pages + counts.normal_pages - before
            self.pages_per_second = int(pages / seconds) if seconds > 0 else 0
        return sent, seconds

    def _send(self, tag: bytes, payload) -> int:
        """Send a section; a destination that said FAIL meanwhile stops us with its reason
        (it waits for us to hang up): PASS, STAT; PAGE sections go by _pass's C loop."""
        if select.select([self.sock], [], [], 0)[0] and not self._pack_waiting():
            raise StreamError(self._peer_reason() or "the destination hung up")
        try:
            return send_section(self.sock, tag, payload)
        except socket.timeout:
            self._check_cancel()
            raise StreamError(f"the destination took no data for {self.timeout:g} s "
                              "(link down or the destination stopped?)") from None
        except OSError as e:
            self._check_cancel()
            raise StreamError(self._peer_reason() or
                              f"migration connection lost: {e.strerror or e}") from None

    def _pack_waiting(self) -> bool:
        """Whether what the destination sent is the last pass's PACK (read later, by
        _wait_for): it acknowledges the stopped guest's last pass while STAT goes out."""
        try:
            return self.sock.recv(4, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"PACK"
        except OSError:
            return False

    def _peer_reason(self) -> str | None:
        """Why the destination hung up, if it said so (a FAIL section) before closing."""
        try:
            self.sock.settimeout(0.5)
            tag, payload = recv_section(self.sock)
            if tag == b"FAIL":
                return f"the destination refused the migration: {bytes(payload).decode()}"
        except (OSError, VmmError):
            pass
        return None

    def _wait_applied(self, n: int) -> None:
        """PACK n from the destination: every page of precopy pass n is in its RAM.
        Waited for in slices, so a cancel is seen within 0.1 s."""
        payload = self._await(b"PACK")
        if int.from_bytes(payload, "little") != n:
            raise StreamError(f"migration stream out of order: PACK for pass "
                              f"{int.from_bytes(payload, 'little')}, expected {n}")

    def _await(self, tag: bytes, extra: float = 0.0):
        """The destination's next section, which must be `tag`, within the stall timeout
        (+ `extra` s); waited for in slices, so a cancel is seen within 0.1 s."""
        deadline = time.monotonic() + self.timeout + extra
        while not select.select([self.sock], [], [], 0.1)[0]:
            self._check_cancel()
            if time.monotonic() > deadline:
                raise StreamError(f"the destination took no data for {self.timeout:g} s "
                                  "(link down or the destination stopped?)")
        return expect(self.sock, tag)

    def _wait_for(self, tag: bytes) -> None:
        """The destination's answer, within the stall timeout; a cancel is seen at once.
        (The last pass's PACK, sent while the guest is stopped, is not waited for: it
        comes before the answer and is skipped.)"""
        try:
            while True:
                got, payload = recv_section(self.sock)
                if got != b"PACK":
                    break
            if got != tag:   # the peer's reason (FAIL), or a section out of order
                expect_failed(got, payload, tag)
        except VmmError:
            self._check_cancel()
            raise

    def _finish(self, tracker: DirtyTracker) -> bool:
        """Past GO!!: the guest is the destination's, never resumed here; completed once it
        says RUNS."""
        try:
            expect(self.sock, b"RUNS")
        except VmmError as e:
            self.error = (f"after GO!!, the destination did not report running ({e}): it may "
                          "run the guest; this pyvmm cannot take it back")
        self.t_end = time.monotonic_ns()
        tracker.stop()
        self.remaining = 0
        self._set_status("failed" if self.error else "completed")
        return True

    def _failed(self, error: Exception, *, stopped: bool, was_running: bool = True) -> bool:
        """Roll back: devices running again, the guest resumed if it ran before."""
        self.error = str(error)
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if stopped and self.machine.roll_back(was_running=was_running, released=False):
            self.emit("RESUME")
        self.settled.set()
        self.t_end = time.monotonic_ns()
        self._set_status("cancelled" if isinstance(error, Cancelled) else "failed")
        print(f"pyvmm: migration {self.status}: {self.error}; the guest goes on here",
              file=sys.stderr, flush=True)
        return False
