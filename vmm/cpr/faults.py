"""Fault injection for the live-update sequence: break CPR on purpose, watch the rollback.

A fault is armed by name, either in the environment (`PYVMM_CPR_FAULT=save`,
several separated by commas, read by whichever process reaches the point) or
through QMP (`migrate-set-parameters` with the pyvmm extension `x-fault`).
Faults named `target-*` are forwarded to the new VMM with the state.
"""

from __future__ import annotations

import os

from ..errors import VmmError

ENV = "PYVMM_CPR_FAULT"

POINTS = {
    "prepare": "the old pyvmm fails while preparing the new one (the guest never stops)",
    "after-stop": "right after the vCPUs are paused and the devices quiesced",
    "notify": "a device notifier fails while releasing its device",
    "save": "saving the machine state fails",
    "transfer": "the channel breaks before the fds are sent",
    "exec": "execve of the new pyvmm fails (cpr-exec)",
    "early-state": "the VM and vCPU state written ahead of the blob is corrupt (cpr-exec: "
                   "the new image's early start; cpr-transfer: the handoff, with "
                   "x-early-start): C refuses it and Python restores the guest from the "
                   "blob as without it",
    "target-prepare": "the new pyvmm fails while preparing (before any device fd)",
    "target-crash-before-fds": "the new pyvmm dies before it receives the device fds",
    "target-crash-after-fds": "the new pyvmm dies right after receiving the device fds",
    "target-restore": "the new pyvmm cannot restore the state",
    "target-slow-prepare": "the new pyvmm takes a second to prepare (time to cancel)",
    "target-slow-restore": "the new pyvmm takes a second to restore (cpr-transfer: time to "
                           "cancel; cpr-exec: the early start runs the guest meanwhile)",
    "target-slow-running": "the new pyvmm waits a second after resuming the guest before it "
                           "says \"running\" (time to kill or stop either side past \"go\")",
}
DELAY_S = 1.0


class InjectedFault(VmmError):
    """A failure injected on purpose."""


def parse(value) -> set[str]:
    if not value:
        return set()
    names = value.split(",") if isinstance(value, str) else list(value)
    faults = {n.strip() for n in names if n.strip()}
    unknown = faults - POINTS.keys()
    if unknown:
        raise VmmError(f"unknown CPR fault point(s) {sorted(unknown)}: choose from "
                       f"{', '.join(POINTS)}")
    return faults


TRANSFER_ONLY = {"prepare", "transfer", "target-prepare", "target-crash-before-fds",
                 "target-crash-after-fds", "target-slow-prepare", "target-slow-running"}
EXEC_ONLY = {"exec"}


def check_mode(faults, mode: str) -> None:
    """Refuse a fault that cannot happen in this mode (it would silently do nothing)."""
    wrong = set(faults) & (TRANSFER_ONLY if mode == "cpr-exec" else EXEC_ONLY)
    if wrong:
        raise VmmError(f"fault point(s) {sorted(wrong)} do not exist in {mode}")


class Faults:
    """The set of armed fault points for one live update."""

    def __init__(self, armed=()):
        self.armed = set(armed) | parse(os.environ.get(ENV, ""))

    def check(self, point: str) -> None:
        """Raise InjectedFault if `point` is armed."""
        if point in self.armed:
            raise InjectedFault(f"injected fault at '{point}': {POINTS[point]}")

    def crash(self, point: str) -> None:
        """Die on the spot (like a crash: no cleanup, no message to the peer)."""
        if point in self.armed:
            os._exit(99)

    def delay(self, point: str) -> None:
        """Be slow on purpose (gives a test time to cancel)."""
        if point in self.armed:
            import time
            time.sleep(DELAY_S)

    def for_target(self) -> list[str]:
        return sorted(p for p in self.armed if p.startswith("target-"))
