"""Loading a Linux x86-64 kernel into guest memory: bzImage, ELF vmlinux, PVH.

Follows the Linux x86 boot protocol (Documentation/arch/x86/boot.rst), in its
"64-bit Boot Protocol" form: kvmpy never runs the real-mode setup code, it
fills `struct boot_params` (the zero page) itself and starts the vCPU in long
mode at the 64-bit entry point with RSI pointing at it. For an ELF vmlinux
that has the Xen PVH note, the PVH entry (32-bit protected mode, EBX pointing
at `struct hvm_start_info`) is the alternative.

Everything here only writes into a `GuestMemory` and checks the input first:
a kernel that cannot boot raises `BootError` before any VM exists.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

from ..errors import BootError
from ..memory import GuestMemory
from . import layout
from .elf import (ELF_MAGIC, ELFCLASS32, ELFCLASS64, EM_X86_64, ElfImage, _check_in_ram, _ram_text,
                  load_elf_segments, parse_elf, pvh_entry_point)
from .entry import BootEntry
from .layout import E820Entry, align_down, align_up, e820_map, in_usable_ram
from .multiboot import find_multiboot_header

try:
    from ._bootparam import ffi, lib
except ImportError as e:  # pragma: no cover - depends on the build step
    raise ImportError(
        "kvmpy.boot._bootparam (the cffi module for <asm/bootparam.h>) is not built: "
        "run `pip install -e .` (or `make venv`) in the "
        "repository root") from e


# The setup header's magic and the boot sector signature (boot.rst, "The
# Real-Mode Kernel Header").
HDRS_MAGIC = int.from_bytes(b"HdrS", "little")
BOOT_FLAG = 0xAA55
# 2.12 introduced xloadflags and with it XLF_KERNEL_64, the promise of the
# 64-bit entry point at load address + 0x200.
MIN_BOOT_PROTOCOL = 0x020C
# The version kvmpy claims in a boot_params it builds for a vmlinux.
VMLINUX_BOOT_PROTOCOL = 0x020F
ENTRY_64_OFFSET = 0x200
TYPE_OF_LOADER_UNDEFINED = 0xFF  # boot.rst: "0xFF = undefined" -- no registered loader ID
# boot.rst's sample loader: heap_end = 0xe000, heap_end_ptr = heap_end - 0x200.
HEAP_END_PTR = 0xE000 - 0x200
# Protocol <= 2.02 maximum, the documented default when a header does not say.
DEFAULT_INITRD_ADDR_MAX = 0x37FFFFFF
# x86-64 kernels' header.S value; used for a vmlinux, which has no header.
VMLINUX_INITRD_ADDR_MAX = 0x7FFFFFFF
# x86 COMMAND_LINE_SIZE (2048) minus the NUL: the header's cmdline_size of
# every x86-64 kernel; used for a vmlinux.
VMLINUX_CMDLINE_SIZE = 2047
# CONFIG_PHYSICAL_ALIGN's default: what a vmlinux boot_params claims.
VMLINUX_KERNEL_ALIGNMENT = 0x1000000
DEFAULT_KERNEL_ALIGNMENT = 0x200000

# -- PVH start info ------------------------------------------------------------
# Xen's public/arch-x86/hvm/start_info.h. Not in any system header, so it is
# declared here with ctypes, field by field as that header lists it; the
# natural C alignment gives the header's documented offsets (checked below).
XEN_HVM_START_MAGIC_VALUE = 0x336EC578
HVM_START_INFO_VERSION = 1


class HvmStartInfo(ctypes.LittleEndianStructure):
    """struct hvm_start_info (version 1): passed to a PVH kernel in EBX."""

    _fields_ = [
        ("magic", ctypes.c_uint32),           # 0: XEN_HVM_START_MAGIC_VALUE
        ("version", ctypes.c_uint32),         # 4: 1 (adds the memmap fields)
        ("flags", ctypes.c_uint32),           # 8: SIF_xxx flags
        ("nr_modules", ctypes.c_uint32),      # 12: entries at modlist_paddr
        ("modlist_paddr", ctypes.c_uint64),   # 16: array of hvm_modlist_entry
        ("cmdline_paddr", ctypes.c_uint64),   # 24: NUL-terminated command line
        ("rsdp_paddr", ctypes.c_uint64),      # 32: ACPI RSDP, 0 = none
        ("memmap_paddr", ctypes.c_uint64),    # 40: array of hvm_memmap_table_entry
        ("memmap_entries", ctypes.c_uint32),  # 48: entries in the memory map
        ("reserved", ctypes.c_uint32),        # 52: must be zero
    ]


class HvmModlistEntry(ctypes.LittleEndianStructure):
    """struct hvm_modlist_entry: one module (the first one is the initrd for Linux)."""

    _fields_ = [
        ("paddr", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("cmdline_paddr", ctypes.c_uint64),
        ("reserved", ctypes.c_uint64),
    ]


class HvmMemmapTableEntry(ctypes.LittleEndianStructure):
    """struct hvm_memmap_table_entry: one range of the memory map (e820 types)."""

    _fields_ = [
        ("addr", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("type", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    ]


assert ctypes.sizeof(HvmStartInfo) == 56 and HvmStartInfo.memmap_entries.offset == 48
assert ctypes.sizeof(HvmModlistEntry) == 32 and ctypes.sizeof(HvmMemmapTableEntry) == 24

# Where the PVH pieces go inside the boot information page.
PVH_START_INFO_ADDR = layout.BOOT_INFO_ADDR
PVH_MODLIST_ADDR = layout.BOOT_INFO_ADDR + 0x40
PVH_MEMMAP_ADDR = layout.BOOT_INFO_ADDR + 0x80
PVH_MAX_MEMMAP = (layout.BOOT_INFO_SIZE - 0x80) // ctypes.sizeof(HvmMemmapTableEntry)


# -- results -------------------------------------------------------------------

@dataclass
class KernelInfo:
    """What kind of kernel image a file is (for `kvmpy` CLI reporting)."""

    path: Path
    kind: Literal["bzImage", "vmlinux", "multiboot"]
    size: int
    entries: tuple[str, ...]  # the boot modes it supports, e.g. ("linux64", "pvh")
    protocol: str | None = None  # bzImage boot protocol, e.g. "2.15"
    version: str | None = None  # kernel version string from a bzImage header
    relocatable: bool = False
    pref_address: int | None = None
    init_size: int | None = None
    elf_class: int | None = None
    entry_point: int | None = None
    data: bytes = field(default=b"", repr=False, compare=False)  # the file as read, for the loader


# -- ELF -----------------------------------------------------------------------

# -- bzImage -------------------------------------------------------------------

@dataclass
class _BzImage:
    header: object  # cdata 'struct setup_header *'
    header_len: int  # bytes of the image's setup header to copy into boot_params
    setup_size: int
    payload: memoryview

    @property
    def version(self) -> int:
        return self.header.version


def _setup_header_offset() -> int:
    return ffi.offsetof("struct boot_params", "hdr")


def _is_bzimage(data: bytes | memoryview) -> bool:
    off = _setup_header_offset() + ffi.offsetof("struct setup_header", "header")
    return len(data) >= off + 4 and int.from_bytes(data[off:off + 4], "little") == HDRS_MAGIC


def _parse_bzimage(data: memoryview, name: str) -> _BzImage:
    hdr_off = _setup_header_offset()
    hdr_size = ffi.sizeof("struct setup_header")
    hdr = ffi.new("struct setup_header *")
    avail = min(hdr_size, len(data) - hdr_off)
    ffi.memmove(hdr, data[hdr_off:hdr_off + avail], avail)
    if hdr.boot_flag != BOOT_FLAG:
        raise BootError(f"{name}: bzImage boot_flag is {hdr.boot_flag:#06x}, expected 0xaa55")
    if hdr.version < MIN_BOOT_PROTOCOL:
        raise BootError(
            f"{name}: boot protocol {hdr.version >> 8}.{hdr.version & 0xff:02d} is older than "
            f"2.12; kvmpy needs the 64-bit entry point (XLF_KERNEL_64) of Linux 3.8 or later")
    if not hdr.xloadflags & lib.XLF_KERNEL_64:
        raise BootError(
            f"{name}: a 32-bit kernel (xloadflags has no XLF_KERNEL_64); "
            "kvmpy boots x86-64 kernels only")
    # boot.rst: the header ends at 0x202 + the byte at 0x201 (the jump's offset).
    header_end = 0x202 + data[0x201]
    header_len = min(hdr_size, header_end - hdr_off)
    setup_sects = hdr.setup_sects or 4  # boot.rst: 0 means 4
    setup_size = (setup_sects + 1) * 512
    expected = setup_size + hdr.syssize * 16
    if len(data) < expected or len(data) <= setup_size:
        raise BootError(
            f"{name}: truncated bzImage: the header says {expected} bytes "
            f"({setup_size} of setup + {hdr.syssize * 16} of protected-mode kernel), "
            f"the file has {len(data)}")
    return _BzImage(hdr, header_len, setup_size, data[setup_size:])


def _bzimage_footprint(bz: _BzImage, load: int) -> tuple[int, int]:
    """[start, end) the kernel occupies while decompressing, loaded at `load` (boot.rst init_size)."""
    h = bz.header
    pref = h.pref_address if bz.version >= 0x020A else 0
    if h.relocatable_kernel:
        align = h.kernel_alignment or DEFAULT_KERNEL_ALIGNMENT
        # x86-64's decompressor never runs below LOAD_PHYSICAL_ADDR (= pref_address).
        runtime = max(align_up(load, align), pref)
    else:
        runtime = pref or load
    init_size = h.init_size if bz.version >= 0x020A else 0
    start = min(load, runtime)
    end = max(load + len(bz.payload), runtime + init_size)
    return start, end


def _kernel_version_string(data: memoryview, hdr: object) -> str | None:
    # boot.rst kernel_version: a pointer to a NUL-terminated string, minus 0x200.
    if not hdr.kernel_version:
        return None
    off = hdr.kernel_version + 0x200
    raw = bytes(data[off:off + 256])
    return raw.split(b"\0", 1)[0].decode("ascii", "replace") or None


# -- common pieces ---------------------------------------------------------------

def _encode_cmdline(cmdline: str, limit: int, name: str) -> bytes:
    raw = cmdline.encode("utf-8")
    if b"\0" in raw:
        raise BootError("kernel command line contains a NUL byte")
    limit = min(limit, layout.CMDLINE_MAX_SIZE - 1)
    if len(raw) > limit:
        raise BootError(
            f"kernel command line is {len(raw)} bytes; {name} accepts at most {limit} "
            "(cmdline_size)")
    return raw + b"\0"


def _place_initrd(e820: list[E820Entry], size: int, addr_max: int,
                  kernel: tuple[int, int], path: Path) -> int:
    """The highest page-aligned gpa in usable RAM where the initrd ends at or below addr_max.

    boot.rst: initrd_addr_max is the highest byte the initrd may occupy; a
    loader conventionally puts it as high as possible. It must not touch the
    kernel's footprint [kernel) nor anything below 1 MiB (kvmpy's structures).
    """
    k_start, k_end = kernel
    best: int | None = None
    for start, end in layout.usable_ram(e820):
        start = max(start, layout.HIGH_MEMORY_ADDR)
        top = min(end, addr_max + 1, 1 << 32)
        if top - start < size:
            continue
        addr = align_down(top - size, layout.PAGE_SIZE)
        if addr < k_end and k_start < addr + size:
            # Overlaps the kernel: try just below it, within the same range.
            addr = align_down(k_start - size, layout.PAGE_SIZE)
        if addr >= start and (best is None or addr > best):
            best = addr
    if best is None:
        raise BootError(
            f"initrd {path} ({size} bytes) does not fit in guest RAM below initrd_addr_max "
            f"{addr_max:#x} without overlapping the kernel at [{k_start:#x}, {k_end:#x}); "
            "give the guest more memory or use a smaller initrd")
    return best


def _prepare(mem: GuestMemory, reserved: Iterable[tuple[int, int]]) -> list[E820Entry]:
    if not mem.is_ram(0, layout.HIGH_MEMORY_ADDR):
        raise BootError(
            f"guest memory ({_ram_text(mem)}) does not cover the first MiB, which holds the "
            "boot structures; give the guest at least 2 MiB starting at 0")
    reserved = list(reserved)
    for gpa, size in reserved:
        for what, start, length in (
                ("boot information page", layout.BOOT_INFO_ADDR, layout.BOOT_INFO_SIZE),
                ("command line", layout.CMDLINE_ADDR, layout.CMDLINE_MAX_SIZE)):
            if gpa < start + length and start < gpa + size:
                raise BootError(
                    f"reserved range [{gpa:#x}, {gpa + size:#x}) overlaps the {what} at "
                    f"[{start:#x}, {start + length:#x})")
    e820 = e820_map(mem.ram_ranges(), reserved)
    if len(e820) > lib.E820_MAX_ENTRIES_ZEROPAGE:
        raise BootError(
            f"the memory map has {len(e820)} entries; boot_params holds at most "
            f"{lib.E820_MAX_ENTRIES_ZEROPAGE}: reserve fewer ranges")
    return e820


def _fill_boot_params_common(bp: object, e820: list[E820Entry], cmdline_addr: int,
                             initrd: tuple[int, int] | None) -> None:
    h = bp.hdr
    h.type_of_loader = TYPE_OF_LOADER_UNDEFINED
    # LOADED_HIGH: the protected-mode code is at 1 MiB or above; CAN_USE_HEAP:
    # heap_end_ptr is valid (boot.rst requires it to be written).
    h.loadflags |= lib.LOADED_HIGH | lib.CAN_USE_HEAP
    h.heap_end_ptr = HEAP_END_PTR
    h.cmd_line_ptr = cmdline_addr
    bp.ext_cmd_line_ptr = 0
    if initrd is not None:
        h.ramdisk_image, h.ramdisk_size = initrd
    else:
        h.ramdisk_image = h.ramdisk_size = 0
    bp.ext_ramdisk_image = bp.ext_ramdisk_size = 0
    bp.e820_entries = len(e820)
    for i, entry in enumerate(e820):
        bp.e820_table[i].addr = entry.addr
        bp.e820_table[i].size = entry.size
        bp.e820_table[i].type = entry.type


def read_boot_params(mem: GuestMemory, gpa: int = layout.ZERO_PAGE_ADDR) -> object:
    """A copy of the struct boot_params at `gpa`, as cffi cdata (for checks and debugging)."""
    bp = ffi.new("struct boot_params *")
    size = ffi.sizeof("struct boot_params")
    ffi.memmove(bp, mem.read(gpa, size), size)
    return bp


def read_hvm_start_info(mem: GuestMemory, gpa: int = PVH_START_INFO_ADDR) -> HvmStartInfo:
    return HvmStartInfo.from_buffer_copy(mem.read(gpa, ctypes.sizeof(HvmStartInfo)))


# -- the loaders -------------------------------------------------------------------

def load_linux(mem: GuestMemory, kernel: Path | str | KernelInfo, *, initrd: Path | str | None = None,
               cmdline: str = "", entry: Literal["auto", "linux64", "pvh"] = "auto",
               reserved: Iterable[tuple[int, int]] = ()) -> BootEntry:
    """Load a bzImage or ELF vmlinux (and an initrd) into `mem`; return how to start it.

    entry: "auto" (64-bit entry for both formats), "linux64", or "pvh" (ELF
    vmlinux with the XEN_ELFNOTE_PHYS32_ENTRY note). `reserved` lists extra
    (gpa, size) ranges the e820 map marks reserved and the loader avoids.
    """
    if entry not in ("auto", "linux64", "pvh"):
        raise BootError(f"unknown Linux entry {entry!r}; use 'auto', 'linux64' or 'pvh'")
    if isinstance(kernel, KernelInfo):  # identified already (`kernel_info`): not read again
        kernel, data = kernel.path, memoryview(kernel.data)
    else:
        kernel = Path(kernel)
        data = memoryview(_read(kernel, "kernel"))
    e820 = _prepare(mem, reserved)
    initrd_path = Path(initrd) if initrd is not None else None
    initrd_size = _file_size(initrd_path, "initrd") if initrd_path is not None else 0

    if bytes(data[:4]) == ELF_MAGIC:
        image = parse_elf(data, str(kernel))
        if image.elf_class != ELFCLASS64 or image.machine != EM_X86_64:
            raise BootError(
                f"{kernel}: ELF class {image.elf_class}, machine {image.machine} is not an "
                "x86-64 vmlinux (ELFCLASS64, EM_X86_64); a 32-bit multiboot kernel needs "
                "the multiboot loader")
        return _load_vmlinux(mem, kernel, data, image, e820, initrd_path, initrd_size,
                             cmdline, "pvh" if entry == "pvh" else "linux64")
    if _is_bzimage(data):
        if entry == "pvh":
            raise BootError(
                f"{kernel}: a bzImage has no PVH entry point; boot the ELF vmlinux for PVH")
        return _load_bzimage(mem, kernel, data, e820, initrd_path, initrd_size, cmdline)
    raise BootError(
        f"{kernel}: neither an ELF vmlinux nor a bzImage (no '\\x7fELF' at 0, no 'HdrS' at "
        f"0x202); the first bytes are {bytes(data[:8]).hex(' ')}")


def _load_bzimage(mem: GuestMemory, kernel: Path, data: memoryview, e820: list[E820Entry],
                  initrd_path: Path | None, initrd_size: int, cmdline: str) -> BootEntry:
    bz = _parse_bzimage(data, str(kernel))
    h = bz.header
    cmd = _encode_cmdline(cmdline, h.cmdline_size if bz.version >= 0x0206 else 255, str(kernel))
    addr_max = h.initrd_addr_max or DEFAULT_INITRD_ADDR_MAX

    # Load at pref_address when the kernel is relocatable and it fits (no
    # move during decompression), else at the classic 1 MiB.
    candidates = [layout.BZIMAGE_LOAD_ADDR]
    if h.relocatable_kernel and h.pref_address > layout.BZIMAGE_LOAD_ADDR:
        candidates.insert(0, h.pref_address)
    load = footprint = initrd_addr = None
    failure: BootError | None = None
    for cand in candidates:
        start, end = _bzimage_footprint(bz, cand)
        if not in_usable_ram(e820, start, end - start):
            failure = BootError(
                f"{kernel}: kernel needs [{start:#x}, {end:#x}) ({(end - start) >> 10} KiB incl. "
                f"init_size) of usable RAM when loaded at {cand:#x}; guest RAM is "
                f"{_ram_text(mem)} ({mem.size >> 20} MiB): give the guest more memory")
            continue
        try:
            if initrd_path is not None:
                initrd_addr = _place_initrd(e820, initrd_size, addr_max, (start, end), initrd_path)
        except BootError as e:
            failure = e
            continue
        load, footprint = cand, (start, end)
        break
    if load is None or footprint is None:
        assert failure is not None
        raise failure

    mem.write(load, bz.payload)
    mem.write(layout.CMDLINE_ADDR, cmd)
    initrd_range = None
    if initrd_path is not None and initrd_addr is not None:
        mem.load_file(initrd_addr, initrd_path)
        initrd_range = (initrd_addr, initrd_size)

    bp = ffi.new("struct boot_params *")
    # boot.rst, 64-bit boot protocol: start from a zeroed boot_params and copy
    # the image's setup header (0x1f1 up to 0x202 + byte at 0x201) into it.
    hdr_off = _setup_header_offset()
    ffi.memmove(ffi.addressof(bp[0], "hdr"), data[hdr_off:hdr_off + bz.header_len], bz.header_len)
    _fill_boot_params_common(bp, e820, layout.CMDLINE_ADDR, initrd_range)
    bp.hdr.code32_start = load  # boot.rst: a relocating loader must set it
    mem.write(layout.ZERO_PAGE_ADDR, ffi.buffer(bp))
    return BootEntry(
        mode="linux64", rip=load + ENTRY_64_OFFSET, rsi=layout.ZERO_PAGE_ADDR,
        kernel_range=(footprint[0], footprint[1] - footprint[0]), initrd_range=initrd_range,
        e820=e820, cmdline_addr=layout.CMDLINE_ADDR)


def _load_vmlinux(mem: GuestMemory, kernel: Path, data: memoryview, image: ElfImage,
                  e820: list[E820Entry], initrd_path: Path | None, initrd_size: int,
                  cmdline: str, mode: Literal["linux64", "pvh"]) -> BootEntry:
    cmd = _encode_cmdline(cmdline, VMLINUX_CMDLINE_SIZE, str(kernel))
    if mode == "pvh":
        rip = pvh_entry_point(data, image)
        if rip is None:
            raise BootError(
                f"{kernel}: no XEN_ELFNOTE_PHYS32_ENTRY note: the kernel was built without "
                "CONFIG_PVH; use the 64-bit entry (entry='linux64')")
    else:
        rip = _physical_entry(image, str(kernel))
    loads = image.loads
    if not loads:
        raise BootError(f"{kernel}: ELF file has no loadable (PT_LOAD) segments")
    k_start = min(s.paddr for s in loads)
    k_end = max(s.paddr + s.memsz for s in loads)
    # Check everything (segments, initrd) before writing anything.
    for seg in loads:
        _check_in_ram(mem, e820, f"{kernel}: segment at p_paddr {seg.paddr:#x}", seg.paddr,
                      seg.memsz)
        layout.check_clear_of_boot_structures(f"{kernel}: segment", seg.paddr, seg.memsz)
    initrd_addr = None
    if initrd_path is not None:
        initrd_addr = _place_initrd(e820, initrd_size, VMLINUX_INITRD_ADDR_MAX,
                                    (k_start, k_end), initrd_path)
    load_elf_segments(mem, data, image, str(kernel), e820)
    mem.write(layout.CMDLINE_ADDR, cmd)
    initrd_range = None
    if initrd_path is not None and initrd_addr is not None:
        mem.load_file(initrd_addr, initrd_path)
        initrd_range = (initrd_addr, initrd_size)
    kernel_range = (k_start, k_end - k_start)

    if mode == "pvh":
        _write_pvh_start_info(mem, e820, layout.CMDLINE_ADDR, initrd_range)
        return BootEntry(mode="pvh", rip=rip, rbx=PVH_START_INFO_ADDR,
                         rax=XEN_HVM_START_MAGIC_VALUE, kernel_range=kernel_range,
                         initrd_range=initrd_range, e820=e820,
                         cmdline_addr=layout.CMDLINE_ADDR)

    bp = ffi.new("struct boot_params *")
    # A vmlinux carries no setup header: build the fields the kernel reads.
    h = bp.hdr
    h.boot_flag = BOOT_FLAG
    h.header = HDRS_MAGIC
    h.version = VMLINUX_BOOT_PROTOCOL
    h.kernel_alignment = VMLINUX_KERNEL_ALIGNMENT
    h.initrd_addr_max = VMLINUX_INITRD_ADDR_MAX
    h.cmdline_size = VMLINUX_CMDLINE_SIZE
    h.xloadflags = lib.XLF_KERNEL_64
    _fill_boot_params_common(bp, e820, layout.CMDLINE_ADDR, initrd_range)
    h.code32_start = k_start
    mem.write(layout.ZERO_PAGE_ADDR, ffi.buffer(bp))
    return BootEntry(mode="linux64", rip=rip, rsi=layout.ZERO_PAGE_ADDR,
                     kernel_range=kernel_range, initrd_range=initrd_range, e820=e820,
                     cmdline_addr=layout.CMDLINE_ADDR)


def _physical_entry(image: ElfImage, name: str) -> int:
    """e_entry as a physical address.

    Linux's vmlinux.lds.S says ENTRY(phys_startup_64), so e_entry already is
    physical; should an image carry a virtual one, translate it through the
    segment that contains it.
    """
    for seg in image.loads:
        if seg.paddr <= image.entry < seg.paddr + seg.memsz:
            return image.entry
    for seg in image.loads:
        if seg.vaddr <= image.entry < seg.vaddr + seg.memsz:
            return image.entry - seg.vaddr + seg.paddr
    raise BootError(f"{name}: entry point {image.entry:#x} is in no loadable segment")


def _write_pvh_start_info(mem: GuestMemory, e820: list[E820Entry], cmdline_addr: int,
                          initrd: tuple[int, int] | None) -> None:
    if len(e820) > PVH_MAX_MEMMAP:
        raise BootError(f"the memory map has {len(e820)} entries; the PVH page holds {PVH_MAX_MEMMAP}")
    info = HvmStartInfo(magic=XEN_HVM_START_MAGIC_VALUE, version=HVM_START_INFO_VERSION,
                        cmdline_paddr=cmdline_addr, memmap_paddr=PVH_MEMMAP_ADDR,
                        memmap_entries=len(e820))
    if initrd is not None:
        # Linux's PVH entry takes the first module as the initrd.
        mod = HvmModlistEntry(paddr=initrd[0], size=initrd[1])
        mem.write(PVH_MODLIST_ADDR, bytes(mod))
        info.nr_modules = 1
        info.modlist_paddr = PVH_MODLIST_ADDR
    table = b"".join(bytes(HvmMemmapTableEntry(addr=e.addr, size=e.size, type=e.type))
                     for e in e820)
    mem.write(PVH_MEMMAP_ADDR, table)
    mem.write(PVH_START_INFO_ADDR, bytes(info))


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise BootError(f"{what} {path}: cannot read: {e.strerror}") from e


def _file_size(path: Path, what: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError as e:
        raise BootError(f"{what} {path}: cannot read: {e.strerror}") from e


def kernel_info(path: Path | str) -> KernelInfo:
    """Identify a kernel image without loading it: bzImage, x86-64 vmlinux or multiboot.

    Raises BootError for a file that is none of them (or is truncated).
    """

    path = Path(path)
    raw = _read(path, "kernel")
    data = memoryview(raw)
    if bytes(data[:4]) == ELF_MAGIC:
        image = parse_elf(data, str(path))
        if image.elf_class == ELFCLASS64 and image.machine == EM_X86_64:
            entries = ["linux64"]
            if pvh_entry_point(data, image) is not None:
                entries.append("pvh")
            if find_multiboot_header(data) is not None:
                entries.append("multiboot")
            return KernelInfo(path, "vmlinux", len(data), tuple(entries), elf_class=64,
                              entry_point=_physical_entry(image, str(path)), data=raw)
        if find_multiboot_header(data) is not None:
            return KernelInfo(path, "multiboot", len(data), ("multiboot",),
                              elf_class=32 if image.elf_class == ELFCLASS32 else 64,
                              entry_point=image.entry, data=raw)
        raise BootError(
            f"{path}: ELF class {image.elf_class}, machine {image.machine}: neither an x86-64 "
            "vmlinux nor a multiboot kernel")
    if _is_bzimage(data):
        bz = _parse_bzimage(data, str(path))
        h = bz.header
        return KernelInfo(
            path, "bzImage", len(data), ("linux64",),
            protocol=f"{h.version >> 8}.{h.version & 0xff:02d}",
            version=_kernel_version_string(data, h), relocatable=bool(h.relocatable_kernel),
            pref_address=h.pref_address, init_size=h.init_size, data=raw)
    mb = find_multiboot_header(data)
    if mb is not None:
        return KernelInfo(path, "multiboot", len(data), ("multiboot",), entry_point=mb.entry_addr, data=raw)
    raise BootError(
        f"{path}: not a kernel image kvmpy knows (ELF, bzImage or multiboot); "
        f"the first bytes are {bytes(data[:8]).hex(' ')}")
