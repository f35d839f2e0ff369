"""The fixed guest-physical layout kvmpy boots with, and the e820 map derived from it.

Everything the loaders and the CPU-mode setup put below 1 MiB lives at one of
the addresses below, so overlaps can be seen in one place (docs/boot.md has
the same map as a table). The addresses follow the PC conventions Linux and
multiboot kernels expect: nothing of ours in the real-mode IVT/BDA page, the
"zero page" at a fixed low address, the MP floating pointer in the last KiB of
base memory (where Linux's smp_scan_config looks: 639 KiB), and the kernel at
1 MiB ("high memory").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from ..errors import BootError

PAGE_SIZE = 0x1000

# -- CPU-mode structures (written by kvmpy/x86/modes.py) ----------------------
# These match what modes.py writes: GDT slots 0..8 (null, CODE32 0x08,
# __BOOT_CS 0x10, __BOOT_DS 0x18, a 16-byte TSS descriptor 0x20, user
# segments up to 0x43), a full page for the 256 long-mode IDT gates, a TSS.
GDT_ADDR = 0x500
GDT_SIZE = 0x50  # null, CODE32 0x08, __BOOT_CS 0x10, __BOOT_DS 0x18, user 0x23/0x2b/0x33, TSS 0x40
IDT_ADDR = 0x1000  # a page: 256 long-mode gates (written only for guests that ask for an IDT)
IDT_SIZE = 0x1000
TSS_ADDR = 0x2000
TSS_SIZE = 0x68
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000  # four page directories 0xb000..0xefff: 2 MiB pages for the first 4 GiB
PD_COUNT = 4
PAGE_TABLES_END = PD_ADDR + PD_COUNT * PAGE_SIZE

# -- Boot information handed to the kernel ------------------------------------
# struct boot_params ("zero page") for the Linux 64-bit boot protocol; the PVH
# hvm_start_info and the multiboot information structure use the same page,
# since only one boot protocol is in use per VM.
ZERO_PAGE_ADDR = 0x7000
BOOT_INFO_ADDR = ZERO_PAGE_ADDR
BOOT_INFO_SIZE = PAGE_SIZE

# The command line buffer; boot.rst allows it anywhere between the end of the
# setup heap and 0xA0000. Module strings of multiboot follow the command line.
CMDLINE_ADDR = 0x20000
CMDLINE_MAX_SIZE = 0x10000  # bytes including the terminating NUL

# -- PC firmware areas ---------------------------------------------------------
# The top of usable base memory: 639 KiB, the last KiB being the EBDA.
LOW_MEMORY_TOP = 0x9FC00
EBDA_ADDR = 0x9FC00
# The MP floating pointer and configuration table go at the start of the EBDA.
MPTABLE_ADDR = EBDA_ADDR
MPTABLE_LIMIT = 0xA0000  # end of the EBDA: the MP table must fit below it
# EBDA + VGA hole + BIOS ROM shadow: reserved in e820 even though it is RAM here.
BIOS_RESERVED_START = EBDA_ADDR
BIOS_RESERVED_END = 0x100000

# -- The kernel ---------------------------------------------------------------
HIGH_MEMORY_ADDR = 0x100000  # "high memory": where bzImage's protected-mode part goes
BZIMAGE_LOAD_ADDR = HIGH_MEMORY_ADDR

# e820 types (ACPI "Address Range Types"); also the values of the PVH memmap
# and the multiboot mmap entry type.
E820_RAM = 1
E820_RESERVED = 2

# Named low-memory structures a loaded kernel image must not overlap.
BOOT_STRUCTURES: tuple[tuple[str, int, int], ...] = (
    ("GDT/IDT/TSS", GDT_ADDR, TSS_ADDR + TSS_SIZE - GDT_ADDR),
    ("boot information (zero page)", BOOT_INFO_ADDR, BOOT_INFO_SIZE),
    ("page tables", PML4_ADDR, PAGE_TABLES_END - PML4_ADDR),
    ("command line", CMDLINE_ADDR, CMDLINE_MAX_SIZE),
    ("EBDA/BIOS area", BIOS_RESERVED_START, BIOS_RESERVED_END - BIOS_RESERVED_START),
)
# A multiboot kernel starts in 32-bit protected mode without paging, IDT or TSS:
# of the CPU-mode structures only the GDT is in use, so the rest of low memory
# is the kernel's (kvm-unit-tests' realmode.flat is linked at 0x8000).
# kvmpy/x86/firmware.py writes a real-mode IVT for them.
MULTIBOOT_STRUCTURES: tuple[tuple[str, int, int], ...] = (
    ("real-mode IVT", 0, 0x400),
    ("GDT", GDT_ADDR, GDT_SIZE),
    *(s for s in BOOT_STRUCTURES if s[0] not in ("GDT/IDT/TSS", "page tables")),
)


def check_clear_of_boot_structures(what: str, gpa: int, size: int,
                                   structures: Iterable[tuple[str, int, int]] = BOOT_STRUCTURES) -> None:
    """Raise BootError if [gpa, gpa+size) overlaps one of kvmpy's low-memory `structures`."""
    for name, start, length in structures:
        if gpa < start + length and start < gpa + size:
            raise BootError(
                f"{what} at [{gpa:#x}, {gpa + size:#x}) overlaps kvmpy's {name} "
                f"at [{start:#x}, {start + length:#x}); link it at or above {HIGH_MEMORY_ADDR:#x}")


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


