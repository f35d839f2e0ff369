"""Guest-physical memory: anonymous (or memfd) mmap regions handed to KVM as memory slots.

`GuestMemory` owns the host mappings; `Vm.set_user_memory_region` tells KVM
about them. By default RAM is private anonymous memory; `memfd=True` backs
each region with its own memfd mapped MAP_SHARED instead, so another
process can map the same pages from the fd (a vhost-user back end such as
virtiofsd gets the fds in VHOST_USER_SET_MEM_TABLE). Every access by guest-physical address (GPA) is bounds-checked
against the regions, so a bad address from an untrusted guest raises
`GuestMemoryError` instead of touching host memory outside the guest.
"""

from __future__ import annotations

import bisect
import enum
import mmap
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ._kvm import ffi

# kvmpy/arch.py is a leaf (it imports nothing from kvmpy), so this is no upward import.
from .arch import Cr0, Cr4, Efer
from .errors import GuestMemoryError, PageFault

PAGE_SIZE = 4096
HUGE_PAGE_SIZE = 2 << 20
MAX_PHYS_BITS = 52  # the architectural limit; a CPU's MAXPHYADDR (CPUID 0x80000008 EAX[7:0]) may be lower

# x86 PC convention: RAM above 3 GiB moves above 4 GiB, leaving the 32-bit
# MMIO hole for the IOAPIC (0xfec00000), LAPIC (0xfee00000) and devices.
MMIO_HOLE_START = 0xC000_0000
MMIO_HOLE_END = 1 << 32

_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)
_MAP_HUGETLB = getattr(mmap, "MAP_HUGETLB", 0x40000)
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)


@dataclass(eq=False)
class MemoryRegion:
    """One contiguous range of guest RAM backed by one host mapping."""

    gpa: int
    size: int
    mapping: mmap.mmap
    slot: int
    readonly: bool = False
    dirty_log: bool = False
    fd: int = -1  # the memfd behind `mapping` (memfd-backed memory only), owned by the region
    fd_offset: int = 0  # where `mapping` starts in `fd`
    view: memoryview = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.view = memoryview(self.mapping)

    @property
    def end(self) -> int:
        return self.gpa + self.size

    @property
    def host_address(self) -> int:
        """The mapping's address in this process: KVM's `userspace_addr`, and vhost's."""
        return int(ffi.cast("uintptr_t", ffi.from_buffer(self.mapping)))

    def contains(self, gpa: int, size: int = 1) -> bool:
        return self.gpa <= gpa and gpa + size <= self.end


def _anonymous_mapping(size: int, *, hugepages: bool, thp: bool) -> mmap.mmap:
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    if hugepages:
        if size % HUGE_PAGE_SIZE:
            raise GuestMemoryError(
                f"hugepage-backed region of {size:#x} bytes is not a multiple of 2 MiB")
        try:
            return mmap.mmap(-1, size, flags=flags | _MAP_HUGETLB)
        except OSError as e:
            raise GuestMemoryError(
                f"cannot map {size >> 20} MiB of hugetlbfs pages ({e.strerror}); "
                "reserve them with: echo N > /proc/sys/vm/nr_hugepages") from e
    try:
        mapping = mmap.mmap(-1, size, flags=flags | _MAP_NORESERVE)
    except OSError as e:
        raise GuestMemoryError(f"cannot map {size:#x} bytes of guest memory: {e.strerror}") from e
    if thp:
        mapping.madvise(_MADV_HUGEPAGE)
    return mapping


