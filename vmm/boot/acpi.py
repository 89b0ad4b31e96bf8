"""The ACPI tables that describe the CPUs to the guest: RSDP -> XSDT (and RSDT) -> MADT.

A real kernel learns how many CPUs it has, and their APIC IDs, from the MADT
(ACPI 6.4 section 5.2.12); Linux needs it to start any AP.  pyvmm writes the
smallest set of tables that says so:

    RSDP (revision 2)  -> RSDT (32-bit pointers) and XSDT (64-bit pointers)
    XSDT/RSDT          -> MADT ("APIC")
    MADT               -> one Processor Local APIC entry (type 0) per vCPU,
                          APIC ID = vCPU index (what KVM gives vCPU i), enabled;
                          one I/O APIC entry (type 1) at 0xfec00000, GSI base 0

They live in the legacy BIOS area at ACPI_ADDR (0xe0000), where a guest that
is not told the RSDP's address can still find it by scanning 0xe0000-0xfffff
for "RSD PTR " (ACPI 5.2.5.1), and which Linux never uses as RAM (it keeps the
640 KiB-1 MiB range reserved whatever the memory map says).  The PVH start_info
gives the RSDP's address (rsdp_paddr), as the PVH protocol says.

The tables are written once at boot: a live update keeps them (they are in guest
RAM), so nothing here runs on the resume path.
"""

from __future__ import annotations

import struct

ACPI_ADDR = 0xE0000            # RSDP here, the other tables after it (16-byte aligned)
ACPI_END = 0x100000
LAPIC_ADDR = 0xFEE00000
IOAPIC_ADDR = 0xFEC00000
OEM_ID = b"PYVMM "
OEM_TABLE_ID = b"PYVMMSMP"
MADT_PCAT_COMPAT = 1           # the VM has the in-kernel 8259 PICs too

# struct acpi_table_header: signature, length, revision, checksum, OEM id, OEM table id,
# OEM revision, creator id, creator revision
HEADER = struct.Struct("<4sIBB6s8sI4sI")
RSDP = struct.Struct("<8sB6sBIIQB3s")   # ACPI 2.0+ RSDP, 36 bytes
MADT_LAPIC = struct.Struct("<BBBBI")     # type 0: length 8, ACPI processor uid, APIC id, flags
MADT_IOAPIC = struct.Struct("<BBBBII")   # type 1: length 12, id, reserved, address, GSI base


def _checksum(data: bytes) -> int:
    """The byte that makes `data` (with it) sum to 0 mod 256."""
    return (-sum(data)) & 0xFF


def _table(signature: bytes, revision: int, body: bytes) -> bytes:
    length = HEADER.size + len(body)
    head = HEADER.pack(signature, length, revision, 0, OEM_ID, OEM_TABLE_ID, 1, b"PYVM", 1)
    raw = head + body
    return raw[:9] + bytes([_checksum(raw)]) + raw[10:]


def madt(vcpus: int) -> bytes:
    """The MADT for `vcpus` vCPUs with APIC IDs 0..vcpus-1 and one I/O APIC."""
    entries = b"".join(MADT_LAPIC.pack(0, MADT_LAPIC.size, i, i, 1) for i in range(vcpus))
    # the I/O APIC's ID follows the CPUs' (KVM's IOAPIC answers to any ID it is given)
    entries += MADT_IOAPIC.pack(1, MADT_IOAPIC.size, vcpus, 0, IOAPIC_ADDR, 0)
    return _table(b"APIC", 5, struct.pack("<II", LAPIC_ADDR, MADT_PCAT_COMPAT) + entries)


def _align16(n: int) -> int:
    return (n + 15) & ~15


def build(vcpus: int, base: int = ACPI_ADDR) -> bytes:
    """The tables for `vcpus` vCPUs as one blob to write at `base` (the RSDP's address)."""
    madt_at = base + _align16(RSDP.size)
    madt_raw = madt(vcpus)
    rsdt_at = madt_at + _align16(len(madt_raw))
    rsdt = _table(b"RSDT", 1, struct.pack("<I", madt_at))
    xsdt_at = rsdt_at + _align16(len(rsdt))
    xsdt = _table(b"XSDT", 1, struct.pack("<Q", madt_at))
    first = RSDP.pack(b"RSD PTR ", 0, OEM_ID, 2, rsdt_at, RSDP.size, xsdt_at, 0, bytes(3))
    first = first[:8] + bytes([_checksum(first[:20])]) + first[9:]
    first = first[:32] + bytes([_checksum(first)]) + first[33:]
    blob = bytearray(xsdt_at + len(xsdt) - base)
    for at, raw in ((base, first), (madt_at, madt_raw), (rsdt_at, rsdt), (xsdt_at, xsdt)):
        blob[at - base:at - base + len(raw)] = raw
    assert base + len(blob) <= ACPI_END, "the ACPI tables outgrew the BIOS area"
    return bytes(blob)


def write(mem, vcpus: int) -> int:
    """Write the tables into guest RAM; returns the RSDP's guest-physical address."""
    mem.write(ACPI_ADDR, build(vcpus))
    return ACPI_ADDR
