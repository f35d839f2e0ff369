"""kvmpy.boot.multiboot: tiny multiboot kernels assembled with the system binutils."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]



from kvmpy.boot.linux import kernel_info, parse_elf
from kvmpy.boot.multiboot import (INFO_ADDR, MULTIBOOT_BOOTLOADER_MAGIC,
                                  load_multiboot)
from kvmpy.errors import BootError
from kvmpy.memory import GuestMemory

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("as", "ld", "nm", "objcopy")),
    reason="needs binutils (as, ld, nm, objcopy) to assemble the test kernels")

MiB = 1 << 20
LOAD = 0x400000  # where kvm-unit-tests link their x86 tests

HEADER_ELF = """
    .section .multiboot, "a"
    .align 4
    .long 0x1BADB002
    .long {flags}
    .long -(0x1BADB002 + {flags}) + {checksum_delta}
"""

BODY_32 = """
    .text
    .code32
    .globl _start
_start:
    mov $0x1234, %eax
    hlt
    jmp _start
    .data
msg: .ascii "multiboot data section"
    .bss
    .align 16
stack: .skip 8192
"""

LDSCRIPT = """
ENTRY(_start)
SECTIONS {{
    . = {base:#x};
    .text : {{ *(.multiboot) *(.text) }}
    . = ALIGN(4096);
    .data : {{ *(.data) }}
    .bss : {{ *(.bss) *(COMMON) }}
    _end = .;
}}
"""


def build_elf32(tmp_path: Path, *, base: int = LOAD, flags: int = 0, checksum_delta: int = 0,
                sixty_four: bool = False, name: str = "kernel") -> Path:
    """Assemble and link a multiboot ELF kernel; returns its path."""
    src = tmp_path / f"{name}.S"
    body = BODY_32
    if sixty_four:
        # kvm-unit-tests style: 64-bit objects linked, then converted to ELF32.
        body = body.replace(".code32", ".code64").replace("mov $0x1234, %eax",
                                                          "mov $0x1234, %rax")
    src.write_text(HEADER_ELF.format(flags=flags, checksum_delta=checksum_delta) + body)
    obj, lds, out = tmp_path / f"{name}.o", tmp_path / f"{name}.ld", tmp_path / name
    lds.write_text(LDSCRIPT.format(base=base))
    if sixty_four:
        subprocess.run(["as", "--64", "-o", obj, src], check=True)
        subprocess.run(["ld", "-m", "elf_x86_64", "-T", lds, "-o", f"{out}.64", obj], check=True)
        subprocess.run(["objcopy", "-O", "elf32-i386", f"{out}.64", out], check=True)
    else:
        subprocess.run(["as", "--32", "-o", obj, src], check=True)
        subprocess.run(["ld", "-m", "elf_i386", "-T", lds, "-o", out, obj], check=True)
    return out


def symbol(path: Path, name: str) -> int:
    out = subprocess.run(["nm", path], check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if parts[-1] == name:
            return int(parts[0], 16)
    raise KeyError(name)


AOUT = """
    .code32
    .globl _start
    .set BASE, {base:#x}
_start:
    jmp entry
    .align 4
header:
    .long 0x1BADB002
    .long 0x00010000
    .long -(0x1BADB002 + 0x00010000)
    .long BASE + (header - _start)       /* header_addr */
    .long BASE                            /* load_addr */
    .long {load_end}                      /* load_end_addr */
    .long BASE + (bss_end - _start)       /* bss_end_addr */
    .long BASE + (entry - _start)         /* entry_addr */
entry:
    hlt
    .ascii "aout-kludge image"
    .align 16
data_end:
    .skip 4096
bss_end:
"""


def build_aout(tmp_path: Path, *, base: int = 0x200000, load_end: str = "BASE + (data_end - _start)",
               truncate: int = 0) -> Path:
    """A flat binary with the multiboot a.out-kludge address fields (flag bit 16)."""
    src, obj, out = tmp_path / "aout.S", tmp_path / "aout.o", tmp_path / "aout.bin"
    src.write_text(AOUT.format(base=base, load_end=load_end))
    subprocess.run(["as", "--32", "-o", obj, src], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext", hex(base), "--oformat", "binary",
                    "-o", out, obj], check=True)
    if truncate:
        data = out.read_bytes()
        out.write_bytes(data[:len(data) - truncate])
    return out


@pytest.fixture
def mem():
    with GuestMemory(64 * MiB) as m:
        yield m


def read_cstr(mem: GuestMemory, gpa: int) -> bytes:
    return mem.read(gpa, 256).split(b"\0", 1)[0]


def info_fields(mem: GuestMemory) -> dict[str, int]:
    names = ["flags", "mem_lower", "mem_upper", "boot_device", "cmdline", "mods_count",
             "mods_addr", "s0", "s1", "s2", "s3", "mmap_length", "mmap_addr", "drives_length",
             "drives_addr", "config_table", "boot_loader_name"]
    return dict(zip(names, struct.unpack("<17I", mem.read(INFO_ADDR, 68))))


# -- ELF kernels ------------------------------------------------------------------

def test_elf32_segments_loaded_at_paddr_and_bss_zeroed(mem, tmp_path):
    k = build_elf32(tmp_path)
    data = k.read_bytes()
    image = parse_elf(data, str(k))
    end = symbol(k, "_end")
    mem.fill(LOAD, end - LOAD, 0xAA)
    entry = load_multiboot(mem, k)
    for seg in image.loads:
        assert mem.read(seg.paddr, seg.filesz) == data[seg.offset:seg.offset + seg.filesz]
        bss = seg.memsz - seg.filesz
        assert mem.read(seg.paddr + seg.filesz, bss) == bytes(bss)
    assert entry.mode == "multiboot"
    assert entry.rip == symbol(k, "_start")
    assert entry.rax == MULTIBOOT_BOOTLOADER_MAGIC == 0x2BADB002
    assert entry.rbx == INFO_ADDR
    assert entry.kernel_range == (LOAD, end - LOAD)


def test_module_placed_page_aligned_after_kernel_with_its_string(mem, tmp_path):
    k = build_elf32(tmp_path)
    env = tmp_path / "env"
    env.write_bytes(b"TESTNAME=smoke\nBOOTLOADER=1\n")
    entry = load_multiboot(mem, k, cmdline="-smp 1 arg", modules=[(env, "environ")])
    f = info_fields(mem)
    assert f["mods_count"] == 1
    start, mod_end, string, _ = struct.unpack("<4I", mem.read(f["mods_addr"], 16))
    kernel_end = symbol(k, "_end")
    assert start % 4096 == 0 and kernel_end <= start < kernel_end + 4096
    assert mod_end - start == env.stat().st_size
    assert mem.read(start, mod_end - start) == env.read_bytes()
    assert read_cstr(mem, string) == b"environ"
    assert entry.initrd_range[0] == start


def test_cmdline_starts_with_kernel_path_like_grub_and_qemu(mem, tmp_path):
    k = build_elf32(tmp_path)
    load_multiboot(mem, k, cmdline="-smp 1 arg")
    f = info_fields(mem)
    assert f["flags"] & (1 << 2)
    assert read_cstr(mem, f["cmdline"]) == f"{k} -smp 1 arg".encode()
    load_multiboot(mem, k, cmdline="plain", cmdline_progname=False)
    assert read_cstr(mem, info_fields(mem)["cmdline"]) == b"plain"


def test_memory_map_entries_with_size_field_and_mem_lower_upper(mem, tmp_path):
    k = build_elf32(tmp_path)
    entry = load_multiboot(mem, k, reserved=[(0x9D000, 0x1000)])
    f = info_fields(mem)
    assert f["flags"] & 1 and f["flags"] & (1 << 6)
    raw = mem.read(f["mmap_addr"], f["mmap_length"])
    entries, pos = [], 0
    while pos < len(raw):
        size, base, length, typ = struct.unpack_from("<IQQI", raw, pos)
        assert size == 20  # the size of the rest of the entry
        entries.append((base, length, typ))
        pos += size + 4
    assert entries == [(e.addr, e.size, e.type) for e in entry.e820]
    assert (0x9D000, 0x1000, 2) in entries
    assert f["mem_lower"] == 0x9D000 >> 10
    assert f["mem_upper"] == (64 * MiB - MiB) >> 10


def test_boot_loader_name_is_kvmpy(mem, tmp_path):
    load_multiboot(mem, build_elf32(tmp_path))
    f = info_fields(mem)
    assert f["flags"] & (1 << 9)
    assert read_cstr(mem, f["boot_loader_name"]) == b"kvmpy"


def test_kvm_unit_tests_style_elf32_from_64bit_code(mem, tmp_path):
    # x86_64 kvm-unit-tests: 64-bit code in an ELF32 (objcopy -O elf32-i386),
    # one module (the environment) and a command line.
    k = build_elf32(tmp_path, sixty_four=True)
    env = tmp_path / "env"
    env.write_bytes(b"KEY=value\n")
    entry = load_multiboot(mem, k, cmdline="-v", modules=[(env, "")])
    assert entry.rip == symbol(k, "_start")
    f = info_fields(mem)
    assert f["mods_count"] == 1
    start, end, _, _ = struct.unpack("<4I", mem.read(f["mods_addr"], 16))
    assert mem.read(start, end - start) == b"KEY=value\n"
    assert kernel_info(k).kind == "multiboot"


def test_several_modules_in_order_page_aligned(mem, tmp_path):
    k = build_elf32(tmp_path)
    mods = []
    for i, size in enumerate((5000, 1, 4096)):
        p = tmp_path / f"m{i}"
        p.write_bytes(bytes([i + 1]) * size)
        mods.append((p, f"mod{i}"))
    load_multiboot(mem, k, modules=mods)
    f = info_fields(mem)
    assert f["mods_count"] == 3
    prev_end = symbol(k, "_end")
    for i, (p, s) in enumerate(mods):
        start, end, string, _ = struct.unpack("<4I", mem.read(f["mods_addr"] + 16 * i, 16))
        assert start % 4096 == 0 and start >= prev_end
        assert mem.read(start, end - start) == p.read_bytes()
        assert read_cstr(mem, string) == s.encode()
        prev_end = end


# -- a.out kludge -----------------------------------------------------------------

def test_aout_kludge_loads_by_address_fields(mem, tmp_path):
    k = build_aout(tmp_path)
    data = k.read_bytes()
    mem.fill(0x200000, len(data) + 8192, 0xAA)
    entry = load_multiboot(mem, k)
    start, size = entry.kernel_range
    assert start == 0x200000
    loaded = data[:data.index(b"aout-kludge image") + 17]
    assert mem.read(0x200000, len(loaded)) == loaded
    # load_end .. bss_end is zeroed, even though the flat file has that range too.
    assert mem.read(start + size - 4096, 4096) == bytes(4096)
    assert mem.read(entry.rip, 1) == b"\xf4"  # entry_addr points at the hlt


def test_aout_kludge_load_end_zero_means_whole_file(mem, tmp_path):
    k = build_aout(tmp_path, load_end="0")
    entry = load_multiboot(mem, k)
    data = k.read_bytes()
    assert mem.read(0x200000, len(data) - 4096) == data[:-4096]
    assert entry.kernel_range[0] == 0x200000


def test_truncated_aout_image_is_refused(mem, tmp_path):
    k = build_aout(tmp_path, load_end="BASE + (bss_end - _start)", truncate=100)
    with pytest.raises(BootError, match="truncated"):
        load_multiboot(mem, k)


# -- errors ----------------------------------------------------------------------

def test_file_without_header_is_refused(mem, tmp_path):
    k = tmp_path / "nothing"
    k.write_bytes(b"\x90" * 9000)
    with pytest.raises(BootError, match="no multiboot header.*90 90 90"):
        load_multiboot(mem, k)


def test_bad_checksum_is_refused(mem, tmp_path):
    k = build_elf32(tmp_path, checksum_delta=1)
    with pytest.raises(BootError, match="bad checksum"):
        load_multiboot(mem, k)


def test_video_mode_requirement_is_refused(mem, tmp_path):
    k = build_elf32(tmp_path, flags=4)
    with pytest.raises(BootError, match="video mode"):
        load_multiboot(mem, k)


def test_kernel_outside_ram_is_refused(tmp_path):
    k = build_elf32(tmp_path, base=0x2000000)
    with GuestMemory(16 * MiB) as small:
        with pytest.raises(BootError, match="outside guest RAM"):
            load_multiboot(small, k)


def test_kernel_overlapping_boot_structures_is_refused(mem, tmp_path):
    k = build_elf32(tmp_path, base=0x20000)
    with pytest.raises(BootError, match="overlaps kvmpy's command line"):
        load_multiboot(mem, k)


def test_kernel_in_low_memory_where_long_mode_tables_would_be_is_loaded(mem, tmp_path):
    # A multiboot kernel starts without paging: kvmpy's page tables at 0x9000 are not in use,
    # and kvm-unit-tests' realmode.flat is linked at 0x8000.
    k = build_elf32(tmp_path, base=0x8000)
    entry = load_multiboot(mem, k)
    assert entry.kernel_range[0] == 0x8000
    assert mem.read(0x8000, 16) == k.read_bytes()[parse_elf(k.read_bytes(), str(k)).loads[0].offset:][:16]


def test_kernel_over_the_ivt_is_refused(mem, tmp_path):
    k = build_elf32(tmp_path, base=0x100)
    with pytest.raises(BootError, match="overlaps kvmpy's real-mode IVT"):
        load_multiboot(mem, k)


def test_what_a_multiboot_kernel_may_not_overlap():
    from kvmpy.boot import layout

    for gpa, what in ((0x3FF, "real-mode IVT"), (0x540, "GDT"), (0x7800, "boot information"),
                      (0x20100, "command line"), (0x9FC00, "EBDA")):
        with pytest.raises(BootError, match=f"overlaps kvmpy's {what}"):
            layout.check_clear_of_boot_structures("k", gpa, 1, layout.MULTIBOOT_STRUCTURES)
    for gpa in (0x1000, 0x2000, 0x8000, 0x9000, 0xE000):  # IDT, TSS, page tables: not a multiboot kernel's
        layout.check_clear_of_boot_structures("k", gpa, 0x800, layout.MULTIBOOT_STRUCTURES)


def test_module_not_fitting_in_ram_is_refused(tmp_path):
    k = build_elf32(tmp_path)
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(20 * MiB)
    with GuestMemory(16 * MiB) as small:
        with pytest.raises(BootError, match="module .* does not fit"):
            load_multiboot(small, k, modules=[(big, "big")])