def _memfd_mapping(size: int, name: str, *, hugepages: bool, thp: bool) -> tuple[mmap.mmap, int]:
    """A MAP_SHARED mapping of a fresh memfd of `size` bytes, and the fd (the caller owns both)."""
    flags = os.MFD_CLOEXEC | (os.MFD_HUGETLB if hugepages else 0)
    if hugepages and size % HUGE_PAGE_SIZE:
        raise GuestMemoryError(f"hugepage-backed region of {size:#x} bytes is not a multiple of 2 MiB")
    try:
        fd = os.memfd_create(name, flags)
    except OSError as e:
        raise GuestMemoryError(f"memfd_create({name!r}) for {size:#x} bytes of guest memory: {e.strerror}"
                               + ("; reserve hugetlbfs pages with: echo N > /proc/sys/vm/nr_hugepages"
                                  if hugepages else "")) from e
    try:
        os.ftruncate(fd, size)  # sparse: pages are allocated when first touched
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as e:
        os.close(fd)
        raise GuestMemoryError(f"cannot map a memfd of {size:#x} bytes of guest memory: {e.strerror}") from e
    if thp and not hugepages:
        mapping.madvise(_MADV_HUGEPAGE)  # honoured when /sys/kernel/mm/transparent_hugepage/shmem_enabled allows
    return mapping, fd


def parse_size(text: str | int) -> int:
    """'256M', '1G', '4096', 512 -> bytes. Raises ValueError naming the input."""
    if isinstance(text, int):
        return text
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t, 0)
    except ValueError:
        raise ValueError(f"not a memory size: {text!r} (examples: 256M, 1G, 65536)") from None


