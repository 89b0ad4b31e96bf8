"""Load a PVH ELF kernel: its segments, struct hvm_start_info and the command line.

PVH (xen/include/public/arch-x86/hvm/start_info.h, also used by QEMU and
Firecracker) is the simplest way to boot Linux: no real mode, no bzImage setup
header.  The kernel is an ELF whose PT_LOAD segments go to their physical
addresses; a Xen ELF note (type XEN_ELFNOTE_PHYS32_ENTRY) gives the 32-bit
protected-mode entry point, which is entered with %ebx holding the address of
struct hvm_start_info.  That struct points at the command line and at a memory
map, which is all a PVH kernel needs to find its RAM.

Guest-physical layout used here (below the usual 1 MiB kernel load address):

    0x6000  struct hvm_start_info (56 bytes), then the memory map
    0x7000  command line, NUL-terminated, at most 4095 bytes
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

from elftools.common.exceptions import ELFError
from elftools.construct.core import ConstructError
from elftools.elf.descriptions import describe_e_machine
from elftools.elf.elffile import ELFFile

from ..errors import BootError, GuestMemoryError
from ..memory import MMIO_HOLE_END, MMIO_HOLE_START, MiB, GuestMemory

XEN_ELFNOTE_PHYS32_ENTRY = 18
HVM_START_MAGIC = 0x336EC578
HVM_MEMMAP_TYPE_RAM = 1

START_INFO_ADDR = 0x6000
CMDLINE_ADDR = 0x7000
BOOT_AREA_END = 0x8000          # [START_INFO_ADDR, BOOT_AREA_END) is ours, not the kernel's
CMDLINE_MAX = BOOT_AREA_END - CMDLINE_ADDR - 1   # bytes, without the NUL

# struct hvm_start_info, version 1
START_INFO = struct.Struct("<IIIIQQQQII")
# struct hvm_memmap_table_entry
MEMMAP_ENTRY = struct.Struct("<QQII")

MACHINES = {"EM_X86_64": 64, "EM_386": 32}   # e_machine -> the ELF class it must have


@dataclass(frozen=True)
class BootInfo:
    """Where the loaded kernel starts and what it was given."""

    entry: int        # 32-bit PVH entry point (guest-physical)
    start_info: int   # guest-physical address of struct hvm_start_info (goes in %ebx)
    image_end: int    # first guest-physical byte after the highest loaded segment


@dataclass(frozen=True)
class _Segment:
    paddr: int
    offset: int
    filesz: int
    memsz: int


def load_pvh(path: str, mem: GuestMemory, cmdline: str = "", rsdp: int = 0) -> BootInfo:
    """Load the PVH kernel at `path` into `mem`; raise BootError naming the file if it can't.
    `rsdp`: the ACPI RSDP's guest-physical address for start_info (0: none)."""
    data = _read_image(path)
    segments, entry = _parse(path, data)
    cmd = _encode_cmdline(cmdline)

    ram_mib = mem.size // MiB
    for s in segments:
        end = s.paddr + s.memsz
        if s.paddr < BOOT_AREA_END and START_INFO_ADDR < end:
            raise BootError(f"{path} loads {s.paddr:#x}-{end - 1:#x}, over pyvmm's boot data at "
                            f"{START_INFO_ADDR:#x}-{BOOT_AREA_END - 1:#x}: link the kernel at "
                            f"1 MiB or above")
        if mem.contains(s.paddr, s.memsz):
            continue
        if MMIO_HOLE_START <= s.paddr < MMIO_HOLE_END:
            raise BootError(f"{path} loads {s.paddr:#x}-{end - 1:#x}, in the MMIO hole at "
                            f"3-4 GiB where there is no RAM: link the kernel lower")
        raise BootError(f"{path} loads {s.paddr:#x}-{end - 1:#x} outside guest RAM "
                        f"({ram_mib} MiB): give more --memory")
    if not any(s.paddr <= entry < s.paddr + s.memsz for s in segments):
        raise BootError(f"{path}: the PVH entry point {entry:#x} is not inside any loaded "
                        f"segment: the XEN_ELFNOTE_PHYS32_ENTRY note is wrong")

    try:
        for s in segments:
            mem.write(s.paddr, data[s.offset:s.offset + s.filesz])
            _zero(mem, s.paddr + s.filesz, s.memsz - s.filesz)
        _write_start_info(mem, cmd, rsdp)
    except GuestMemoryError as e:   # checked above; kept so a slip can't escape as a crash
        raise BootError(f"{path}: {e}: give more --memory") from None

    return BootInfo(entry=entry, start_info=START_INFO_ADDR,
                    image_end=max(s.paddr + s.memsz for s in segments))


