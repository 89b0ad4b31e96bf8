"""Migration modes: QEMU 10's MigMode values, and the ones pyvmm migrates in.

One table for the monitor (which values `migrate-set-parameters mode=` takes),
the controller (which it keeps, which `migrate` starts) and the live update
itself.  QEMU 10 does all four modes; pyvmm the two that move a running guest
to a new process on the same RAM, cpr-transfer and cpr-exec, and `normal` over
TCP only (live migration to another host: vmm/migration/, which the controller
starts before it asks this table).
"""

from __future__ import annotations

from ..errors import VmmError

#: QEMU's default mode, which pyvmm's monitor starts in too (query-migrate-parameters).
DEFAULT_MODE = "normal"

#: QEMU 10's MigMode (qapi/migration.json), in its order: each value with why pyvmm
#: does not migrate in it, or None for the modes it does.
MIGRATION_MODES = {
    "normal": ("mode normal migrates over TCP only (uri=tcp:HOST:PORT, vmm/migration/); "
               "for CPR first set the mode with "
               "migrate-set-parameters mode=cpr-transfer or mode=cpr-exec"),
    "cpr-reboot": ("migration mode 'cpr-reboot' is not supported by pyvmm: "
                   "use cpr-transfer or cpr-exec"),
    "cpr-transfer": None,
    "cpr-exec": None,
}


def check_migrate_mode(mode: str) -> None:
    """Raise VmmError unless pyvmm migrates in `mode`."""
    if mode not in MIGRATION_MODES:
        raise VmmError(f"migration mode {mode!r} is not one of QEMU's: "
                       f"{', '.join(MIGRATION_MODES)}")
    refusal = MIGRATION_MODES[mode]
    if refusal:
        raise VmmError(refusal)


def check_settable_mode(mode: str) -> None:
    """migrate-set-parameters: the default may be set back (migrate refuses it, as
    it refuses to start without a mode); another mode pyvmm does not do is refused
    at once."""
    if mode != DEFAULT_MODE:
        check_migrate_mode(mode)