class GuestMemory:
    """Guest RAM as one or more regions, addressed by guest-physical address.

    `GuestMemory(size)` lays RAM out like a PC: `[0, min(size, 3 GiB))` and the
    rest from 4 GiB. `add_region` adds further slots (for example a read-only
    one). Regions never overlap. `memfd=True`: every region kvmpy maps is a
    memfd mapped MAP_SHARED (`MemoryRegion.fd`, `fd_offset`), for back ends
    in other processes; the default is private anonymous memory.
    """

    def __init__(self, size: int | str = 0, *, hugepages: bool = False, thp: bool = False,
                 max_size: int = 1 << 46, memfd: bool = False) -> None:
        size = parse_size(size)
        if size < 0 or size % PAGE_SIZE:
            raise GuestMemoryError(f"guest memory size {size:#x} is not a positive multiple of 4 KiB")
        if size > max_size:
            raise GuestMemoryError(
                f"guest memory size {size >> 20} MiB exceeds the limit of {max_size >> 20} MiB")
        self.hugepages = hugepages
        self.thp = thp
        self.memfd = memfd
        self.regions: list[MemoryRegion] = []
        self._starts: list[int] = []
        low = min(size, MMIO_HOLE_START)
        if low:
            self.add_region(0, low)
        if size > low:
            self.add_region(MMIO_HOLE_END, size - low)

    # -- layout ---------------------------------------------------------

    def add_region(self, gpa: int, size: int, *, readonly: bool = False,
                   dirty_log: bool = False, mapping: mmap.mmap | None = None) -> MemoryRegion:
        """Map `size` bytes of new memory (anonymous, or a memfd if `memfd`; or the given `mapping`) at `gpa`."""
        if gpa % PAGE_SIZE or size <= 0 or size % PAGE_SIZE:
            raise GuestMemoryError(
                f"region at {gpa:#x} of {size:#x} bytes is not page aligned and non-empty")
        for r in self.regions:
            if gpa < r.end and r.gpa < gpa + size:
                raise GuestMemoryError(
                    f"region [{gpa:#x}, {gpa + size:#x}) overlaps slot {r.slot} "
                    f"[{r.gpa:#x}, {r.end:#x})")
        fd = -1
        if mapping is None and self.memfd:
            mapping, fd = _memfd_mapping(size, f"kvmpy-ram-{gpa:#x}", hugepages=self.hugepages, thp=self.thp)
        elif mapping is None:
            mapping = _anonymous_mapping(size, hugepages=self.hugepages, thp=self.thp)
        elif len(mapping) != size:
            raise GuestMemoryError(f"mapping of {len(mapping):#x} bytes given for a region of {size:#x}")
        slot = max((r.slot for r in self.regions), default=-1) + 1
        region = MemoryRegion(gpa, size, mapping, slot, readonly, dirty_log, fd)
        i = bisect.bisect(self._starts, gpa)
        self._starts.insert(i, gpa)
        self.regions.insert(i, region)
        return region

    @property
    def size(self) -> int:
        """Total bytes of guest RAM (all regions)."""
        return sum(r.size for r in self.regions)

    def ram_ranges(self) -> list[tuple[int, int]]:
        """(gpa, size) of each region, in address order: the input to an e820 map."""
        return [(r.gpa, r.size) for r in self.regions]

    def __iter__(self) -> Iterator[MemoryRegion]:
        return iter(self.regions)

    def region_at(self, gpa: int, size: int = 1) -> MemoryRegion | None:
        """The region holding all of [gpa, gpa+size), or None."""
        i = bisect.bisect(self._starts, gpa) - 1
        if i >= 0:
            r = self.regions[i]
            if r.contains(gpa, size):
                return r
        return None

    def is_ram(self, gpa: int, size: int = 1) -> bool:
        return self.region_at(gpa, size) is not None

    def host_address(self, gpa: int, size: int = 1) -> int:
        """The host virtual address of guest-physical `gpa` (for a back end given addresses, e.g. vhost)."""
        r = self.region_at(gpa, size)
        if r is None:
            raise GuestMemoryError(f"GPA {gpa:#x}+{size:#x} is not guest RAM")
        return r.host_address + (gpa - r.gpa)

    # -- access ---------------------------------------------------------

    def view(self, gpa: int, size: int) -> memoryview:
        """A zero-copy, writable view of [gpa, gpa+size); must lie in one region."""
        if size < 0:
            raise GuestMemoryError(f"negative length {size} at GPA {gpa:#x}")
        r = self.region_at(gpa, max(size, 1))
        if r is None:
            raise GuestMemoryError(
                f"guest-physical range [{gpa:#x}, {gpa + size:#x}) is not guest RAM")
        off = gpa - r.gpa
        return r.view[off:off + size]

    def read(self, gpa: int, size: int) -> bytes:
        return bytes(self.view(gpa, size))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.view(gpa, len(data))[:] = data

    def fill(self, gpa: int, size: int, byte: int = 0) -> None:
        self.view(gpa, size)[:] = bytes([byte]) * size

    def read_u8(self, gpa: int) -> int:
        return self.view(gpa, 1)[0]

    def read_u16(self, gpa: int) -> int:
        return int.from_bytes(self.view(gpa, 2), "little")

    def read_u32(self, gpa: int) -> int:
        return int.from_bytes(self.view(gpa, 4), "little")

    def read_u64(self, gpa: int) -> int:
        return int.from_bytes(self.view(gpa, 8), "little")

    def write_u8(self, gpa: int, value: int) -> None:
        self.view(gpa, 1)[0] = value

    def write_u16(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<H", value))

    def write_u32(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<I", value))

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<Q", value))

    def load_file(self, gpa: int, path: str | os.PathLike[str]) -> int:
        """Copy a host file into guest RAM at `gpa`; returns its size."""
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            view = self.view(gpa, size)
            got = f.readinto(view)
        if got != size:
            raise GuestMemoryError(f"{path}: short read ({got} of {size} bytes)")
        return size

    # -- guest virtual -> guest physical -----------------------------------

    def translate(self, gva: int, cr3: int, *, cr0: int = 1 << 31, cr4: int = 1 << 5,
                  efer: int = 1 << 10, access: Access | None = None, maxphyaddr: int = MAX_PHYS_BITS) -> int:
        """Walk the guest's page tables like the MMU does; return the GPA of `gva`.

        Handles no paging, 32-bit (with PSE/PSE-36), PAE and 4-/5-level paging.
        Raises `PageFault` (with the CPU's error code) for a non-present entry,
        a reserved bit (address bits at or above `maxphyaddr`, XD without
        EFER.NXE, level-specific ones), or a right `access` lacks: R/W with
        CR0.WP, U/S with SMAP/SMEP, NX. Without `access`, a supervisor read.
        `GuestMemoryError` for a table outside RAM. Accessed/dirty bits are
        not set (the guest's own MMU sets them when it runs the access).
        """
        return translate(self, gva, cr3, cr0=cr0, cr4=cr4, efer=efer, access=access, maxphyaddr=maxphyaddr)

    def close(self) -> None:
        for r in self.regions:
            r.view.release()
            try:
                r.mapping.close()
            except BufferError:
                pass  # a caller still holds a view; the mapping goes with it
            if r.fd >= 0:
                os.close(r.fd)  # the pages live on while a mapping (here or in a back end) remains
                r.fd = -1
        self.regions.clear()
        self._starts.clear()

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_CR0_PG, _CR0_WP, _CR4_PSE, _CR4_PAE, _CR4_LA57 = Cr0.PG, Cr0.WP, Cr4.PSE, Cr4.PAE, Cr4.LA57
_CR4_SMEP, _CR4_SMAP, _EFER_LMA, _EFER_NXE = Cr4.SMEP, Cr4.SMAP, Efer.LMA, Efer.NXE
_PRESENT = 1
_RW = 1 << 1
_US = 1 << 2
_PS = 1 << 7
_XD = 1 << 63
_ADDR_MASK = 0x000F_FFFF_FFFF_F000


class PfError(enum.IntFlag):
    """#PF error code bits (SDM vol. 3A, figure 4-12)."""

    P = 1          # 0: not present; 1: a protection or reserved-bit violation
    W = 1 << 1     # the access was a write
    U = 1 << 2     # a user-mode access (CPL 3, not an implicit supervisor access)
    RSVD = 1 << 3  # a reserved bit was set in a paging-structure entry
    ID = 1 << 4    # an instruction fetch (with NX paging or SMEP)


@dataclass(frozen=True)
class Access:
    """What an access is, for the permission checks of a page walk (SDM vol. 3A, 4.6).

    `user`: CPL 3 and not an implicit supervisor access (GDT, IDT, TSS reads
    are supervisor accesses at any CPL: pass `user=False, implicit=True`).
    `ac`: RFLAGS.AC, which lifts SMAP for explicit supervisor data accesses.
    """

    write: bool = False
    fetch: bool = False
    user: bool = False
    implicit: bool = False
    ac: bool = False

    @classmethod
    def of_cpu(cls, cpl: int, rflags: int = 0, *, write: bool = False, fetch: bool = False,
               implicit: bool = False) -> Access:
        """The access a CPU at `cpl` with `rflags` makes (AC is bit 18)."""
        return cls(write=write, fetch=fetch, user=cpl == 3 and not implicit, implicit=implicit,
                   ac=bool(rflags & (1 << 18)))


# PfError as plain ints: the walk is on the completion path, and IntFlag arithmetic costs microseconds.
_PF_P, _PF_W, _PF_U, _PF_RSVD, _PF_ID = 1, 2, 4, 8, 16


def translate(mem: GuestMemory, gva: int, cr3: int, *, cr0: int, cr4: int, efer: int,
              access: Access | None = None, maxphyaddr: int = MAX_PHYS_BITS) -> int:
    """Page walk shared by `GuestMemory.translate` (see there).

    Raises `PageFault` (a `GuestMemoryError`) with the error code a CPU would
    push for a non-present entry, a reserved bit, or (when `access` is given)
    a permission the access lacks; `GuestMemoryError` for a table outside RAM.
    """
    if not cr0 & _CR0_PG:
        return gva & 0xFFFF_FFFF
    access = access or Access()
    pae = bool(cr4 & _CR4_PAE)
    nx = pae and bool(efer & _EFER_NXE)
    code = (_PF_W if access.write else 0) | (_PF_U if access.user else 0)
    if access.fetch and (nx or cr4 & _CR4_SMEP):
        code |= _PF_ID

    def fault(bits: int, why: str) -> PageFault:
        return PageFault(gva, code | bits, f"GVA {gva:#x}: {why} (#PF error code {code | bits:#x})")

    rw = us = True
    xd = False
    if not pae:
        # 32-bit paging: 10/10/12, 4 MiB pages when PSE (PSE-36: PA bits 39:32 in PDE bits 20:13).
        pde = mem.read_u32((cr3 & 0xFFFF_F000) + ((gva >> 22) & 0x3FF) * 4)
        if not pde & _PRESENT:
            raise fault(0, "page directory entry not present")
        rw, us = bool(pde & _RW), bool(pde & _US)
        if pde & _PS and cr4 & _CR4_PSE:
            high_bits = max(min(maxphyaddr, 40) - 32, 0)
            if pde & (1 << 21) or (pde >> (13 + high_bits)) & ((1 << (8 - high_bits)) - 1):
                raise fault(_PF_P | _PF_RSVD, f"reserved bit set in the 4 MiB PDE {pde:#x}")
            gpa = (pde & 0xFFC0_0000) | (((pde >> 13) & 0xFF) << 32) | (gva & 0x3F_FFFF)
        else:
            pte = mem.read_u32((pde & 0xFFFF_F000) + ((gva >> 12) & 0x3FF) * 4)
            if not pte & _PRESENT:
                raise fault(0, "page table entry not present")
            rw, us = rw and bool(pte & _RW), us and bool(pte & _US)
            gpa = (pte & 0xFFFF_F000) | (gva & 0xFFF)
        _check_permissions(access, rw, us, False, cr0, cr4, fault)
        return gpa
    # Reserved in every PAE / 4-level entry: address bits at and above MAXPHYADDR, and XD without NXE.
    reserved = ((1 << 52) - 1) & ~((1 << maxphyaddr) - 1)
    if not nx:
        reserved |= _XD
    addr_mask = _ADDR_MASK & ((1 << maxphyaddr) - 1)
    if efer & _EFER_LMA:
        levels = 5 if cr4 & _CR4_LA57 else 4
        table = cr3 & addr_mask
        shift = 12 + 9 * levels
    else:
        # PAE: the four PDPTEs (loaded at MOV CR3 on a CPU, where bad ones #GP) carry no R/W, U/S or XD.
        pdpte = mem.read_u64((cr3 & 0xFFFF_FFE0) + ((gva >> 30) & 3) * 8)
        if not pdpte & _PRESENT:
            raise fault(0, "PDPTE not present")
        table = pdpte & addr_mask
        shift = 30
    while True:
        shift -= 9
        entry = mem.read_u64(table + ((gva >> shift) & 0x1FF) * 8)
        if not entry & _PRESENT:
            raise fault(0, f"paging entry for bit {shift} not present")
        leaf = shift == 12 or entry & _PS
        bad = reserved
        if entry & _PS:
            if shift > 30:
                bad |= _PS  # no pages above 1 GiB: PS is reserved in PML4Es and PML5Es
            elif shift in (21, 30):
                bad |= ((1 << shift) - 1) & ~0x1FFF  # a large page's address bits below its size (PAT is bit 12)
        if entry & bad:
            raise fault(_PF_P | _PF_RSVD,
                        f"reserved bit set in the paging entry for bit {shift} ({entry:#x})")
        rw, us = rw and bool(entry & _RW), us and bool(entry & _US)
        xd = xd or (nx and bool(entry & _XD))
        if leaf:
            _check_permissions(access, rw, us, xd, cr0, cr4, fault)
            mask = (1 << shift) - 1
            return (entry & addr_mask & ~mask) | (gva & mask)
        table = entry & addr_mask


def _check_permissions(access: Access, rw: bool, us: bool, xd: bool, cr0: int, cr4: int,
                       fault: Callable[[int, str], PageFault]) -> None:
    """SDM vol. 3A, 4.6.1: what a translation with these accumulated rights allows this access."""
    if access.user:
        if not us:
            raise fault(_PF_P, "user-mode access to a supervisor page")
        if access.write and not rw:
            raise fault(_PF_P, "user-mode write to a read-only page")
        if access.fetch and xd:
            raise fault(_PF_P, "instruction fetch from a no-execute page")
        return
    if access.fetch:
        if us and cr4 & _CR4_SMEP:
            raise fault(_PF_P, "supervisor fetch from a user page with SMEP")
        if xd:
            raise fault(_PF_P, "instruction fetch from a no-execute page")
        return
    if us and cr4 & _CR4_SMAP and (access.implicit or not access.ac):
        raise fault(_PF_P, "supervisor data access to a user page with SMAP (RFLAGS.AC clear)")
    if access.write and not rw and cr0 & _CR0_WP:
        raise fault(_PF_P, "supervisor write to a read-only page with CR0.WP")
