"""Put a vCPU in real mode, 32-bit protected mode or 64-bit long mode.

Each `setup_*` call writes the tables the mode needs into guest memory
(GDT, IDT, TSS, identity-mapped page tables) and loads registers so that the
vCPU starts at `entry` on its next KVM_RUN. The GDT follows the Linux boot
protocol's layout (__BOOT_CS = 0x10, __BOOT_DS = 0x18), so the same setup
serves a flat test binary and a Linux kernel's 64-bit entry.

Intel SDM vol. 3A, 3.4.5 (segment descriptors), 6.14 (64-bit IDT gates),
4.5 (4-level paging), 9.8 (switching to long mode).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Mapping

from ..boot.layout import GDT_ADDR, IDT_ADDR, PD_ADDR, PDPT_ADDR, PML4_ADDR, TSS_ADDR
from ..memory import GuestMemory

# The tables' addresses come from the one low-memory layout (kvmpy/boot/layout.py).

# Selectors. Kernel and user slots are those of Linux (__KERNEL_CS 0x10,
# __KERNEL_DS 0x18, __USER32_CS 0x23, __USER_DS 0x2b, __USER_CS 0x33), so
# SYSCALL/SYSRET work with STAR = (0x20 << 48) | (0x10 << 32), as in Linux.
CODE32_SEL = 0x08
CODE64_SEL = 0x10
DATA_SEL = 0x18
USER_CODE32_SEL = 0x23  # slot 4, RPL 3
USER_DATA_SEL = 0x2B  # slot 5, RPL 3
USER_CODE64_SEL = 0x33  # slot 6, RPL 3
TSS_SEL = 0x40  # slot 8; 16 bytes in long mode (slots 8 and 9)
STAR_LINUX = (0x20 << 48) | (CODE64_SEL << 32)

CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11

PTE_P = 1 << 0
PTE_RW = 1 << 1
PTE_US = 1 << 2
PTE_PS = 1 << 7

RFLAGS_RESERVED = 1 << 1


@dataclass(frozen=True)
class Segment:
    """A flat segment descriptor's attributes, in kvm_segment terms."""

    selector: int
    type: int  # 4-bit type: 0xB code exec/read/accessed, 0x3 data read/write/accessed, 0xB busy TSS
    s: int = 1  # 1 code/data, 0 system
    dpl: int = 0
    l: int = 0
    db: int = 1
    base: int = 0
    limit: int = 0xFFFFF  # in 4 KiB units when g=1
    g: int = 1

    def descriptor(self) -> bytes:
        """The 8-byte GDT descriptor."""
        access = (1 << 7) | (self.dpl << 5) | (self.s << 4) | self.type
        flags = (self.g << 3) | (self.db << 2) | (self.l << 1)
        d = (self.limit & 0xFFFF) | ((self.base & 0xFFFFFF) << 16) | (access << 40) \
            | (((self.limit >> 16) & 0xF) << 48) | (flags << 52) | (((self.base >> 24) & 0xFF) << 56)
        return struct.pack("<Q", d)

    def load(self, seg: Any) -> None:
        """Fill a `struct kvm_segment` (the hidden part KVM loads)."""
        seg.base = self.base
        seg.limit = (self.limit << 12) | 0xFFF if self.g else self.limit
        seg.selector = self.selector
        seg.type = self.type
        seg.present = 1
        seg.dpl = self.dpl
        seg.db = self.db
        seg.s = self.s
        seg.l = self.l
        seg.g = self.g
        seg.avl = 0
        seg.unusable = 0


CODE32 = Segment(CODE32_SEL, 0xB)
CODE64 = Segment(CODE64_SEL, 0xB, l=1, db=0)
DATA = Segment(DATA_SEL, 0x3)
USER_CODE64 = Segment(USER_CODE64_SEL, 0xB, dpl=3, l=1, db=0)
USER_DATA = Segment(USER_DATA_SEL, 0x3, dpl=3)
USER_CODE32 = Segment(USER_CODE32_SEL, 0xB, dpl=3)


def _tss_descriptor(base: int, limit: int, long_mode: bool) -> bytes:
    seg = Segment(TSS_SEL, 0x9, s=0, db=0, base=base, limit=limit, g=0)
    low = seg.descriptor()
    return low + struct.pack("<Q", base >> 32) if long_mode else low


