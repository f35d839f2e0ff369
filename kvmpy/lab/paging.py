"""Lab 2, memory virtualization: a guest's page tables, KVM's MMU, one translation, dirty logging.

The guest kernel builds K address spaces (each a 4-level tree whose top
entry 0 is the shared identity map and entry 1 maps N user pages at
512 GiB onto N frames of its own), then for R rounds switches CR3 to each
space and runs user code (CPL3) that writes one byte to each of its N
pages; a privileged `hlt` brings it back to the kernel (#GP) for the next
switch. kvmpy marks the phases (tables built, every page touched once,
touched again) and reads KVM's MMU counters from the stats fds at each.

With EPT/NPT the guest's page tables are the CPU's business: a first
touch of a guest-physical page is one EPT violation (pf_fixed), CR3
switches do not exit, and a TLB miss walks both dimensions in hardware.
With shadow paging (this backend, or KVM with ept=0) KVM keeps a shadow
table per guest table it has seen, write-protects the guest's tables
(mmu_pte_write, mmu_flooded), and fills shadow entries on guest faults.

Then one address is translated step by step, GVA -> GPA by kvmpy's walk
of the guest's tables next to KVM_TRANSLATE, GPA -> HVA by the memory
slot, and the data frames' slot, created with dirty logging, says which
pages the guest wrote (KVM_GET_DIRTY_LOG).
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..kvm import Kvm
from ..memory import GuestMemory
from ..platform import Backend, detect_backend
from ..stats.kvmstats import StatsFd, delta
from ..tiny import Guest
from ..x86.modes import USER_CODE64_SEL, USER_DATA_SEL
from .common import DONE_PORT, USER_STACK, cpl_guest, run_until_done, wire_done
from .report import LabResult, LabTable

PHASE_PORT = 0xF6
PT_BASE = 0x20_0000  # address space k's PML4, PDPT, PD, PT at PT_BASE + k * 0x4000 + 0/0x1000/0x2000/0x3000
DATA = 0x100_0000  # the data frames: a dirty-logged slot of its own
USER_VA = 0x80_0000_0000  # 512 GiB: PML4 entry 1
BOOT_PML4 = 0x9000  # the identity map tiny guests start with (kvmpy/boot/layout.py)
ROUNDS = 3
GP_HANDLER = 0x400
VM_COUNTERS = ("mmu_pte_write", "mmu_shadow_zapped", "mmu_cache_miss", "mmu_flooded", "mmu_pde_zapped",
               "mmu_recycled", "mmu_unsync", "remote_tlb_flush")
VCPU_COUNTERS = ("pf_fixed", "pf_taken", "pf_guest", "pf_spurious", "pf_emulate", "tlb_flush", "invlpg", "exits")
PHASES = ("build tables", "first touch", "touch again")


def guest_source(pages: int, spaces: int, rounds: int = ROUNDS) -> str:
    return f"""
    xor %r9, %r9                    # k: build address space k's tables
