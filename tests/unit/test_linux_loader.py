"""kvmpy.boot.linux: bzImage, ELF vmlinux and PVH loading into a real GuestMemory.

The images are synthetic, built field by field here (the bzImage's setup
header through the same cffi struct the loader uses); a test at the end
loads the project's real kernel when it has been built.
"""

from __future__ import annotations

import glob
import os
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]



from kvmpy.boot import layout
from kvmpy.boot.linux import (HDRS_MAGIC, XEN_HVM_START_MAGIC_VALUE, BootEntry,
                              HvmMemmapTableEntry, HvmModlistEntry, ffi, kernel_info, lib,
                              load_linux, read_boot_params, read_hvm_start_info)
from kvmpy.errors import BootError
from kvmpy.memory import GuestMemory

MiB = 1 << 20
HDR_OFF = ffi.offsetof("struct boot_params", "hdr")
HDR_SIZE = ffi.sizeof("struct setup_header")


# -- synthetic images ------------------------------------------------------------

def make_bzimage(payload_size: int = 0x4000, *, setup_sects: int = 4, version: int = 0x020F,
                 xloadflags: int | None = None, relocatable: bool = True,
                 pref_address: int = 0x1000000, init_size: int = 0x40000,
                 cmdline_size: int = 2047, initrd_addr_max: int = 0x7FFFFFFF,
                 kernel_alignment: int = 0x200000, truncate: int = 0,
                 version_string: bytes = b"6.1.0-kvmpy-test (test@host) #1") -> bytes:
    """A bzImage whose setup header is valid and whose payload is a byte pattern."""
    hdr = ffi.new("struct setup_header *")
    hdr.setup_sects = setup_sects
    hdr.boot_flag = 0xAA55
    hdr.header = HDRS_MAGIC
    hdr.version = version
    # boot.rst: the header ends at 0x202 + the jump's offset byte (at 0x201).
    hdr.jump = 0xEB | ((HDR_OFF + HDR_SIZE - 0x202) << 8)
    hdr.loadflags = lib.LOADED_HIGH
    hdr.syssize = payload_size // 16
    hdr.relocatable_kernel = int(relocatable)
    hdr.kernel_alignment = kernel_alignment
    hdr.pref_address = pref_address
    hdr.init_size = init_size
    hdr.cmdline_size = cmdline_size
    hdr.initrd_addr_max = initrd_addr_max
    hdr.xloadflags = lib.XLF_KERNEL_64 if xloadflags is None else xloadflags
    setup = bytearray((setup_sects + 1) * 512)
    setup[HDR_OFF:HDR_OFF + HDR_SIZE] = bytes(ffi.buffer(hdr))
    # kernel_version points at a string in the setup area, minus 0x200.
    setup[0x400:0x400 + len(version_string)] = version_string
    struct.pack_into("<H", setup, HDR_OFF + ffi.offsetof("struct setup_header", "kernel_version"),
                     0x400 - 0x200)
    payload = bytes((i * 7 + 3) & 0xFF for i in range(payload_size))
    image = bytes(setup) + payload
    return image[:len(image) - truncate] if truncate else image