def write_gdt(mem: GuestMemory, *, tss_base: int | None = None, long_mode: bool = True) -> int:
    """Write kvmpy's GDT at GDT_ADDR; returns its limit (size - 1)."""
    entries = [b"\0" * 8, CODE32.descriptor(), CODE64.descriptor(), DATA.descriptor(),
               USER_CODE32.descriptor(), USER_DATA.descriptor(), USER_CODE64.descriptor(), b"\0" * 8]
    tss = _tss_descriptor(tss_base, 0x67, long_mode) if tss_base is not None else b"\0" * 8
    entries.append(tss if long_mode else tss + b"\0" * 8)
    gdt = b"".join(entries)
    mem.write(GDT_ADDR, gdt)
    return len(gdt) - 1


def write_idt(mem: GuestMemory, handlers: Mapping[int, int], *, long_mode: bool,
              user_vectors: frozenset[int] = frozenset(), ist: Mapping[int, int] | None = None) -> int:
    """Write interrupt gates for `handlers` {vector: address} at IDT_ADDR; returns the IDT limit.

    Vectors in `user_vectors` get DPL 3 (reachable by `int n` from user mode).
    """
    size = 16 if long_mode else 8
    mem.fill(IDT_ADDR, 256 * size)
    for vector, addr in handlers.items():
        if not 0 <= vector < 256:
            raise ValueError(f"IDT vector {vector} out of range 0..255")
        dpl = 3 if vector in user_vectors else 0
        attr = 0x80 | (dpl << 5) | 0xE  # present, 32/64-bit interrupt gate
        sel = CODE64_SEL if long_mode else CODE32_SEL
        ist_index = (ist or {}).get(vector, 0)
        gate = struct.pack("<HHBBH", addr & 0xFFFF, sel, ist_index, attr, (addr >> 16) & 0xFFFF)
        if long_mode:
            gate += struct.pack("<II", addr >> 32, 0)
        mem.write(IDT_ADDR + vector * size, gate)
    return 256 * size - 1


def write_identity_page_tables(mem: GuestMemory, *, gib: int = 4, user: bool = False) -> int:
    """Identity-map the first `gib` GiB with 2 MiB pages; returns CR3."""
    if not 1 <= gib <= 4:
        raise ValueError("the identity map covers 1 to 4 GiB")
    flags = PTE_P | PTE_RW | (PTE_US if user else 0)
    mem.fill(PML4_ADDR, 4096)
    mem.fill(PDPT_ADDR, 4096)
    mem.write_u64(PML4_ADDR, PDPT_ADDR | flags)
    for g in range(gib):
        pd = PD_ADDR + g * 4096
        mem.write_u64(PDPT_ADDR + g * 8, pd | flags)
        mem.write(pd, b"".join(struct.pack("<Q", ((g << 30) + (i << 21)) | flags | PTE_PS)
                               for i in range(512)))
    return PML4_ADDR


def write_tss(mem: GuestMemory, *, rsp0: int = 0, ist: Mapping[int, int] | None = None) -> int:
    """A 64-bit TSS at TSS_ADDR with RSP0 and IST stacks; returns its base."""
    tss = bytearray(0x68)
    struct.pack_into("<Q", tss, 4, rsp0)
    for index, top in (ist or {}).items():
        struct.pack_into("<Q", tss, 0x24 + (index - 1) * 8, top)
    struct.pack_into("<H", tss, 0x66, 0x68)  # I/O map base beyond the limit: no bitmap
    mem.write(TSS_ADDR, bytes(tss))
    return TSS_ADDR


def _load_tss(sregs: Any, base: int) -> None:
    tr = sregs.tr
    tr.base, tr.limit, tr.selector = base, 0x67, TSS_SEL
    tr.type, tr.present, tr.s, tr.dpl, tr.db, tr.l, tr.g, tr.unusable = 0xB, 1, 0, 0, 0, 0, 0, 0


