"""Cross-check: the same guest ELF says the same thing under pyvmm and under Debian's QEMU."""

from __future__ import annotations

import subprocess

import pytest

from conftest import need_kvm, run_pyvmm
from test_guest_qemu import BASE, QEMU, qexit

pytestmark = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed "
                                "(make deps installs Debian's qemu-system-x86)")


def guest_lines(text: str) -> list[str]:
    # The TSC line names where the frequency came from, which differs by VMM by design.
    return [line for line in text.replace("\r\n", "\n").splitlines()
            if line and not line.startswith("tsc:")]


@pytest.mark.parametrize("cmdline,code", [("cross=check", 0), ("fault=pf", 3)])
def test_same_output_under_pyvmm_and_qemu(guests, cmdline, code):
    need_kvm()
    ours = run_pyvmm("run", "--kernel", str(guests / "hello.elf"), "--cmdline", cmdline)
    theirs = subprocess.run([QEMU, *BASE, "-kernel", str(guests / "hello.elf"),
                             "-append", cmdline], capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    assert ours.returncode == code
    assert theirs.returncode == qexit(code)
    assert guest_lines(ours.stdout) == guest_lines(theirs.stdout)
    assert any("Hello" in line for line in guest_lines(ours.stdout))
