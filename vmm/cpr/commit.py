"""cpr-transfer's point of no return: one word in a page both VMMs map.

After the old VMM has sent the state and the device fds, exactly one of the two
may run the guest: both on the same RAM would corrupt it.  Protocol 1 (pyvmm
0.1.0) decided it with two more messages inside the downtime: the new VMM said
"restored", the old one answered "go".  Each crossing costs a process wake-up
and Python on both ends (~0.25 ms of a ~2 ms downtime on the development host).

Now the old VMM makes a small memfd page and sends it with the RAM, before the
stop.  Its first word starts OPEN.  The new VMM, its restore done, claims it
(atomic compare-and-swap, csrc/commit.c) and runs the guest at once.  The old
VMM claims it only to take the guest back: on a cancel, when the pause passes
downtime-limit, or when the new VMM refuses or goes away.  Whichever swap lands
first wins, and the loser reads who won in the same word: the new VMM then
exits without running the guest, the old one knows the guest has left even if
the new VMM's "running" never comes.  "go" is still the name of the moment the
new VMM's claim lands.

With cpr-transfer's early start (vmm/cpr/handoff.py) the new VMM's handoff thread
claims it earlier, as EARLY, before it runs the guest and before the new VMM has
restored its devices; only the new VMM moves it on from there: to NEW when its
restore is done, to OLD when it hands the guest back.  The old VMM's claim fails
against EARLY as against NEW (a cancel is too late), and it waits for one of them.

The peer can write the page too; a value other than these four is treated as
"not mine" by both sides, so a broken peer can make an update fail, never make
two VMMs run one guest.
"""

from __future__ import annotations

import mmap
import os
import stat

from ..errors import VmmError
from ..kvm.ffi import ffi, lib

OPEN = lib.PYVMM_COMMIT_OPEN
NEW = lib.PYVMM_COMMIT_NEW
OLD = lib.PYVMM_COMMIT_OLD
EARLY = lib.PYVMM_COMMIT_EARLY
SIZE = 4096


class CommitWord:
    """The shared word, mapped here (`fd` is the page to pass to the peer)."""

    def __init__(self, fd: int):
        self.fd = fd
        self._map = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._word = ffi.from_buffer(self._map)

    @classmethod
    def create(cls) -> "CommitWord":
        """A fresh page (the old VMM's side), close-on-exec, OPEN."""
        fd = os.memfd_create("pyvmm-cpr-commit", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, SIZE)
            return cls(fd)
        except OSError:
            os.close(fd)
            raise

    @classmethod
    def receive(cls, fd: int) -> "CommitWord":
        """The old VMM's page (the new VMM's side; `fd` becomes the word's): a regular
        file of one page, still OPEN, or a VmmError saying what it is instead (and
        `fd` closed)."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != SIZE:
            os.close(fd)
            raise VmmError("the old pyvmm's commit page is not a one-page memfd")
        word = cls(fd)
        if word.holder() != OPEN:
            word.close()
            raise VmmError("the old pyvmm's commit page was already decided")
        return word

    def claim(self, who: int) -> bool:
        """Take the guest for `who` (NEW or OLD); True if this side holds it now."""
        return lib.pyvmm_commit_claim(self._word, who) == who

    def move(self, old: int, new: int) -> bool:
        """The new VMM, after its early start: EARLY to NEW (its restore done) or to OLD
        (the guest handed back).  True if the word held `old` and now holds `new`."""
        return lib.pyvmm_commit_move(self._word, old, new) == new

    @property
    def word(self):
        """The word itself, for C (csrc/handoff.c claims EARLY there)."""
        return self._word

    def holder(self) -> int:
        return lib.pyvmm_commit_read(self._word)

    def close(self) -> None:
        if self._map is not None:
            self._word = None
            self._map.close()
            self._map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