def make_elf(segments: list[tuple[int, int, bytes, int]], entry: int, *,
             notes: list[tuple[bytes, int, bytes]] = (), elf_class: int = 2,
             machine: int = 62) -> bytes:
    """An ELF executable; segments are (paddr, vaddr, file bytes, memsz) PT_LOADs."""
    if elf_class == 2:
        ehdr_size, ph_size = 64, 56
    else:
        ehdr_size, ph_size = 52, 32
    note_blob = b""
    for name, ntype, desc in notes:
        n = name + b"\0"
        note_blob += struct.pack("<III", len(n), len(desc), ntype)
        note_blob += n.ljust((len(n) + 3) & ~3, b"\0") + desc.ljust((len(desc) + 3) & ~3, b"\0")
    phnum = len(segments) + (1 if notes else 0)
    offset = ehdr_size + phnum * ph_size
    phdrs, body = b"", b""
    for paddr, vaddr, data, memsz in segments:
        if elf_class == 2:
            phdrs += struct.pack("<IIQQQQQQ", 1, 7, offset + len(body), vaddr, paddr, len(data),
                                 memsz, 0x1000)
        else:
            phdrs += struct.pack("<IIIIIIII", 1, offset + len(body), vaddr, paddr, len(data),
                                 memsz, 7, 0x1000)
        body += data
    if notes:
        if elf_class == 2:
            phdrs += struct.pack("<IIQQQQQQ", 4, 4, offset + len(body), 0, 0, len(note_blob),
                                 len(note_blob), 4)
        else:
            phdrs += struct.pack("<IIIIIIII", 4, offset + len(body), 0, 0, len(note_blob),
                                 len(note_blob), 4, 4)
        body += note_blob
    ident = b"\x7fELF" + bytes([elf_class, 1, 1, 0]) + bytes(8)
    if elf_class == 2:
        ehdr = ident + struct.pack("<HHIQQQIHHHHHH", 2, machine, 1, entry, ehdr_size, 0, 0,
                                   ehdr_size, ph_size, phnum, 0, 0, 0)
    else:
        ehdr = ident + struct.pack("<HHIIIIIHHHHHH", 2, machine, 1, entry, ehdr_size, 0, 0,
                                   ehdr_size, ph_size, phnum, 0, 0, 0)
    return ehdr + phdrs + body


TEXT = bytes(range(256)) * 16  # 4 KiB
DATA = b"kvmpy-data" * 100
VMLINUX_TEXT_PADDR = 0x1000000
VMLINUX_DATA_PADDR = 0x1200000
KERNEL_VBASE = 0xFFFFFFFF81000000
PVH_ENTRY = 0x1000040


def make_vmlinux(*, pvh: bool = True, entry: int = VMLINUX_TEXT_PADDR + 0x10,
                 note_size: int = 8) -> bytes:
    notes = []
    if pvh:
        desc = struct.pack("<Q" if note_size == 8 else "<I", PVH_ENTRY)
        notes.append((b"Xen", 18, desc))
    return make_elf(
        [(VMLINUX_TEXT_PADDR, KERNEL_VBASE, TEXT, len(TEXT)),
         (VMLINUX_DATA_PADDR, KERNEL_VBASE + 0x200000, DATA, len(DATA) + 0x2000)],
        entry, notes=notes)


@pytest.fixture
def mem():
    with GuestMemory(64 * MiB) as m:
        yield m


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


# -- bzImage -------------------------------------------------------------------

def test_bzimage_relocatable_loads_at_pref_address_with_64bit_entry(mem, tmp_path):
    image = make_bzimage()
    k = write(tmp_path, "bzImage", image)
    entry = load_linux(mem, k, cmdline="console=ttyS0 quiet")
    setup_size = (4 + 1) * 512
    assert entry.mode == "linux64"
    assert entry.rip == 0x1000000 + 0x200
    assert entry.rsi == layout.ZERO_PAGE_ADDR
    assert mem.read(0x1000000, len(image) - setup_size) == image[setup_size:]
    assert entry.kernel_range == (0x1000000, 0x40000)  # init_size > payload


def test_bzimage_boot_params_fields(mem, tmp_path):
    k = write(tmp_path, "bzImage", make_bzimage())
    load_linux(mem, k, cmdline="console=ttyS0")
    bp = read_boot_params(mem)
    h = bp.hdr
    assert h.header == HDRS_MAGIC and h.boot_flag == 0xAA55 and h.version == 0x020F
    assert h.type_of_loader == 0xFF
    assert h.loadflags & lib.LOADED_HIGH and h.loadflags & lib.CAN_USE_HEAP
    assert h.heap_end_ptr == 0xE000 - 0x200
    assert h.cmd_line_ptr == layout.CMDLINE_ADDR
    assert mem.read(layout.CMDLINE_ADDR, 14) == b"console=ttyS0\0"
    assert h.code32_start == 0x1000000
    assert h.ramdisk_image == 0 and h.ramdisk_size == 0
    assert h.cmdline_size == 2047  # copied from the image's header
    assert bp.sentinel == 0


