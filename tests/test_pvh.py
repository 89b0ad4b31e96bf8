"""The PVH loader on real ELF files built with gcc, and on broken ones."""

import shutil
import struct
import subprocess

import pytest
from elftools.elf.elffile import ELFFile

from vmm.boot.pvh import (CMDLINE_ADDR, CMDLINE_MAX, HVM_START_MAGIC, START_INFO,
                          START_INFO_ADDR, MEMMAP_ENTRY, load_pvh)
from vmm.errors import BootError
import vmm.boot.pvh as pvh
from vmm.memory import MiB, GuestMemory, layout

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build ELFs")

NOTE = """
	.pushsection .note.Xen, "a", @note
	.balign 4
	.long 4
	.long {size}
	.long {type}
	.asciz "Xen"
	.balign 4
	.{width} _start
	.balign 4
	.popsection
"""

BODY = """
	.text
	.globl _start
_start:
	hlt
	jmp _start
	.data
	.long 0x11223344
	.bss
	.zero 8192
	.section .note.GNU-stack, "", @progbits
"""


def build(tmp_path, name, *, note="quad", base=0x100000, m32=False, note_type=18):
    """A tiny static ELF linked at `base` with (or without) a PVH note of `note` width."""
    src = tmp_path / f"{name}.S"
    text = BODY
    if note:
        text = NOTE.format(size=8 if note == "quad" else 4, type=note_type, width=note) + text
    src.write_text(text)
    out = tmp_path / f"{name}.elf"
    cmd = ["gcc", "-nostdlib", "-static", "-no-pie", f"-Wl,-Ttext-segment={base:#x}",
           "-Wl,--build-id=none", "-o", str(out), str(src)]
    if m32:
        cmd.insert(1, "-m32")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        if m32:
            pytest.skip(f"gcc cannot build 32-bit ELFs here: {r.stderr.strip()}")
        raise AssertionError(r.stderr)
    return out


def elf_facts(path):
    with open(path, "rb") as f:
        elf = ELFFile(f)
        loads = [(s.header.p_paddr, s.header.p_filesz, s.header.p_memsz, s.data())
                 for s in elf.iter_segments() if s.header.p_type == "PT_LOAD"]
        return elf.header.e_entry, loads


@pytest.fixture
def mem():
    m = GuestMemory(4 * MiB)
    yield m
    m.close()


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    return build(tmp_path_factory.mktemp("pvh"), "kernel")


def test_loads_segments_start_info_memmap_and_cmdline(kernel, mem):
    mem.write(0x100000, b"\xaa" * (2 * MiB))          # bss must come back zeroed
    info = load_pvh(str(kernel), mem, "console=ttyS0 quiet")
    entry, loads = elf_facts(kernel)
    assert info.entry == entry
    assert mem.read(entry, 1) == b"\xf4"             # hlt
    assert info.start_info == START_INFO_ADDR == 0x6000
    for paddr, filesz, memsz, data in loads:
        assert mem.read(paddr, filesz) == data
        assert mem.read(paddr + filesz, memsz - filesz) == bytes(memsz - filesz)
    assert info.image_end == max(p + m for p, _, m, _ in loads)
    assert b"\x44\x33\x22\x11" in b"".join(d for *_, d in loads)

    (magic, version, flags, nr_modules, modlist, cmdline, rsdp, memmap, entries,
     reserved) = START_INFO.unpack(mem.read(0x6000, START_INFO.size))
    assert (magic, version, flags, nr_modules, modlist, rsdp, reserved) == \
        (HVM_START_MAGIC, 1, 0, 0, 0, 0, 0)
    assert cmdline == CMDLINE_ADDR == 0x7000
    assert mem.read(0x7000, 20) == b"console=ttyS0 quiet\0"
    assert memmap == 0x6000 + START_INFO.size and entries == len(mem.regions) == 1
    assert MEMMAP_ENTRY.unpack(mem.read(memmap, MEMMAP_ENTRY.size)) == (0, 4 * MiB, 1, 0)