# -- the file ------------------------------------------------------------------------------
def _read_image(path) -> bytes:
    if not path:
        raise BootError("no kernel image given: pass --kernel PATH (a PVH ELF kernel)")
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise BootError(f"kernel image not found: {path}") from None
    except IsADirectoryError:
        raise BootError(f"kernel image {path} is a directory, not a file") from None
    except OSError as e:
        raise BootError(f"cannot read kernel image {path}: {e.strerror}") from None


def _parse(path: str, data: bytes) -> tuple[list[_Segment], int]:
    """The non-empty PT_LOAD segments and the PVH entry point, all checked against the file."""
    if data[:4] != b"\x7fELF":
        raise BootError(f"{path} is not an ELF file")
    header_size = 64 if data[4:5] == b"\x02" else 52
    if len(data) < header_size:
        raise BootError(f"{path} is truncated: {len(data)} bytes, less than an ELF header")
    try:
        elf = ELFFile(io.BytesIO(data))
        machine = elf.header.e_machine
        if machine not in MACHINES:
            what = f"machine {machine:#x}" if isinstance(machine, int) else \
                describe_e_machine(machine)
            raise BootError(f"{path} is an ELF for {what}, pyvmm boots "
                            f"x86-64 (or i386) PVH kernels")
        if elf.elfclass != MACHINES[machine]:
            raise BootError(f"{path} is a {elf.elfclass}-bit ELF with machine {machine}: "
                            f"the file is malformed")
        if elf.header.e_type not in ("ET_EXEC", "ET_DYN"):
            raise BootError(f"{path} is an ELF of type {elf.header.e_type}, not a linked "
                            f"kernel: link it into an executable")
        ph_end = elf.header.e_phoff + elf.header.e_phnum * elf.header.e_phentsize
        if ph_end > len(data):
            raise BootError(f"{path} is truncated: its program headers end at byte {ph_end}, "
                            f"the file has {len(data)}")
        segments, entry = [], None
        for seg in elf.iter_segments():
            h = seg.header
            if h.p_type in ("PT_LOAD", "PT_NOTE") and h.p_offset + h.p_filesz > len(data):
                raise BootError(f"{path} is truncated: a segment needs file bytes up to "
                                f"{h.p_offset + h.p_filesz}, the file has {len(data)}")
            if h.p_type == "PT_LOAD" and h.p_memsz:
                if h.p_filesz > h.p_memsz:
                    raise BootError(f"{path} is malformed: a PT_LOAD segment has more file "
                                    f"bytes ({h.p_filesz}) than memory bytes ({h.p_memsz})")
                segments.append(_Segment(h.p_paddr, h.p_offset, h.p_filesz, h.p_memsz))
            elif h.p_type == "PT_NOTE" and entry is None:
                entry = _pvh_entry(path, data[h.p_offset:h.p_offset + h.p_filesz], h.p_align)
        if entry is None and elf.header.e_shoff and elf.num_sections():
            for sec in elf.iter_sections():
                h = sec.header
                if h.sh_type == "SHT_NOTE" and entry is None:
                    if h.sh_offset + h.sh_size > len(data):
                        raise BootError(f"{path} is truncated: a note section needs file bytes "
                                        f"up to {h.sh_offset + h.sh_size}, the file has "
                                        f"{len(data)}")
                    entry = _pvh_entry(path, data[h.sh_offset:h.sh_offset + h.sh_size],
                                       h.sh_addralign)
    except (ELFError, ConstructError, struct.error, ValueError, EOFError) as e:
        raise BootError(f"{path} is a truncated or malformed ELF file ({e})") from None
    if entry is None:
        raise BootError(f"{path} has no PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY): build the "
                        f"kernel with CONFIG_PVH or add the note")
    if not segments:
        raise BootError(f"{path} has no loadable (PT_LOAD) segments")
    return segments, entry