def test_bzimage_e820_from_ram_minus_bios_area(mem, tmp_path):
    k = write(tmp_path, "bzImage", make_bzimage())
    load_linux(mem, k, cmdline="")
    bp = read_boot_params(mem)
    table = [(bp.e820_table[i].addr, bp.e820_table[i].size, bp.e820_table[i].type)
             for i in range(bp.e820_entries)]
    assert table == [(0, 0x9FC00, 1), (0x9FC00, 0x100000 - 0x9FC00, 2),
                     (0x100000, 64 * MiB - 0x100000, 1)]


def test_reserved_ranges_appear_in_e820_and_split_ram(mem, tmp_path):
    k = write(tmp_path, "bzImage", make_bzimage())
    entry = load_linux(mem, k, cmdline="", reserved=[(0x9C000, 0x3000)])
    bp = read_boot_params(mem)
    table = [(bp.e820_table[i].addr, bp.e820_table[i].size, bp.e820_table[i].type)
             for i in range(bp.e820_entries)]
    assert table[:3] == [(0, 0x9C000, 1), (0x9C000, 0x3000, 2), (0x9F000, 0xC00, 1)]
    assert [(e.addr, e.size, e.type) for e in entry.e820] == table


def test_reserved_range_overlapping_zero_page_is_refused(mem, tmp_path):
    k = write(tmp_path, "bzImage", make_bzimage())
    with pytest.raises(BootError, match="overlaps the boot information page"):
        load_linux(mem, k, cmdline="", reserved=[(0x7000, 0x1000)])


def test_bzimage_not_relocatable_loads_at_1mib(mem, tmp_path):
    k = write(tmp_path, "bzImage", make_bzimage(relocatable=False))
    entry = load_linux(mem, k, cmdline="")
    assert entry.rip == 0x100000 + 0x200
    assert read_boot_params(mem).hdr.code32_start == 0x100000
    # It moves itself to pref_address: that memory is part of its footprint.
    assert entry.kernel_range == (0x100000, 0x1000000 + 0x40000 - 0x100000)


def test_bzimage_initrd_placed_page_aligned_high_below_initrd_addr_max(mem, tmp_path):
    k = write(tmp_path, "bzImage", make_bzimage(initrd_addr_max=0x2FFFFFF))
    initrd_data = os.urandom(10000)
    rd = write(tmp_path, "initrd", initrd_data)
    entry = load_linux(mem, k, initrd=rd, cmdline="")
    gpa, size = entry.initrd_range
    assert size == 10000 and gpa % 4096 == 0
    assert gpa + size <= 0x3000000 and gpa + size > 0x3000000 - 4096 - 10000
    assert mem.read(gpa, size) == initrd_data
    h = read_boot_params(mem).hdr
    assert (h.ramdisk_image, h.ramdisk_size) == (gpa, size)


def test_bzimage_initrd_at_top_of_ram(mem, tmp_path):
    k = write(tmp_path, "bzImage", make_bzimage())
    rd = write(tmp_path, "initrd", b"x" * 5000)
    entry = load_linux(mem, k, initrd=rd, cmdline="")
    assert entry.initrd_range == ((64 * MiB - 5000) & ~0xFFF, 5000)


def test_initrd_not_fitting_below_initrd_addr_max_is_refused(mem, tmp_path):
    # Room below initrd_addr_max is taken by the kernel: nowhere to put it.
    k = write(tmp_path, "bzImage", make_bzimage(relocatable=False, initrd_addr_max=0x10FFFFF))
    rd = write(tmp_path, "initrd", b"x" * (2 * MiB))
    with pytest.raises(BootError, match=r"does not fit .* below initrd_addr_max 0x10fffff"):
        load_linux(mem, k, initrd=rd, cmdline="")


def test_initrd_too_big_for_guest_memory_is_refused(mem, tmp_path):
    k = write(tmp_path, "bzImage", make_bzimage())
    rd = tmp_path / "initrd"
    with open(rd, "wb") as f:
        f.truncate(80 * MiB)
    with pytest.raises(BootError, match="give the guest more memory"):
        load_linux(mem, k, initrd=rd, cmdline="")