def test_memmap_lists_ram_above_the_hole():
    """Each RAM region is one memmap entry; 5 GiB of RAM is split around the MMIO hole."""

    class BigLayout:
        """Real 4 MiB of RAM that reports the region layout of 5 GiB (nothing is loaded)."""

        def __init__(self, ram):
            self.ram, self.regions = ram, layout(5 << 30)

        def write(self, gpa, data):
            self.ram.write(gpa, data)

    ram = GuestMemory(4 * MiB)
    try:
        pvh._write_start_info(BigLayout(ram), b"")
        fields = START_INFO.unpack(ram.read(0x6000, START_INFO.size))
        memmap, n = fields[7], fields[8]
        got = [MEMMAP_ENTRY.unpack(ram.read(memmap + i * MEMMAP_ENTRY.size, MEMMAP_ENTRY.size))
               for i in range(n)]
        assert got == [(0, 3 << 30, 1, 0), (4 << 30, 2 << 30, 1, 0)]
    finally:
        ram.close()


def test_32_bit_note_descriptor(tmp_path, mem):
    path = build(tmp_path, "long", note="long")
    assert load_pvh(str(path), mem, "").entry == elf_facts(path)[0]
    assert mem.read(0x7000, 1) == b"\0"


def test_i386_kernel(tmp_path, mem):
    path = build(tmp_path, "i386", note="long", m32=True)
    info = load_pvh(str(path), mem, "x")
    assert info.entry == elf_facts(path)[0]
    assert mem.read(info.entry, 1) == b"\xf4"


def without_pt_note(kernel):
    """The kernel with its PT_NOTE headers turned into PT_NULL: only SHT_NOTE is left."""
    data = bytearray(kernel.read_bytes())
    with open(kernel, "rb") as f:
        elf = ELFFile(f)
        phoff, phentsize = elf.header.e_phoff, elf.header.e_phentsize
        notes = [i for i, s in enumerate(elf.iter_segments()) if s.header.p_type == "PT_NOTE"]
        shoff = elf.header.e_shoff
    assert notes
    for i in notes:
        struct.pack_into("<I", data, phoff + i * phentsize, 0)
    return data, shoff


def test_note_found_in_sections_when_no_pt_note(tmp_path, mem, kernel):
    data, _ = without_pt_note(kernel)
    path = tmp_path / "sections.elf"
    path.write_bytes(bytes(data))
    assert load_pvh(str(path), mem, "").entry == elf_facts(kernel)[0]


@pytest.mark.parametrize("cut", [-200, 0, 10, -1])
def test_truncated_section_headers(tmp_path, mem, kernel, cut):
    data, shoff = without_pt_note(kernel)
    path = tmp_path / "sections.elf"
    path.write_bytes(bytes(data[:shoff + cut if cut >= 0 else len(data) + cut]))
    with pytest.raises(BootError, match=f"{path} is a truncated or malformed ELF"):
        load_pvh(str(path), mem, "")


def test_missing_file(tmp_path, mem):
    path = tmp_path / "nope.elf"
    with pytest.raises(BootError, match=f"kernel image not found: {path}"):
        load_pvh(str(path), mem, "")


def test_no_kernel_given(mem):
    with pytest.raises(BootError, match="--kernel"):
        load_pvh(None, mem, "")


def test_directory(tmp_path, mem):
    with pytest.raises(BootError, match="is a directory"):
        load_pvh(str(tmp_path), mem, "")


def test_text_file(tmp_path, mem):
    path = tmp_path / "README"
    path.write_text("this is not a kernel\n")
    with pytest.raises(BootError, match=f"{path} is not an ELF file"):
        load_pvh(str(path), mem, "")


def test_empty_file(tmp_path, mem):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    with pytest.raises(BootError, match="is not an ELF file"):
        load_pvh(str(path), mem, "")


@pytest.mark.parametrize("keep", [8, 40, 100, 0x158, 0x1001, 0x2002])
def test_truncated_elf(tmp_path, mem, kernel, keep):
    path = tmp_path / "cut.elf"
    path.write_bytes(kernel.read_bytes()[:keep])
    with pytest.raises(BootError, match=f"{path} .*(truncated|malformed)"):
        load_pvh(str(path), mem, "")


def test_elf_without_pvh_note(tmp_path, mem):
    path = build(tmp_path, "plain", note=None)
    with pytest.raises(BootError, match=r"has no PVH entry point \(XEN_ELFNOTE_PHYS32_ENTRY\)"
                                        r".*CONFIG_PVH"):
        load_pvh(str(path), mem, "")