def align_down(value: int, alignment: int) -> int:
    return value & ~(alignment - 1)


@dataclass(frozen=True)
class E820Entry:
    """One BIOS e820 map entry (also the PVH memmap and multiboot mmap content)."""

    addr: int
    size: int
    type: int

    @property
    def end(self) -> int:
        return self.addr + self.size


def e820_map(ram_ranges: Iterable[tuple[int, int]],
             reserved: Iterable[tuple[int, int]] = ()) -> list[E820Entry]:
    """The guest's memory map: RAM minus the EBDA/BIOS area and `reserved` (gpa, size) ranges.

    Reserved ranges are listed as E820_RESERVED entries (whether or not they
    are backed by RAM), RAM between them as E820_RAM, sorted by address.
    """
    holes = [(BIOS_RESERVED_START, BIOS_RESERVED_END - BIOS_RESERVED_START)]
    for gpa, size in reserved:
        if size <= 0:
            raise BootError(f"reserved range at {gpa:#x} has non-positive size {size}")
        holes.append((gpa, size))
    # Merge overlapping or touching reserved ranges so the map has no overlaps.
    merged: list[list[int]] = []
    for gpa, size in sorted(holes):
        if merged and gpa <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], gpa + size)
        else:
            merged.append([gpa, gpa + size])

    entries: list[E820Entry] = []
    for gpa, size in sorted(ram_ranges):
        pieces = [(gpa, gpa + size)]
        for hs, he in merged:
            cut: list[tuple[int, int]] = []
            for s, e in pieces:
                if he <= s or e <= hs:
                    cut.append((s, e))
                    continue
                if s < hs:
                    cut.append((s, hs))
                if he < e:
                    cut.append((he, e))
            pieces = cut
        entries.extend(E820Entry(s, e - s, E820_RAM) for s, e in pieces)
    entries.extend(E820Entry(s, e - s, E820_RESERVED) for s, e in merged)
    entries.sort(key=lambda x: x.addr)
    return entries


def usable_ram(entries: Iterable[E820Entry]) -> list[tuple[int, int]]:
    """(start, end) of each E820_RAM entry."""
    return [(e.addr, e.end) for e in entries if e.type == E820_RAM]


def in_usable_ram(entries: Iterable[E820Entry], gpa: int, size: int) -> bool:
    """True if [gpa, gpa+size) lies inside one E820_RAM entry."""
    return any(s <= gpa and gpa + size <= e for s, e in usable_ram(entries))