def _pvh_entry(path: str, notes: bytes, align: int) -> int | None:
    """The descriptor of the first ("Xen", XEN_ELFNOTE_PHYS32_ENTRY) note in `notes`."""
    align = 8 if align == 8 else 4   # notes are 4-aligned unless the container says 8

    def up(n: int) -> int:
        return (n + align - 1) & -align

    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, type_ = struct.unpack_from("<III", notes, pos)
        name_at = pos + 12
        desc_at = up(name_at + namesz)   # padding is to the container's alignment, measured
        pos = up(desc_at + descsz)       # from the note's start (8-aligned GNU property notes)
        if desc_at + descsz > len(notes):
            raise BootError(f"{path} has a malformed ELF note (it runs past its segment)")
        if notes[name_at:name_at + namesz].rstrip(b"\0") != b"Xen" or \
                type_ != XEN_ELFNOTE_PHYS32_ENTRY:
            continue
        if descsz not in (4, 8):
            raise BootError(f"{path}: the XEN_ELFNOTE_PHYS32_ENTRY note holds {descsz} bytes, "
                            f"expected a 4- or 8-byte address")
        entry = int.from_bytes(notes[desc_at:desc_at + descsz], "little")
        if entry >= 1 << 32:
            raise BootError(f"{path}: the PVH entry point {entry:#x} is above 4 GiB; it must "
                            f"be a 32-bit physical address")
        return entry
    return None


# -- what the kernel is given ----------------------------------------------------------------
def _encode_cmdline(cmdline: str) -> bytes:
    if "\0" in cmdline:
        raise BootError("the kernel command line contains a NUL character")
    cmd = cmdline.encode()
    if len(cmd) > CMDLINE_MAX:
        raise BootError(f"the kernel command line is {len(cmd)} bytes, pyvmm passes at most "
                        f"{CMDLINE_MAX}: shorten --cmdline")
    return cmd


def _write_start_info(mem: GuestMemory, cmd: bytes, rsdp: int = 0) -> None:
    memmap_addr = START_INFO_ADDR + START_INFO.size
    memmap = b"".join(MEMMAP_ENTRY.pack(r.gpa, r.size, HVM_MEMMAP_TYPE_RAM, 0)
                      for r in mem.regions)
    assert memmap_addr + len(memmap) <= CMDLINE_ADDR
    info = START_INFO.pack(HVM_START_MAGIC, 1, 0, 0,   # magic, version, flags, nr_modules
                           0, CMDLINE_ADDR, rsdp,      # modlist, cmdline, rsdp
                           memmap_addr, len(mem.regions), 0)
    mem.write(START_INFO_ADDR, info + memmap)
    mem.write(CMDLINE_ADDR, cmd + b"\0")


def _zero(mem: GuestMemory, gpa: int, length: int) -> None:
    """Zero-fill [gpa, gpa+length) in chunks (a kernel's .bss can be tens of MiB)."""
    chunk = bytes(min(length, 1 * MiB))
    while length > 0:
        n = min(length, len(chunk))
        mem.write(gpa, chunk[:n])
        gpa, length = gpa + n, length - n