2:  mov %r9, %rax
    shl $14, %rax
    add ${PT_BASE:#x}, %rax         # rax = PML4_k
    mov {BOOT_PML4:#x}, %rdx
    mov %rdx, (%rax)                # PML4_k[0] = the identity map's PDPT (shared)
    lea 0x1007(%rax), %rdx
    mov %rdx, 8(%rax)               # PML4_k[1] = PDPT_k (present, writable, user)
    lea 0x2007(%rax), %rdx
    mov %rdx, 0x1000(%rax)          # PDPT_k[0] = PD_k
    lea 0x3007(%rax), %rdx
    mov %rdx, 0x2000(%rax)          # PD_k[0] = PT_k
    mov %r9, %rdx
    imul ${pages * 4096}, %rdx
    add ${DATA | 7:#x}, %rdx        # first frame of space k
    lea 0x3000(%rax), %rdi
    mov ${pages}, %rcx
3:  mov %rdx, (%rdi)                # PT_k[i] = frame k*N + i
    add $4096, %rdx
    add $8, %rdi
    dec %rcx
    jnz 3b
    inc %r9
    cmp ${spaces}, %r9
    jne 2b
    out %al, ${PHASE_PORT:#x}       # phase: tables built
    xor %r15, %r15                  # step: round * K + k
next:
    cmp ${spaces}, %r15
    jne 4f
    out %al, ${PHASE_PORT:#x}       # phase: every page touched once
4:  cmp ${spaces * rounds}, %r15
    je finish
    mov %r15, %rax
    xor %edx, %edx
    mov ${spaces}, %rbx
    div %rbx                        # rdx = step % K
    shl $14, %rdx
    add ${PT_BASE:#x}, %rdx
    mov %rdx, %cr3                  # switch address space
    inc %r15
    pushq ${USER_DATA_SEL:#x}
    pushq ${USER_STACK:#x}
    pushq $2
    pushq ${USER_CODE64_SEL:#x}
    pushq $user
    mov ${USER_VA:#x}, %rdi
    mov ${pages}, %rcx
    iretq
finish:
    mov ${BOOT_PML4:#x}, %rax
    mov %rax, %cr3
    out %al, ${DONE_PORT:#x}
5:  hlt
    jmp 5b
user:
1:  movb $1, (%rdi)                 # CPL3: runs natively; a miss is the MMU's (and KVM's) business
    add $4096, %rdi
    dec %rcx
    jnz 1b
    hlt                             # privileged: #GP takes us back to the kernel
.org {GP_HANDLER:#x}
    add $48, %rsp                   # drop the error code and the frame: the next step builds a new one
    jmp next
"""


class Phases:
    """Port PHASE_PORT: at each marker the time and KVM's counters (VM and vCPU stats fds)."""

    def __init__(self, vm_stats: StatsFd, vcpu_stats: StatsFd) -> None:
        self.vm_stats, self.vcpu_stats = vm_stats, vcpu_stats
        self.marks: list[tuple[float, dict[str, Any], dict[str, Any]]] = []

    def mark(self) -> None:
        self.marks.append((time.perf_counter(), self.vm_stats.read(), self.vcpu_stats.read()))

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.mark()


@dataclass
class Phase:
    name: str
    touches: int
    seconds: float
    counters: dict[str, int] = field(default_factory=dict)


@dataclass
class Sweep:
    pages: int
    spaces: int
    phases: list[Phase]
    dirty: list[int]
    dirty_again: list[int]
    pages_4k: int | None


def _build(kvm: Kvm, pages: int, spaces: int) -> Guest:
    regions = {"data": {"gpa": DATA, "size": pages * spaces * 4096, "dirty_log": True}}
    return cpl_guest(kvm, guest_source(pages, spaces), 3, extra_regions=regions)


def measure_sweep(kvm: Kvm, pages: int, spaces: int, *, keep: Any = None) -> Sweep:
    """Run the guest for N=`pages`, K=`spaces`; `keep(guest)` may inspect it before it closes."""
    with _build(kvm, pages, spaces) as g:
        with StatsFd.of(g.vm) as vm_stats, StatsFd.of(g.vcpu) as vcpu_stats:
            phases = Phases(vm_stats, vcpu_stats)
            g.pio.register(PHASE_PORT, 1, phases, "phase marker")
            done = wire_done(g)
            g.make_loop()
            g.vm.get_dirty_log(g.regions["data"])  # start from a clean log
            phases.mark()
            run_until_done(g, done)
            phases.mark()
            vm_desc, vcpu_desc = vm_stats.by_name, vcpu_stats.by_name
            touches = {"build tables": 0, "first touch": pages * spaces,
                       "touch again": pages * spaces * (ROUNDS - 1)}
            out = []
            for name, (a, b) in zip(PHASES, zip(phases.marks, phases.marks[1:])):
                dvm, dvcpu = delta(a[1], b[1], vm_desc), delta(a[2], b[2], vcpu_desc)
                counters = {k: int(dvm[k]) for k in VM_COUNTERS if k in dvm}
                counters.update({k: int(dvcpu[k]) for k in VCPU_COUNTERS if k in dvcpu})
                out.append(Phase(name, touches[name], b[0] - a[0], counters))
            pages_4k = phases.marks[-1][1].get("pages_4k")
        dirty = g.vm.get_dirty_log(g.regions["data"])
        dirty_again = g.vm.get_dirty_log(g.regions["data"])
        if keep is not None:
            keep(g)
        return Sweep(pages, spaces, out, dirty, dirty_again, int(pages_4k) if pages_4k is not None else None)


@dataclass
class Step:
    level: str
    table: int  # GPA of the table read
    index: int
    entry: int

    @property
    def flags(self) -> str:
        bits = [("P", 0), ("RW", 1), ("US", 2), ("A", 5), ("D", 6), ("PS", 7)]
        return " ".join(n for n, b in bits if self.entry >> b & 1)


def walk_steps(mem: GuestMemory, gva: int, cr3: int) -> tuple[list[Step], int]:
    """The 4-level walk of `gva` from `cr3`, one step per table read; (steps, GPA)."""
    steps = []
    table = cr3 & ~0xFFF
    for level, shift in (("PML4", 39), ("PDPT", 30), ("PD", 21), ("PT", 12)):
        index = (gva >> shift) & 0x1FF
        entry = mem.read_u64(table + index * 8)
        steps.append(Step(level, table, index, entry))
        if not entry & 1:
            raise ValueError(f"GVA {gva:#x}: {level} entry {index} not present")
        frame = entry & 0x000F_FFFF_FFFF_F000
        if level in ("PDPT", "PD") and entry & 0x80:
            return steps, (frame & ~((1 << shift) - 1)) | (gva & ((1 << shift) - 1))
        table = frame
    return steps, table | (gva & 0xFFF)


def translation(g: Guest, pages: int, spaces: int) -> LabTable:
    """One address of the last address space, step by step, kvmpy's walk next to KVM's."""
    k = spaces - 1
    page = min(5, pages - 1)
    gva = USER_VA + page * 4096 + 0x123
    cr3 = PT_BASE + k * 0x4000
    steps, gpa = walk_steps(g.mem, gva, cr3)
    s = g.vcpu.get_sregs()
    s.cr3 = cr3  # KVM_TRANSLATE walks the tables the vCPU's CR3 names
    g.vcpu.set_sregs(s)
    kvm_gpa = g.vcpu.translate(gva)
    region = g.mem.region_at(gpa)
    assert region is not None
    hva = region.host_address + (gpa - region.gpa)
    t = LabTable(f"GVA {gva:#x} (address space {k}, page {page}) -> GPA -> HVA",
                 ["step", "reads", "index", "entry", "flags", "gives"])
    for st in steps:
        t.add(f"{st.level} (GVA bits {_bits(st.level)})", f"GPA {st.table + st.index * 8:#x}", st.index,
              f"{st.entry:#x}", st.flags, f"{st.entry & 0x000F_FFFF_FFFF_F000:#x}")
    t.add("+ offset (GVA bits 11..0)", "-", gva & 0xFFF, "-", "", f"GPA {gpa:#x}")
    t.add("KVM_TRANSLATE", "KVM's walk", "-", "-", "", f"GPA {kvm_gpa:#x}" if kvm_gpa is not None else "unmapped")
    t.add("memory slot", f"slot {region.slot} at GPA {region.gpa:#x}", "-", "-", "",
          f"HVA {hva:#x} (+{gpa - region.gpa:#x})")
    # The guest wrote 1 to the first byte of each page: read it back through the host mapping.
    t.add("host byte at the page's HVA", f"HVA {hva & ~0xFFF:#x}", "-", "-", "", ctypes.string_at(hva & ~0xFFF, 1)[0])
    return t


def _bits(level: str) -> str:
    return {"PML4": "47..39", "PDPT": "38..30", "PD": "29..21", "PT": "20..12"}[level]


def host_mmu(backend: Backend, sys_module: str = "/sys/module") -> str:
    """"EPT", "NPT" or "shadow paging": what KVM uses for guest memory here (kvm_intel's ept, kvm_amd's npt)."""
    if backend in (Backend.VMX, Backend.SVM):
        name, param = ("kvm_intel", "ept") if backend is Backend.VMX else ("kvm_amd", "npt")
        try:
            with open(f"{sys_module}/{name}/parameters/{param}") as f:
                on = f.read().strip() in ("Y", "1")
        except OSError:
            on = True  # the module's default when the parameter cannot be read
        if on:
            return param.upper()
    return "shadow paging"


def run(kvm: Kvm, quick: bool = False) -> LabResult:
    backend = detect_backend()
    result = LabResult("memory", "memory virtualization: page tables, the MMU, dirty logging", backend.value, quick)
    grid = [(16, 1), (64, 1), (256, 1), (64, 4)] if quick else \
        [(n, k) for k in (1, 2, 4, 8) for n in (16, 64, 256, 512)]
    sweeps = []
    kept: dict[str, Any] = {}
    for pages, spaces in grid:
        last = (pages, spaces) == grid[-1]
        keep = (lambda g, p=pages, k=spaces: kept.update(translation=translation(g, p, k))) if last else None
        sweeps.append(measure_sweep(kvm, pages, spaces, keep=keep))
    cols = ["N pages", "K spaces", "phase", "touches", "ns/touch", *VCPU_COUNTERS[:4], "tlb_flush",
            "mmu_pte_write", "mmu_shadow_zapped", "mmu_cache_miss", "mmu_flooded"]
    table = LabTable(f"K address spaces of N user pages each, touched in {ROUNDS} rounds; KVM's MMU counters "
                     "per phase", cols)
    for sw in sweeps:
        for ph in sw.phases:
            c = ph.counters
            table.add(sw.pages, sw.spaces, ph.name, ph.touches,
                      ph.seconds * 1e9 / ph.touches if ph.touches else None,
                      *(c.get(k) for k in (*VCPU_COUNTERS[:4], "tlb_flush", "mmu_pte_write", "mmu_shadow_zapped",
                                            "mmu_cache_miss", "mmu_flooded")))
    result.tables.append(table)
    result.tables.append(kept["translation"])
    dirty = LabTable("dirty-page logging of the data slot (KVM_GET_DIRTY_LOG)",
                     ["N pages", "K spaces", "pages written", "dirty after the run", "dirty on the next call",
                      "pages_4k (VM, instant)"])
    for sw in sweeps:
        dirty.add(sw.pages, sw.spaces, sw.pages * sw.spaces, len(sw.dirty), len(sw.dirty_again), sw.pages_4k)
    result.tables.append(dirty)
    mmu = host_mmu(backend)
    result.notes.append(f"this host's MMU virtualization: {mmu}: " + (
        "the CPU walks the guest's tables and KVM's in two dimensions; KVM fills EPT/NPT entries once per "
        "guest-physical page (pf_fixed)" if mmu.startswith(("EPT", "NPT")) else
        "KVM write-protects the guest's page tables and fills shadow entries on faults (mmu_pte_write, pf_fixed)"))
    zero = sorted({k for sw in sweeps for ph in sw.phases for k, v in ph.counters.items() if v == 0}
                  - {k for sw in sweeps for ph in sw.phases for k, v in ph.counters.items() if v})
    if zero:
        result.notes.append("counters that stayed 0 in every run on this backend: " + ", ".join(zero))
    result.series = {"sweeps": [{"pages": sw.pages, "spaces": sw.spaces, "dirty": len(sw.dirty),
                                 "phases": {ph.name: {"touches": ph.touches, "seconds": ph.seconds,
                                                      "counters": ph.counters} for ph in sw.phases}}
                                for sw in sweeps]}
    return result


def plot(result: LabResult, directory: Path) -> list[Path]:
    from .plots import line_chart

    sweeps = result.series["sweeps"]
    paths = []
    for phase in ("first touch", "touch again"):
        series: dict[str, list[float]] = {}
        xs = sorted({s["pages"] for s in sweeps})
        for k in sorted({s["spaces"] for s in sweeps}):
            by_n = {s["pages"]: s["phases"][phase] for s in sweeps if s["spaces"] == k}
            if len(by_n) == len(xs):
                series[f"K={k} address spaces"] = [by_n[n]["seconds"] * 1e9 / by_n[n]["touches"] for n in xs]
        if not series:
            continue
        name = phase.replace(" ", "_")
        paths.append(line_chart(directory / f"memory_{name}.png", xs, series, xlabel="N pages per address space",
                                ylabel="ns per page touch", logx=True,
                                title=f"lab memory ({result.backend}): {phase}, time per page"))
    return paths
