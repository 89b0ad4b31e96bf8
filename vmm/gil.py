"""The GIL's hand-over interval while a guest moves (CPR or a live migration).

Python hands the GIL from a running thread to a waiting one every 5 ms by default.
While a guest moves, the thread doing the move shares the GIL with the vCPU threads'
exits and the QMP monitor: at 5 ms, each hand-over inside the downtime can cost
milliseconds (the stop, the last pass, the restore are many short steps between
blocking calls), so both ends hand it over every 0.2 ms meanwhile.
"""

from __future__ import annotations

import sys

MOVING_INTERVAL = 0.0002   # s


class QuickHandover:
    """Hand the GIL over every MOVING_INTERVAL from start() (or `with`) to stop() (never
    less often than it already is), then back to what it was."""

    def __init__(self):
        self.saved = None

    def start(self) -> None:
        if self.saved is None:
            self.saved = sys.getswitchinterval()
            sys.setswitchinterval(min(self.saved, MOVING_INTERVAL))

    def stop(self) -> None:
        if self.saved is not None:
            sys.setswitchinterval(self.saved)
            self.saved = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