def test_truncated_bzimage_names_expected_and_actual_size(mem, tmp_path):
    image = make_bzimage(truncate=100)
    k = write(tmp_path, "bzImage", image)
    expected = len(image) + 100
    with pytest.raises(BootError, match=rf"truncated bzImage.*says {expected} bytes.*has {len(image)}"):
        load_linux(mem, k, cmdline="")


def test_bad_magic_names_first_bytes(mem, tmp_path):
    k = write(tmp_path, "junk", b"\x12\x34\x56\x78" + bytes(4096))
    with pytest.raises(BootError, match="first bytes are 12 34 56 78"):
        load_linux(mem, k, cmdline="")


def test_old_boot_protocol_is_refused(mem, tmp_path):
    k = write(tmp_path, "bzImage", make_bzimage(version=0x0206))
    with pytest.raises(BootError, match=r"2\.06 is older than 2\.12"):
        load_linux(mem, k, cmdline="")


def test_32bit_only_bzimage_is_refused(mem, tmp_path):
    k = write(tmp_path, "bzImage", make_bzimage(xloadflags=0))
    with pytest.raises(BootError, match="XLF_KERNEL_64"):
        load_linux(mem, k, cmdline="")


def test_cmdline_longer_than_cmdline_size_is_refused(mem, tmp_path):
    k = write(tmp_path, "bzImage", make_bzimage(cmdline_size=16))
    load_linux(mem, k, cmdline="x" * 16)
    with pytest.raises(BootError, match="17 bytes.*at most 16"):
        load_linux(mem, k, cmdline="x" * 17)


def test_kernel_too_big_for_guest_memory_is_refused(tmp_path):
    k = write(tmp_path, "bzImage", make_bzimage(init_size=32 * MiB))
    with GuestMemory(16 * MiB) as small:
        with pytest.raises(BootError, match="give the guest more memory"):
            load_linux(small, k, cmdline="")


def test_pvh_entry_for_bzimage_is_refused(mem, tmp_path):
    k = write(tmp_path, "bzImage", make_bzimage())
    with pytest.raises(BootError, match="no PVH entry"):
        load_linux(mem, k, cmdline="", entry="pvh")


# -- vmlinux ----------------------------------------------------------------------

def test_vmlinux_segments_loaded_at_paddr_with_bss_zeroed(mem, tmp_path):
    mem.fill(VMLINUX_DATA_PADDR, len(DATA) + 0x2000, 0xAA)
    k = write(tmp_path, "vmlinux", make_vmlinux())
    entry = load_linux(mem, k, cmdline="console=ttyS0")
    assert mem.read(VMLINUX_TEXT_PADDR, len(TEXT)) == TEXT
    assert mem.read(VMLINUX_DATA_PADDR, len(DATA)) == DATA
    assert mem.read(VMLINUX_DATA_PADDR + len(DATA), 0x2000) == bytes(0x2000)
    assert entry.mode == "linux64"  # "auto" picks the 64-bit entry
    assert entry.rip == VMLINUX_TEXT_PADDR + 0x10
    assert entry.rsi == layout.ZERO_PAGE_ADDR
    assert entry.kernel_range == (VMLINUX_TEXT_PADDR,
                                  VMLINUX_DATA_PADDR + len(DATA) + 0x2000 - VMLINUX_TEXT_PADDR)


def test_vmlinux_boot_params_built_from_scratch(mem, tmp_path):
    k = write(tmp_path, "vmlinux", make_vmlinux())
    rd = write(tmp_path, "initrd", b"R" * 3000)
    entry = load_linux(mem, k, initrd=rd, cmdline="root=/dev/ram0")
    h = read_boot_params(mem).hdr
    assert h.boot_flag == 0xAA55 and h.header == HDRS_MAGIC and h.version == 0x020F
    assert h.type_of_loader == 0xFF
    assert h.loadflags & lib.LOADED_HIGH and h.loadflags & lib.CAN_USE_HEAP
    assert h.kernel_alignment == 0x1000000
    assert h.cmd_line_ptr == layout.CMDLINE_ADDR
    assert (h.ramdisk_image, h.ramdisk_size) == entry.initrd_range
    assert mem.read(entry.initrd_range[0], 3000) == b"R" * 3000
    assert mem.read(layout.CMDLINE_ADDR, 15) == b"root=/dev/ram0\0"


