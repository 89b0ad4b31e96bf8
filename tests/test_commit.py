"""cpr-transfer's commit page (vmm/cpr/commit.py, csrc/commit.c): of two processes
claiming the guest at the same moment exactly one wins, and both read the same
winner; a page that is not one, or was already decided, is refused."""

from __future__ import annotations

import mmap
import os

import pytest

from vmm.cpr.commit import NEW, OLD, OPEN, SIZE, CommitWord
from vmm.errors import VmmError

START = 64   # a byte of the page past the word: the test's starting gun


def _claimant(fd: int, who: int, out: int) -> None:
    """A forked process: its own mapping of the page, spinning until the gun, then
    one claim; writes (won, holder it reads)."""
    try:
        word = CommitWord(fd)
        gun = mmap.mmap(fd, SIZE)
        while gun[START] == 0:
            pass
        won = word.claim(who)
        os.write(out, bytes([won, word.holder()]))
    finally:
        os._exit(0)


def test_one_claim_wins_a_race_between_two_processes():
    """200 rounds on fresh pages: two forked processes (the two VMMs) spin on their
    own mappings until the parent fires, then claim at once, on both cores.  Each
    round exactly one wins and both read that one as the holder."""
    wins = {NEW: 0, OLD: 0}
    for _ in range(200):
        word = CommitWord.create()
        gun = mmap.mmap(word.fd, SIZE)
        r, w = os.pipe()
        pids = []
        for who in (NEW, OLD):
            pid = os.fork()
            if pid == 0:
                _claimant(word.fd, who, w)
            pids.append(pid)
        gun[START] = 1
        answers = [os.read(r, 2) for _ in pids]
        for pid in pids:
            os.waitpid(pid, 0)
        os.close(r), os.close(w)
        assert sorted(a[0] for a in answers) == [0, 1], "both or neither claimed the guest"
        holder = word.holder()
        assert holder in (NEW, OLD) and all(a[1] == holder for a in answers)
        wins[holder] += 1
        gun.close()
        word.close()
    print(f"wins: new {wins[NEW]}, old {wins[OLD]}")


def test_a_decided_word_stays_decided():
    word = CommitWord.create()
    assert word.holder() == OPEN
    assert word.claim(NEW) and word.holder() == NEW
    assert not word.claim(OLD) and word.holder() == NEW
    assert word.claim(NEW)   # (the winner asking again still holds it)
    word.close()


def test_receive_refuses_what_is_not_an_open_commit_page():
    """A pipe, a page of the wrong size, a page already claimed: each refused with its
    reason and its fd closed (the new VMM does not keep what it refuses)."""
    def refused(fd, why):
        with pytest.raises(VmmError, match=why):
            CommitWord.receive(fd)
        with pytest.raises(OSError):
            os.fstat(fd)

    r, w = os.pipe()
    refused(r, "not a one-page memfd")
    os.close(w)
    fd = os.memfd_create("big")
    os.ftruncate(fd, 2 * SIZE)
    refused(fd, "not a one-page memfd")
    word = CommitWord.create()
    word.claim(OLD)
    refused(os.dup(word.fd), "already decided")
    word.close()
    fresh = CommitWord.create()
    got = CommitWord.receive(os.dup(fresh.fd))
    assert got.claim(NEW) and fresh.holder() == NEW
    got.close(), fresh.close()
