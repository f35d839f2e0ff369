"""Multiboot (version 1) loader, as in the Multiboot Specification 0.6.96.

Finds the multiboot header, loads the image (a.out-kludge address fields or
ELF program headers), places the modules page aligned after the kernel, and
writes the multiboot information structure: command line, modules, memory
map, mem_lower/mem_upper and the boot loader name. The upstream
kvm-unit-tests x86 `*.flat` binaries are this kind of kernel (ELF32 with one
module, the environment file).

The information structures have no system header, so they are packed with
`struct` from the specification's field tables (section 3.1.1 "The layout of
Multiboot header", 3.3 "Boot information format").
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import BootError
from ..memory import GuestMemory
from . import layout
from .layout import E820Entry, align_up, e820_map, in_usable_ram
from .elf import ELF_MAGIC, ELFCLASS32, ELFCLASS64, EM_386, EM_X86_64, load_elf_segments, parse_elf
from .entry import BootEntry

MULTIBOOT_HEADER_MAGIC = 0x1BADB002
MULTIBOOT_BOOTLOADER_MAGIC = 0x2BADB002  # in EAX at entry
MULTIBOOT_SEARCH = 8192  # the header lies in the first 8192 bytes, 32-bit aligned

# Header flags (3.1.2). Bits 0-15 are requirements: a loader that does not
# understand one must refuse the kernel.
MB_PAGE_ALIGN = 1 << 0  # modules page aligned: kvmpy always does it
MB_MEMORY_INFO = 1 << 1  # mem_* and mmap_*: kvmpy always provides them
MB_VIDEO_MODE = 1 << 2  # a graphics mode: kvmpy has no display
MB_AOUT_KLUDGE = 1 << 16  # the address fields of the header are valid
MB_SUPPORTED_REQUIRED = MB_PAGE_ALIGN | MB_MEMORY_INFO

# Information structure flags (3.3).
MBI_MEMORY = 1 << 0
MBI_CMDLINE = 1 << 2
MBI_MODS = 1 << 3
MBI_MEM_MAP = 1 << 6
MBI_BOOT_LOADER_NAME = 1 << 9

BOOT_LOADER_NAME = "kvmpy"

# struct multiboot_info (3.3), up to vbe_interface_len: 88 bytes.
#   flags mem_lower mem_upper boot_device cmdline mods_count mods_addr
#   syms[4] mmap_length mmap_addr drives_length drives_addr config_table
#   boot_loader_name apm_table vbe_control_info vbe_mode_info
#   vbe_mode vbe_interface_seg vbe_interface_off vbe_interface_len
_INFO = struct.Struct("<7I4I2I2I4II4H")
# A module entry: mod_start mod_end string reserved.
_MODULE = struct.Struct("<4I")
# A memory map entry: size (of the rest: 20) base_addr length type.
_MMAP = struct.Struct("<IQQI")
_HEADER = struct.Struct("<3I5I")  # magic flags checksum + the a.out address fields

# Where the pieces go in the boot information page (layout.BOOT_INFO_ADDR).
INFO_ADDR = layout.BOOT_INFO_ADDR
MODULES_ADDR = INFO_ADDR + 0x80
MMAP_ADDR = INFO_ADDR + 0x400
MAX_MODULES = (MMAP_ADDR - MODULES_ADDR) // _MODULE.size
MAX_MMAP = (layout.BOOT_INFO_SIZE - (MMAP_ADDR - INFO_ADDR)) // _MMAP.size

assert _INFO.size == 88 and _MODULE.size == 16 and _MMAP.size == 24


@dataclass(frozen=True)
class MultibootHeader:
    """The multiboot header found in a kernel file (3.1.1)."""

    offset: int  # file offset of the magic
    flags: int
    header_addr: int = 0
    load_addr: int = 0
    load_end_addr: int = 0
    bss_end_addr: int = 0
    entry_addr: int = 0

    @property
    def has_address_fields(self) -> bool:
        return bool(self.flags & MB_AOUT_KLUDGE)


def _scan(data: bytes | memoryview) -> tuple[MultibootHeader | None, int | None]:
    """(valid header or None, offset of a magic with a bad checksum or None)."""
    data = memoryview(data)
    bad: int | None = None
    limit = min(len(data), MULTIBOOT_SEARCH) - 12
    for off in range(0, limit + 1, 4):
        magic, flags, checksum = struct.unpack_from("<3I", data, off)
        if magic != MULTIBOOT_HEADER_MAGIC:
            continue
        if (magic + flags + checksum) & 0xFFFF_FFFF:
            if bad is None:
                bad = off
            continue
        fields = (0, 0, 0, 0, 0)
        if flags & MB_AOUT_KLUDGE:
            if off + _HEADER.size > len(data):
                raise BootError(
                    f"truncated multiboot header at offset {off:#x}: the address fields "
                    f"need {off + _HEADER.size} bytes, the file has {len(data)}")
            fields = _HEADER.unpack_from(data, off)[3:]
        return MultibootHeader(off, flags, *fields), bad
    return None, bad


def find_multiboot_header(data: bytes | memoryview) -> MultibootHeader | None:
    """The multiboot header in the first 8192 bytes, or None if there is no valid one."""
    try:
        return _scan(data)[0]
    except BootError:
        return None


@dataclass(frozen=True)
class Module:
    """A loaded multiboot module: where it went and its string."""

    path: Path
    string: str
    gpa: int
    size: int


def load_multiboot(mem: GuestMemory, kernel: Path | str, *, cmdline: str = "",
                   modules: Sequence[tuple[Path | str, str]] = (),
                   reserved: Iterable[tuple[int, int]] = (),
                   cmdline_progname: bool = True, data: bytes | None = None) -> BootEntry:
    """Load a multiboot v1 kernel and its modules into `mem`; return how to start it.

    modules: (path, string) pairs, placed page aligned after the kernel in this
    order. With `cmdline_progname` the command line starts with the kernel's
    path, as GRUB and QEMU pass it (kvm-unit-tests take it as argv[0]).
    `data`: the file's bytes when the caller has read them already.
    """
    kernel = Path(kernel)
    try:
        view = memoryview(data if data is not None else kernel.read_bytes())
    except OSError as e:
        raise BootError(f"kernel {kernel}: cannot read: {e.strerror}") from e
    data = view
    header, bad = _scan(data)
    if header is None:
        if bad is not None:
            raise BootError(
                f"{kernel}: multiboot header at offset {bad:#x} has a bad checksum "
                "(magic + flags + checksum must be 0 mod 2^32)")
        raise BootError(
            f"{kernel}: no multiboot header (magic {MULTIBOOT_HEADER_MAGIC:#x}) in the first "
            f"{MULTIBOOT_SEARCH} bytes; the first bytes are {bytes(data[:8]).hex(' ')}")
    unsupported = header.flags & 0xFFFF & ~MB_SUPPORTED_REQUIRED
    if unsupported:
        what = "a video mode (bit 2)" if unsupported & MB_VIDEO_MODE else f"{unsupported:#x}"
        raise BootError(
            f"{kernel}: multiboot header requires {what}, which kvmpy cannot provide")

    if not mem.is_ram(0, layout.HIGH_MEMORY_ADDR):
        raise BootError(
            "guest memory does not cover the first MiB, which holds the boot structures")
    e820 = e820_map(mem.ram_ranges(), reserved)
    if len(e820) > MAX_MMAP:
        raise BootError(f"the memory map has {len(e820)} entries; kvmpy's page holds {MAX_MMAP}")

    # -- the kernel image: check everything, then write
    if header.has_address_fields:
        k_start, k_end, entry = _load_aout_kludge(mem, data, header, kernel, e820)
    else:
        if bytes(data[:4]) != ELF_MAGIC:
            raise BootError(
                f"{kernel}: multiboot header at {header.offset:#x} has no address fields "
                "(flag bit 16) and the file is not ELF, so kvmpy cannot tell where to load it")
        image = parse_elf(data, str(kernel))
        if (image.elf_class, image.machine) not in ((ELFCLASS32, EM_386),
                                                    (ELFCLASS64, EM_X86_64)):
            raise BootError(
                f"{kernel}: ELF class {image.elf_class}, machine {image.machine} is not x86")
        if image.entry >= 1 << 32:
            raise BootError(f"{kernel}: entry point {image.entry:#x} is above 4 GiB")
        k_start, size = load_elf_segments(mem, data, image, str(kernel), e820, layout.MULTIBOOT_STRUCTURES)
        k_end = k_start + size
        entry = image.entry

    # -- modules, page aligned after the kernel
    if len(modules) > MAX_MODULES:
        raise BootError(f"{len(modules)} multiboot modules; kvmpy passes at most {MAX_MODULES}")
    placed: list[Module] = []
    next_addr = align_up(k_end, layout.PAGE_SIZE)
    for path, string in modules:
        path = Path(path)
        try:
            size = os.stat(path).st_size
        except OSError as e:
            raise BootError(f"multiboot module {path}: cannot read: {e.strerror}") from e
        if not in_usable_ram(e820, next_addr, max(size, 1)):
            raise BootError(
                f"multiboot module {path} ({size} bytes) does not fit in guest RAM at "
                f"{next_addr:#x} after the kernel (ends {k_end:#x}); give the guest more memory")
        placed.append(Module(path, string, next_addr, size))
        next_addr = align_up(next_addr + size, layout.PAGE_SIZE)

    # -- strings: command line, boot loader name, module strings
    full_cmdline = f"{kernel} {cmdline}".rstrip() if cmdline_progname else cmdline
    strings = bytearray()

    def add_string(text: str, what: str) -> int:
        raw = text.encode("utf-8")
        if b"\0" in raw:
            raise BootError(f"{what} contains a NUL byte")
        addr = layout.CMDLINE_ADDR + len(strings)
        strings.extend(raw + b"\0")
        if len(strings) > layout.CMDLINE_MAX_SIZE:
            raise BootError(
                f"command line and module strings take {len(strings)} bytes; "
                f"kvmpy has room for {layout.CMDLINE_MAX_SIZE}")
        return addr

    cmdline_addr = add_string(full_cmdline, "kernel command line")
    name_addr = add_string(BOOT_LOADER_NAME, "boot loader name")
    module_string_addrs = [add_string(m.string, f"module string of {m.path}") for m in placed]

    # -- write (all checks passed)
    for m in placed:
        if m.size:
            mem.load_file(m.gpa, m.path)
    mem.write(layout.CMDLINE_ADDR, bytes(strings))
    mem.write(MODULES_ADDR, b"".join(
        _MODULE.pack(m.gpa, m.gpa + m.size, s, 0) for m, s in zip(placed, module_string_addrs)))
    mmap = b"".join(_MMAP.pack(_MMAP.size - 4, e.addr, e.size, e.type) for e in e820)
    mem.write(MMAP_ADDR, mmap)
    mem_lower, mem_upper = _mem_lower_upper(e820)
    flags = MBI_MEMORY | MBI_CMDLINE | MBI_MODS | MBI_MEM_MAP | MBI_BOOT_LOADER_NAME
    info = _INFO.pack(
        flags, mem_lower, mem_upper, 0, cmdline_addr, len(placed), MODULES_ADDR,
        0, 0, 0, 0,  # syms
        len(mmap), MMAP_ADDR,
        0, 0,  # drives
        0, name_addr, 0, 0,  # config_table, boot_loader_name, apm_table, vbe_control_info
        0, 0, 0, 0, 0)  # vbe_mode_info, vbe_mode, vbe_interface_seg/off/len
    mem.write(INFO_ADDR, info)

    initrd_range = None
    if placed:
        initrd_range = (placed[0].gpa, next_addr - placed[0].gpa)
    return BootEntry(mode="multiboot", rip=entry, rax=MULTIBOOT_BOOTLOADER_MAGIC, rbx=INFO_ADDR,
                     kernel_range=(k_start, k_end - k_start), initrd_range=initrd_range,
                     e820=e820, cmdline_addr=cmdline_addr)


def _load_aout_kludge(mem: GuestMemory, data: memoryview, h: MultibootHeader, kernel: Path,
                      e820: list[E820Entry]) -> tuple[int, int, int]:
    """Load by the header's address fields (3.1.3); returns (start, end incl. bss, entry)."""
    if h.load_addr > h.header_addr:
        raise BootError(
            f"{kernel}: multiboot load_addr {h.load_addr:#x} is above header_addr "
            f"{h.header_addr:#x}")
    file_start = h.offset - (h.header_addr - h.load_addr)
    if file_start < 0:
        raise BootError(
            f"{kernel}: multiboot header_addr - load_addr ({h.header_addr - h.load_addr:#x}) "
            f"reaches before the start of the file (header at offset {h.offset:#x})")
    if h.load_end_addr:
        if h.load_end_addr < h.load_addr:
            raise BootError(f"{kernel}: multiboot load_end_addr is below load_addr")
        size = h.load_end_addr - h.load_addr
        if file_start + size > len(data):
            raise BootError(
                f"{kernel}: truncated: the multiboot header loads {size} bytes from offset "
                f"{file_start:#x}, the file has {len(data)} bytes")
    else:
        size = len(data) - file_start  # 0 means "to the end of the file"
    end = h.load_addr + size
    bss_end = h.bss_end_addr or end
    if bss_end < end:
        raise BootError(f"{kernel}: multiboot bss_end_addr {bss_end:#x} is below the load end {end:#x}")
    if not in_usable_ram(e820, h.load_addr, bss_end - h.load_addr):
        raise BootError(
            f"{kernel}: image [{h.load_addr:#x}, {bss_end:#x}) is outside usable guest RAM "
            f"({mem.size >> 20} MiB); give the guest more memory")
    layout.check_clear_of_boot_structures(f"{kernel}: image", h.load_addr, bss_end - h.load_addr,
                                          layout.MULTIBOOT_STRUCTURES)
    if not h.load_addr <= h.entry_addr < bss_end:
        raise BootError(
            f"{kernel}: multiboot entry_addr {h.entry_addr:#x} is outside the loaded image "
            f"[{h.load_addr:#x}, {bss_end:#x})")
    mem.write(h.load_addr, data[file_start:file_start + size])
    if bss_end > end:
        mem.fill(end, bss_end - end)
    return h.load_addr, bss_end, h.entry_addr


def _mem_lower_upper(e820: list[E820Entry]) -> tuple[int, int]:
    """KiB of RAM from 0 and from 1 MiB up to the first hole (3.3 mem_lower/mem_upper)."""
    lower = upper = 0
    for e in e820:
        if e.type != layout.E820_RAM:
            continue
        if e.addr == 0:
            lower = min(e.end, 640 << 10) >> 10
        if e.addr <= layout.HIGH_MEMORY_ADDR < e.end:
            upper = (e.end - layout.HIGH_MEMORY_ADDR) >> 10
    return lower, upper
