"""Live migration between two hosts (bench/twohosts.py): the VMMs it starts.

QEMU (Debian's 7.2, or 10.2.2 from bench/qemu10.py) runs the toy guests the way
tests/test_guest_qemu.py does, `-M microvm` with `-cpu qemu64` (invtsc would block
migration), one QEMU in each host namespace: the source, and the destination
waiting with `-incoming tcp:HOST:PORT` on its end of the migration link.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from bench import qemu10
from bench.vmms import BUILD

QEMU72 = shutil.which("qemu-system-x86_64")
MIGRATION_PORT = 4444


def qemu_cmd(binary: str | Path, guest: str, size_mb: int, cmdline: str, qmp: Path,
             incoming: str | None = None) -> list[str]:
    """One QEMU running guest/build/GUEST.elf, its serial on stdout, QMP on unix `qmp`."""
    cmd = [str(binary), "-L", qemu10.FIRMWARE_DIR,
           "-M", "microvm,x-option-roms=off,rtc=off", "-accel", "kvm", "-cpu", "qemu64",
           "-m", f"{size_mb}M", "-nodefaults", "-no-user-config", "-display", "none",
           "-serial", "stdio", "-monitor", "none", "-no-reboot",
           "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
           "-qmp", f"unix:{qmp},server=on,wait=off",
           "-kernel", str(BUILD / f"{guest}.elf"), "-append", cmdline]
    if incoming:
        cmd += ["-incoming", incoming]
    return cmd