def test_vmlinux_virtual_entry_is_translated_to_physical(mem, tmp_path):
    k = write(tmp_path, "vmlinux", make_vmlinux(entry=KERNEL_VBASE + 0x20))
    assert load_linux(mem, k, cmdline="").rip == VMLINUX_TEXT_PADDR + 0x20


@pytest.mark.parametrize("note_size", [8, 4])
def test_vmlinux_pvh_entry_and_start_info(mem, tmp_path, note_size):
    k = write(tmp_path, "vmlinux", make_vmlinux(note_size=note_size))
    rd = write(tmp_path, "initrd", b"I" * 8192)
    entry = load_linux(mem, k, initrd=rd, cmdline="console=hvc0", entry="pvh")
    assert entry.mode == "pvh" and entry.rip == PVH_ENTRY
    info = read_hvm_start_info(mem, entry.rbx)
    assert info.magic == XEN_HVM_START_MAGIC_VALUE == 0x336EC578
    assert info.version == 1
    assert mem.read(info.cmdline_paddr, 13) == b"console=hvc0\0"
    assert info.nr_modules == 1
    mod = HvmModlistEntry.from_buffer_copy(mem.read(info.modlist_paddr, 32))
    assert (mod.paddr, mod.size) == entry.initrd_range
    size = 24
    memmap = [HvmMemmapTableEntry.from_buffer_copy(mem.read(info.memmap_paddr + i * size, size))
              for i in range(info.memmap_entries)]
    assert [(e.addr, e.size, e.type) for e in memmap] == \
        [(e.addr, e.size, e.type) for e in entry.e820]


def test_pvh_without_xen_note_is_refused(mem, tmp_path):
    k = write(tmp_path, "vmlinux", make_vmlinux(pvh=False))
    with pytest.raises(BootError, match="CONFIG_PVH"):
        load_linux(mem, k, cmdline="", entry="pvh")


def test_non_x86_64_elf_is_refused(mem, tmp_path):
    k = write(tmp_path, "vmlinux32", make_elf([(0x100000, 0x100000, TEXT, len(TEXT))], 0x100000,
                                              elf_class=1, machine=3))
    with pytest.raises(BootError, match="not an x86-64 vmlinux"):
        load_linux(mem, k, cmdline="")


def test_truncated_vmlinux_is_refused(mem, tmp_path):
    image = make_vmlinux()
    k = write(tmp_path, "vmlinux", image[:-2000])
    with pytest.raises(BootError, match="truncated"):
        load_linux(mem, k, cmdline="")


def test_vmlinux_segment_outside_ram_is_refused(mem, tmp_path):
    k = write(tmp_path, "vmlinux", make_elf([(0x8000000, KERNEL_VBASE, TEXT, len(TEXT))],
                                            0x8000000))
    with pytest.raises(BootError, match="outside guest RAM"):
        load_linux(mem, k, cmdline="")


def test_vmlinux_segment_over_boot_structures_is_refused(mem, tmp_path):
    k = write(tmp_path, "vmlinux", make_elf([(0x7000, 0x7000, TEXT, len(TEXT))], 0x7000))
    with pytest.raises(BootError, match="overlaps kvmpy's boot information"):
        load_linux(mem, k, cmdline="")


def test_vmlinux_segment_over_reserved_range_is_refused(mem, tmp_path):
    k = write(tmp_path, "vmlinux", make_vmlinux())
    with pytest.raises(BootError, match="reserved in the e820 map"):
        load_linux(mem, k, cmdline="", reserved=[(VMLINUX_TEXT_PADDR, 0x1000)])


# -- kernel_info ------------------------------------------------------------------

def test_kernel_info_describes_bzimage(tmp_path):
    k = write(tmp_path, "bzImage", make_bzimage())
    info = kernel_info(k)
    assert info.kind == "bzImage" and info.protocol == "2.15"
    assert info.version == "6.1.0-kvmpy-test (test@host) #1"
    assert info.relocatable and info.pref_address == 0x1000000
    assert info.entries == ("linux64",)