def test_xen_note_of_another_type_is_not_an_entry(tmp_path, mem):
    path = build(tmp_path, "othernote", note_type=6)
    with pytest.raises(BootError, match="no PVH entry point"):
        load_pvh(str(path), mem, "")


def test_wrong_machine(tmp_path, mem, kernel):
    data = bytearray(kernel.read_bytes())
    struct.pack_into("<H", data, 18, 183)   # e_machine = EM_AARCH64
    path = tmp_path / "arm.elf"
    path.write_bytes(bytes(data))
    with pytest.raises(BootError, match=f"{path} is an ELF for AArch64, pyvmm boots x86-64"):
        load_pvh(str(path), mem, "")


def test_object_file_is_refused(tmp_path, mem):
    src = tmp_path / "o.S"
    src.write_text(NOTE.format(size=8, type=18, width="quad") + BODY)
    obj = tmp_path / "o.o"
    subprocess.run(["gcc", "-c", "-o", str(obj), str(src)], check=True)
    with pytest.raises(BootError, match="ET_REL, not a linked kernel"):
        load_pvh(str(obj), mem, "")


def test_segment_outside_ram(tmp_path, mem):
    path = build(tmp_path, "high", base=0x800000)
    with pytest.raises(BootError, match=rf"{path} loads 0x800000-0x[0-9a-f]+ outside guest RAM "
                                        r"\(4 MiB\): give more --memory"):
        load_pvh(str(path), mem, "")


def test_segment_in_the_mmio_hole(tmp_path):
    path = build(tmp_path, "hole", base=0xC000_0000)
    big = GuestMemory(4 * MiB)
    try:
        with pytest.raises(BootError, match="in the MMIO hole at 3-4 GiB"):
            load_pvh(str(path), big, "")
    finally:
        big.close()


def test_segment_over_the_boot_data(tmp_path, mem):
    path = build(tmp_path, "low", base=0x5000)
    with pytest.raises(BootError, match="over pyvmm's boot data at 0x6000-0x7fff"):
        load_pvh(str(path), mem, "")


def test_cmdline_limits(kernel, mem):
    load_pvh(str(kernel), mem, "a" * CMDLINE_MAX)
    assert CMDLINE_MAX == 4095
    assert mem.read(0x7000 + 4094, 2) == b"a\0"
    with pytest.raises(BootError, match="4096 bytes, pyvmm passes at most 4095"):
        load_pvh(str(kernel), mem, "a" * 4096)
    with pytest.raises(BootError, match="NUL"):
        load_pvh(str(kernel), mem, "a\0b")


def test_acpi_tables_list_every_vcpu_with_valid_checksums():
    """vmm/boot/acpi.py: RSDP (both checksums) -> XSDT and RSDT -> a MADT with one
    enabled Local APIC per vCPU (APIC ID = index) and the I/O APIC."""
    from vmm.boot import acpi
    blob = acpi.build(5)
    at = lambda addr, n: blob[addr - acpi.ACPI_ADDR:addr - acpi.ACPI_ADDR + n]   # noqa: E731
    rsdp = at(acpi.ACPI_ADDR, 36)
    assert rsdp[:8] == b"RSD PTR " and rsdp[15] == 2
    assert sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    rsdt, xsdt = struct.unpack_from("<I", rsdp, 16)[0], struct.unpack_from("<Q", rsdp, 24)[0]

    def table(addr, sig):
        length = struct.unpack_from("<I", at(addr, 8), 4)[0]
        raw = at(addr, length)
        assert raw[:4] == sig and sum(raw) % 256 == 0, sig
        return raw
    madt_at = struct.unpack_from("<Q", table(xsdt, b"XSDT"), 36)[0]
    assert struct.unpack_from("<I", table(rsdt, b"RSDT"), 36)[0] == madt_at
    madt = table(madt_at, b"APIC")
    assert struct.unpack_from("<II", madt, 36) == (0xFEE00000, 1)
    entries, off = [], 44
    while off < len(madt):
        entries.append(madt[off:off + madt[off + 1]])
        off += madt[off + 1]
    assert [(e[0], e[3], e[4]) for e in entries[:5]] == [(0, i, 1) for i in range(5)]
    assert entries[5][0] == 1 and struct.unpack_from("<I", entries[5], 4)[0] == 0xFEC00000
    assert len(entries) == 6
