"""Threads, events and conditions on `_thread`, without importing `threading`.

Why not `threading`: importing it (with functools and collections) takes about
5 ms of a fresh interpreter on this host, and the image a cpr-exec starts must
get the guest running before it does anything else: every millisecond there is
downtime.  Everything on that path (vCPU threads, the machine's done flag, the
UART's lock) uses these small equivalents; the monitor and the tools, which
start after the guest runs again, use `threading` as usual.

They follow `threading`'s semantics for what pyvmm uses: Condition.wait and
notify_all under the lock, Event.set/wait/is_set, and a Thread that can be
joined and asked whether it is alive.
"""

from __future__ import annotations

import _thread

get_ident = _thread.get_ident
RLock = _thread.RLock


class Condition:
    """A condition variable on a plain (non-reentrant) lock."""

    def __init__(self):
        self._lock = _thread.allocate_lock()
        self._waiters: list = []

    def __enter__(self):
        self._lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def wait(self, timeout: float | None = None) -> bool:
        """Release the lock, wait for notify_all (or the timeout), take the lock back."""
        waiter = _thread.allocate_lock()
        waiter.acquire()
        self._waiters.append(waiter)
        self._lock.release()
        try:
            if timeout is None:
                return waiter.acquire()
            return waiter.acquire(True, max(timeout, 0))
        finally:
            self._lock.acquire()
            try:
                self._waiters.remove(waiter)   # still there only if we timed out
            except ValueError:
                pass

    def notify_all(self) -> None:
        """Wake every waiter (call with the lock held)."""
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.release()


class Event:
    """A flag threads can wait for."""

    def __init__(self):
        self._cond = Condition()
        self._flag = False

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        with self._cond:
            self._flag = True
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._flag = False

    def wait(self, timeout: float | None = None) -> bool:
        with self._cond:
            if not self._flag:
                self._cond.wait(timeout)
            return self._flag


class Thread:
    """Runs `target` on a new OS thread (always a daemon: pyvmm stops its threads itself)."""

    def __init__(self, target, name: str = ""):
        self._target = target
        self.name = name
        self.ident: int | None = None
        self._started = False
        self._finished = Event()

    def start(self) -> None:
        self._started = True
        _thread.start_new_thread(self._run, ())

    def _run(self) -> None:
        self.ident = _thread.get_ident()
        try:
            self._target()
        finally:
            self._finished.set()

    def is_alive(self) -> bool:
        return self._started and not self._finished.is_set()

    def join(self, timeout: float | None = None) -> None:
        if self._started:
            self._finished.wait(timeout)
