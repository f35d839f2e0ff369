"""ELF images as the loaders need them: headers, PT_LOAD segments, notes, and loading into RAM.

Shared by the Linux (vmlinux, PVH) and multiboot (ELF32) loaders; the
System V gABI and the x86-64 psABI define the fields read here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterable

from ..errors import BootError
from ..memory import GuestMemory
from . import layout
from .layout import E820Entry, align_up, in_usable_ram

# ELF (System V gABI) constants.
ELF_MAGIC = b"\x7fELF"
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB = 1
EM_386, EM_X86_64 = 3, 62
PT_LOAD, PT_NOTE = 1, 4
# include/xen/interface/elfnote.h: the PVH 32-bit entry point note.
XEN_ELFNOTE_PHYS32_ENTRY = 18
XEN_NOTE_NAME = b"Xen"


@dataclass(frozen=True)
class ElfSegment:
    """One program header (ELF gABI, "Program Header")."""

    type: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    flags: int


@dataclass
class ElfImage:
    elf_class: int
    machine: int
    entry: int
    segments: list[ElfSegment]

    @property
    def loads(self) -> list[ElfSegment]:
        return [s for s in self.segments if s.type == PT_LOAD and s.memsz]


def parse_elf(data: bytes | memoryview, name: str) -> ElfImage:
    """Parse an ELF header and its program headers; BootError if truncated or malformed."""
    data = memoryview(data)
    if len(data) < 0x34 or bytes(data[:4]) != ELF_MAGIC:
        raise BootError(f"{name}: not an ELF file (first bytes {bytes(data[:8]).hex(' ')})")
    elf_class, elf_data = data[4], data[5]
    if elf_data != ELFDATA2LSB:
        raise BootError(f"{name}: big-endian ELF; an x86 kernel is little-endian")
    if elf_class == ELFCLASS64:
        if len(data) < 0x40:
            raise BootError(f"{name}: truncated ELF64 header ({len(data)} bytes, need 64)")
        (_, machine, _, entry, phoff, _, _, _, phentsize, phnum) = struct.unpack_from(
            "<HHIQQQIHHH", data, 16)
        ph_fmt = "<IIQQQQQQ"
    elif elf_class == ELFCLASS32:
        (_, machine, _, entry, phoff, _, _, _, phentsize, phnum) = struct.unpack_from(
            "<HHIIIIIHHH", data, 16)
        ph_fmt = "<IIIIIIII"
    else:
        raise BootError(f"{name}: unknown ELF class {elf_class}")
    if phnum and phentsize < struct.calcsize(ph_fmt):
        raise BootError(f"{name}: program header entries of {phentsize} bytes are too small")
    if phoff + phnum * phentsize > len(data):
        raise BootError(
            f"{name}: truncated: program headers end at byte {phoff + phnum * phentsize}, "
            f"file has {len(data)}")
    segments = []
    for i in range(phnum):
        raw = struct.unpack_from(ph_fmt, data, phoff + i * phentsize)
        if elf_class == ELFCLASS64:
            p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _ = raw
        else:
            p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_flags, _ = raw
        seg = ElfSegment(p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_flags)
        if seg.type in (PT_LOAD, PT_NOTE) and seg.offset + seg.filesz > len(data):
            raise BootError(
                f"{name}: truncated: segment {i} needs file bytes up to "
                f"{seg.offset + seg.filesz}, file has {len(data)}")
        if seg.type == PT_LOAD and seg.filesz > seg.memsz:
            raise BootError(f"{name}: segment {i} has p_filesz {seg.filesz} > p_memsz {seg.memsz}")
        segments.append(seg)
    return ElfImage(elf_class, machine, entry, segments)


def elf_notes(data: bytes | memoryview, image: ElfImage) -> list[tuple[bytes, int, bytes]]:
    """(name, type, desc) of every note in the PT_NOTE segments (gABI "Note Section")."""
    data = memoryview(data)
    notes = []
    for seg in image.segments:
        if seg.type != PT_NOTE:
            continue
        pos, end = seg.offset, seg.offset + seg.filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
            pos += 12
            name = bytes(data[pos:pos + namesz]).rstrip(b"\0")
            pos += align_up(namesz, 4)
            desc = bytes(data[pos:pos + descsz])
            pos += align_up(descsz, 4)
            if pos > end:
                break
            notes.append((name, ntype, desc))
    return notes


def pvh_entry_point(data: bytes | memoryview, image: ElfImage) -> int | None:
    """The XEN_ELFNOTE_PHYS32_ENTRY address, or None if the kernel has no PVH entry."""
    for name, ntype, desc in elf_notes(data, image):
        if name == XEN_NOTE_NAME and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
            # Linux emits it with _ASM_PTR: 8 bytes on x86-64, 4 in newer kernels.
            if len(desc) >= 8:
                return struct.unpack_from("<Q", desc)[0] & 0xFFFF_FFFF
            if len(desc) >= 4:
                return struct.unpack_from("<I", desc)[0]
    return None


def load_elf_segments(mem: GuestMemory, data: bytes | memoryview, image: ElfImage, name: str,
                      e820: list[E820Entry],
                      structures: Iterable[tuple[str, int, int]] = layout.BOOT_STRUCTURES) -> tuple[int, int]:
    """Copy each PT_LOAD segment to its p_paddr and zero its bss; returns (gpa, size) spanned.

    No segment may overlap one of kvmpy's low-memory `structures`."""
    data = memoryview(data)
    loads = image.loads
    if not loads:
        raise BootError(f"{name}: ELF file has no loadable (PT_LOAD) segments")
    for seg in loads:
        _check_in_ram(mem, e820, f"{name}: segment at p_paddr {seg.paddr:#x}", seg.paddr, seg.memsz)
        layout.check_clear_of_boot_structures(f"{name}: segment", seg.paddr, seg.memsz, structures)
    for seg in loads:
        mem.write(seg.paddr, data[seg.offset:seg.offset + seg.filesz])
        if seg.memsz > seg.filesz:
            mem.fill(seg.paddr + seg.filesz, seg.memsz - seg.filesz)
    start = min(s.paddr for s in loads)
    end = max(s.paddr + s.memsz for s in loads)
    return start, end - start


def _check_in_ram(mem: GuestMemory, e820: list[E820Entry], what: str, gpa: int, size: int) -> None:
    if not in_usable_ram(e820, gpa, size):
        if mem.is_ram(gpa, size):
            raise BootError(
                f"{what} [{gpa:#x}, {gpa + size:#x}) overlaps memory reserved in the e820 map")
        raise BootError(
            f"{what} [{gpa:#x}, {gpa + size:#x}) is outside guest RAM "
            f"({mem.size >> 20} MiB: {_ram_text(mem)}); give the guest more memory")


def _ram_text(mem: GuestMemory) -> str:
    return ", ".join(f"[{g:#x}, {g + s:#x})" for g, s in mem.ram_ranges()) or "none"