def test_kernel_info_describes_vmlinux_entries(tmp_path):
    assert kernel_info(write(tmp_path, "a", make_vmlinux())).entries == ("linux64", "pvh")
    info = kernel_info(write(tmp_path, "b", make_vmlinux(pvh=False)))
    assert info.kind == "vmlinux" and info.entries == ("linux64",)


def test_kernel_info_rejects_unknown_file(tmp_path):
    with pytest.raises(BootError, match="first bytes are 00 01 02"):
        kernel_info(write(tmp_path, "x", bytes(range(64))))


# -- the project's real kernel, when built -------------------------------------------

# Where the guest build leaves its kernels: the installed copy, or the build tree.
_KERNEL_GLOBS = {
    "bzImage": ["~/.cache/kvmpy/kernel-*/bzImage",
                "~/.cache/kvmpy/linux-build/*/arch/x86/boot/bzImage"],
    "vmlinux": ["~/.cache/kvmpy/kernel-*/vmlinux", "~/.cache/kvmpy/linux-build/*/vmlinux"],
}


def _real_kernels(name: str) -> list[str]:
    found: list[str] = []
    for pattern in _KERNEL_GLOBS[name]:
        found += sorted(glob.glob(os.path.expanduser(pattern)))
    return found


@pytest.mark.skipif(not _real_kernels("bzImage"),
                    reason="no ~/.cache/kvmpy/kernel-*/bzImage yet (built by the guest build)")
def test_real_bzimage_loads_with_its_header():
    path = Path(_real_kernels("bzImage")[0])
    with GuestMemory(256 * MiB) as m:
        entry = load_linux(m, path, cmdline="console=ttyS0 nopv")
        h = read_boot_params(m).hdr
        assert h.header == HDRS_MAGIC and h.version >= 0x020C
        assert h.xloadflags & lib.XLF_KERNEL_64
        assert h.type_of_loader == 0xFF and h.cmd_line_ptr == layout.CMDLINE_ADDR
        assert entry.rip == h.code32_start + 0x200
        assert kernel_info(path).kind == "bzImage"


@pytest.mark.skipif(not _real_kernels("vmlinux"),
                    reason="no ~/.cache/kvmpy/kernel-*/vmlinux yet (built by the guest build)")
def test_real_vmlinux_entry_is_physical_startup_64():
    path = Path(_real_kernels("vmlinux")[0])
    with GuestMemory(256 * MiB) as m:
        entry: BootEntry = load_linux(m, path, cmdline="console=ttyS0")
        start, size = entry.kernel_range
        assert start <= entry.rip < start + size  # physical, inside the loaded image
        assert entry.rip < 1 << 32
        info = kernel_info(path)
        if "pvh" in info.entries:
            with GuestMemory(256 * MiB) as m2:
                pvh = load_linux(m2, path, cmdline="console=ttyS0", entry="pvh")
                assert start <= pvh.rip < start + size


# -- the e820 map -------------------------------------------------------------------

_page = st.integers(min_value=0, max_value=0x3000).map(lambda n: n * 0x1000)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_page, st.integers(min_value=1, max_value=64).map(lambda n: n * 0x1000)),
                max_size=6))
def test_e820_map_is_sorted_disjoint_and_keeps_reserved_out_of_ram(reserved):
    ram = [(0, 0x2000000)]
    entries = layout.e820_map(ram, reserved)
    for a, b in zip(entries, entries[1:]):
        assert a.end <= b.addr  # sorted, no overlaps
    holes = reserved + [(0x9FC00, 0x100000 - 0x9FC00)]
    for e in entries:
        if e.type == layout.E820_RAM:
            assert all(e.end <= g or g + s <= e.addr for g, s in holes)
    # Every RAM byte outside the holes is still RAM.
    covered = sum(e.size for e in entries if e.type == layout.E820_RAM)
    hole_bytes = set()
    for g, s in holes:
        hole_bytes.update(range(max(g, 0) >> 10, min(g + s, 0x2000000) >> 10))
    assert covered == 0x2000000 - len(hole_bytes) * 1024