def setup_real_mode(vcpu: Any, entry: int, *, stack: int | None = 0x7000, cs: int | None = None) -> None:
    """Start at physical `entry` in real mode, from whatever mode the vCPU was in.

    CS:IP is `cs`:(entry - cs*16) when `cs` is given (firmware resuming at a
    waking vector uses entry>>4), else 0:entry below 64 KiB and entry>>4 &
    0xF000 above. Segments get real-mode attributes and CR0.PE/PG, CR4 and
    EFER are cleared. `stack=None` keeps RSP.
    """
    if not 0 <= entry < 0x100000:
        raise ValueError(f"real-mode entry {entry:#x} is above 1 MiB")
    if cs is None:
        cs = 0 if entry < 0x10000 else (entry >> 4) & 0xF000
    if not 0 <= entry - (cs << 4) <= 0xFFFF:
        raise ValueError(f"real-mode entry {entry:#x} is not reachable from CS {cs:#x}")
    s = vcpu.get_sregs()
    for seg, selector, kind in ((s.cs, cs, 0xB), (s.ds, 0, 3), (s.es, 0, 3), (s.fs, 0, 3), (s.gs, 0, 3),
                                (s.ss, 0, 3)):
        seg.selector, seg.base, seg.limit, seg.type = selector, selector << 4, 0xFFFF, kind
        seg.present, seg.s, seg.dpl, seg.db, seg.l, seg.g, seg.avl, seg.unusable = 1, 1, 0, 0, 0, 0, 0, 0
    s.cr0 &= ~(CR0_PE | CR0_PG)
    s.cr4 = 0
    s.efer = 0
    vcpu.set_sregs(s)
    regs = vcpu.get_regs()
    regs.rip = entry - (cs << 4)
    if stack is not None:
        regs.rsp = stack
    regs.rflags = RFLAGS_RESERVED
    vcpu.set_regs(regs)


def setup_protected_mode(vcpu: Any, mem: GuestMemory, entry: int, *, stack: int = 0x7000,
                         idt: Mapping[int, int] | None = None, paging: bool = False,
                         regs: Mapping[str, int] | None = None) -> None:
    """Start at `entry` in flat 32-bit protected mode (CS 0x08, data 0x18).

    `paging=True` also turns on PAE paging with the identity map (4 GiB).
    `regs` sets extra registers (e.g. {"rax": magic, "rbx": info} for multiboot).
    """
    limit = write_gdt(mem, long_mode=False)
    s = vcpu.get_sregs()
    s.gdt.base, s.gdt.limit = GDT_ADDR, limit
    CODE32.load(s.cs)
    for seg in (s.ds, s.es, s.fs, s.gs, s.ss):
        DATA.load(seg)
    if idt is not None:
        s.idt.base, s.idt.limit = IDT_ADDR, write_idt(mem, idt, long_mode=False)
    s.cr0 = CR0_PE | CR0_ET | CR0_NE
    s.efer = 0
    if paging:
        # PAE paging with the long-mode identity map: PDPT entries must not set RW/US.
        write_identity_page_tables(mem)
        for g in range(4):
            mem.write_u64(PDPT_ADDR + g * 8, (PD_ADDR + g * 4096) | PTE_P)
        s.cr3 = PDPT_ADDR
        s.cr4 |= CR4_PAE
        s.cr0 |= CR0_PG
    vcpu.set_sregs(s)
    _set_entry_regs(vcpu, entry, stack, regs)


def setup_long_mode(vcpu: Any, mem: GuestMemory, entry: int, *, stack: int = 0x7000,
                    idt: Mapping[int, int] | None = None, user_vectors: frozenset[int] = frozenset(),
                    tss_rsp0: int | None = None, ist: Mapping[int, int] | None = None,
                    user_pages: bool = False, regs: Mapping[str, int] | None = None,
                    efer_extra: int = 0) -> None:
    """Start at `entry` in 64-bit mode with the first 4 GiB identity-mapped.

    `idt` installs interrupt gates; `tss_rsp0` loads a TSS (needed to take
    interrupts from user mode); `user_pages` makes the identity map
    user-accessible (for guest code at CPL3).
    """
    tss_base = write_tss(mem, rsp0=tss_rsp0, ist=ist) if tss_rsp0 is not None else None
    limit = write_gdt(mem, tss_base=tss_base, long_mode=True)
    cr3 = write_identity_page_tables(mem, user=user_pages)
    s = vcpu.get_sregs()
    s.gdt.base, s.gdt.limit = GDT_ADDR, limit
    CODE64.load(s.cs)
    for seg in (s.ds, s.es, s.fs, s.gs, s.ss):
        DATA.load(seg)
    if tss_base is not None:
        _load_tss(s, tss_base)
    if idt is not None:
        s.idt.base = IDT_ADDR
        s.idt.limit = write_idt(mem, idt, long_mode=True, user_vectors=user_vectors, ist=ist)
    s.cr3 = cr3
    s.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
    s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    s.efer = EFER_LME | EFER_LMA | efer_extra
    vcpu.set_sregs(s)
    _set_entry_regs(vcpu, entry, stack, regs)


def _set_entry_regs(vcpu: Any, entry: int, stack: int, extra: Mapping[str, int] | None) -> None:
    r = vcpu.get_regs()
    r.rip = entry
    r.rsp = stack
    r.rflags = RFLAGS_RESERVED
    for name, value in (extra or {}).items():
        setattr(r, name, value)
    vcpu.set_regs(r)
