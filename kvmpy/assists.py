"""Userspace completion of instructions a KVM backend could not emulate.

Some backends (software KVM such as PVM, nested setups, older kernels) stop
with KVM_EXIT_INTERNAL_ERROR / EMULATION on instructions real hardware runs
without exiting. `Assists.handle` completes such an instruction so the guest
goes on as if the CPU had run it:

1. Fetch: the bytes KVM reported, or else the bytes at CS.base + RIP read
   through the guest's page tables (`GuestMemory.translate`).
2. Decode with capstone (`kvmpy.x86.decode`), cached by bytes. Bytes that
   decode to no instruction get #UD, as on the CPU.
3. Complete, by one of three paths:
   - events by injection (KVM_SET_VCPU_EVENTS): `int3` -> #BP and `into`
     -> #OF as exceptions, `int n` -> vector n as an interrupt, each with
     RIP advanced past the instruction (the return address the handler
     sees, as for a trap-like software interrupt); `int n` first gets the
     gate checks a software interrupt makes (#NP, #GP with the IDT error code);
   - simple state changes directly: `clac`/`stac` flip RFLAGS.AC;
     `clflush`/`clflushopt`/`clwb` are no-ops on guest RAM (after the
     operand's page walk, which can #PF); `xgetbv` reads KVM_GET_XCRS;
     `invpcid`/`invlpg` check their operands like the CPU and then force a
     TLB flush (see `flush_tlb`); `fwait` raises a pending x87 exception
     or does nothing; `rdpru` is #UD when the CPU has no RDPRU; `rdtscp`
     reads the guest's IA32_TSC and TSC_AUX with KVM_GET_MSRS; VEX moves of
     whole XMM/YMM registers (`vmovdqa`, `vmovdqu`, `vmovaps`, ... and the
     non-temporal forms) and `vzeroupper`/`vzeroall` work on the XSAVE image
     (KVM_GET_XSAVE / KVM_SET_XSAVE), since Unicorn has no AVX;
   - everything else once in Unicorn over the guest's own memory
     (`kvmpy.x86.emulate`), MMIO operands going to `mmio_bus`.
4. A fault raised while completing (#PF on the memory operand, #GP, #UD ...)
   is injected as the CPU would raise it: RIP unchanged, error code, CR2.

What cannot be completed raises `GuestError` naming vCPU, RIP, CPU mode, the
bytes and their disassembly: the VM stops with a reason, never hangs.
`completed` counts completions by instruction, `faults` the faults injected,
`seconds` the time spent per instruction (cost = seconds / completed).
Each completed exit is named "completion of <mnemonic>" (`Exit.handled_as`)
for the exit accounting.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, Callable

from ._kvm import ffi, lib
from .errors import GuestError, GuestMemoryError
from .exits import InternalErrorExit
from .x86.decode import Decoder, Fault, Instruction, effective_address, read_register

# A hook sees the raw exit first (before any register ioctl) and returns True if it handled it.
Hook = Callable[[Any, InternalErrorExit], bool]

DB_VECTOR = 1
BP_VECTOR = 3
OF_VECTOR = 4
UD_VECTOR = 6
NM_VECTOR = 7
GP_VECTOR = 13
PF_VECTOR = 14
MF_VECTOR = 16

RFLAGS_TF = 1 << 8
RFLAGS_OF = 1 << 11
RFLAGS_AC = 1 << 18
CR0_MP = 1 << 1
CR0_TS = 1 << 3
CR4_PGE = 1 << 7
CR4_PCIDE = 1 << 17
CR4_OSXSAVE = 1 << 18
FSW_ES = 1 << 7

_BITS = {"real": 16, "protected16": 16, "protected32": 32, "compat": 32, "long64": 64}


def handled_as(mnemonic: str) -> str:
    """What the exit accounting calls an emulation failure completed here ("completion of int3")."""
    return f"completion of {mnemonic}"


class CannotComplete(Exception):
    """This instruction, in this state, has no completion: the VM must stop."""


# A direct completion updates the vCPU (and returns None) or returns the Fault to inject.
Completion = Callable[["Assists", Any, Any, Any, Instruction], "Fault | None"]


def flush_tlb(vcpu: Any, sregs: Any) -> None:
    """Make KVM drop every cached translation of this vCPU.

    The KVM API has no "flush the guest TLB" call. KVM_SET_SREGS resets the
    vCPU's MMU context and flushes its TLB when CR0, CR3, CR4 or EFER change
    (`__set_sregs_common`: mmu_reset_needed), but not for an identical state.
    So set the state once with CR4.PGE toggled (a change that is always
    legal and by itself flushes global pages too), then the real state:
    two ioctls, the guest sees no difference.
    """
    toggled = ffi.new("struct kvm_sregs *")
    ffi.memmove(toggled, sregs, ffi.sizeof("struct kvm_sregs"))
    toggled.cr4 ^= CR4_PGE
    vcpu.set_sregs(toggled)
    vcpu.set_sregs(sregs)


def _advance(vcpu: Any, regs: Any, insn: Instruction) -> None:
    regs.rip += insn.length
    if insn.bits != 64:
        regs.rip &= 0xFFFF_FFFF if insn.bits == 32 else 0xFFFF
    vcpu.set_regs(regs)


def _cpl(sregs: Any) -> int:
    return sregs.cs.dpl if sregs.cr0 & 1 else 0


# -- event instructions ----------------------------------------------------------------

def _int3(a: Assists, vcpu: Any, regs: Any, sregs: Any, insn: Instruction) -> Fault | None:
    _advance(vcpu, regs, insn)
    vcpu.inject_exception(BP_VECTOR)  # a trap: the frame's RIP is the next instruction
    return None


def _into(a: Assists, vcpu: Any, regs: Any, sregs: Any, insn: Instruction) -> Fault | None:
    if insn.bits == 64:
        return Fault(UD_VECTOR)
    _advance(vcpu, regs, insn)
    if regs.rflags & RFLAGS_OF:
        vcpu.inject_exception(OF_VECTOR)
    return None


def _int_n(a: Assists, vcpu: Any, regs: Any, sregs: Any, insn: Instruction) -> Fault | None:
    vector = insn.imms[0] & 0xFF
    if sregs.cr0 & 1:
        fault = a.check_gate(vcpu, sregs, vector)
        if fault is not None:
            return fault
    _advance(vcpu, regs, insn)
    # Injected as an event with RIP already past `int n`: the handler's frame
    # holds the next instruction and no error code is pushed, as for `int n`
    # (an exception injection would push one for vectors 8, 10-14, 17).
    ev = vcpu.get_vcpu_events()
    ev.interrupt.injected = 1
    ev.interrupt.nr = vector
    ev.interrupt.soft = 0
    ev.flags = 0
    vcpu.set_vcpu_events(ev)
    return None


# -- simple state changes ---------------------------------------------------------------

def _clac(a: Assists, vcpu: Any, regs: Any, sregs: Any, insn: Instruction) -> Fault | None:
    if _cpl(sregs):
        return Fault(UD_VECTOR)
    regs.rflags &= ~RFLAGS_AC
    _advance(vcpu, regs, insn)
    return None


def _stac(a: Assists, vcpu: Any, regs: Any, sregs: Any, insn: Instruction) -> Fault | None:
    if _cpl(sregs):
        return Fault(UD_VECTOR)
    regs.rflags |= RFLAGS_AC
    _advance(vcpu, regs, insn)
    return None


def _cache_flush(a: Assists, vcpu: Any, regs: Any, sregs: Any, insn: Instruction) -> Fault | None:
    # Guest RAM is ordinary coherent host memory: nothing to write back. The
    # operand is still translated, so an unmapped line faults as on the CPU.
    fault = a.check_operand(regs, sregs, insn, write=False)
    if fault is not None:
        return fault
    _advance(vcpu, regs, insn)
    return None


def _xgetbv(a: Assists, vcpu: Any, regs: Any, sregs: Any, insn: Instruction) -> Fault | None:
    if not sregs.cr4 & CR4_OSXSAVE:
        return Fault(UD_VECTOR)
    index = regs.rcx & 0xFFFF_FFFF
    xcr0 = vcpu.get_xcrs().get(0, 1)
    if index == 0:
        value = xcr0
    elif index == 1 and a.cpuid(vcpu, 0xD, 1)[0] & (1 << 2):
        # XINUSE: the XSTATE_BV of the state KVM holds (XSAVE header at 512).
        xinuse = int.from_bytes(vcpu.get_xsave()[512:520], "little")
        value = xcr0 & xinuse
    else:
        return Fault(GP_VECTOR, 0)
    regs.rax = value & 0xFFFF_FFFF
    regs.rdx = value >> 32
    _advance(vcpu, regs, insn)
    return None


def _invpcid(a: Assists, vcpu: Any, regs: Any, sregs: Any, insn: Instruction) -> Fault | None:
    if not a.cpuid(vcpu, 7, 0)[1] & (1 << 10):
        return Fault(UD_VECTOR)  # as KVM on VT-x: "enable INVPCID" follows the guest's CPUID
    if _cpl(sregs):
        return Fault(GP_VECTOR, 0)
    kind = read_register(regs, insn.regs[0])
    linear = effective_address(insn, insn.mems[0], regs, sregs)
    descriptor = a.read_linear(vcpu, sregs, linear, 16)
    if descriptor is None:
        return Fault(PF_VECTOR, a.pf_error_code(linear, sregs, write=False), linear)
    pcid = int.from_bytes(descriptor[:8], "little")
    address = int.from_bytes(descriptor[8:], "little")
    if kind > 3 or pcid >> 12:
        return Fault(GP_VECTOR, 0)
    if kind == 0 and not _canonical(address):
        return Fault(GP_VECTOR, 0)
    if kind in (0, 1) and not sregs.cr4 & CR4_PCIDE and pcid & 0xFFF:
        return Fault(GP_VECTOR, 0)
    _advance(vcpu, regs, insn)
    flush_tlb(vcpu, sregs)
    return None


def _invlpg(a: Assists, vcpu: Any, regs: Any, sregs: Any, insn: Instruction) -> Fault | None:
    if _cpl(sregs):
        return Fault(GP_VECTOR, 0)
    _advance(vcpu, regs, insn)
    flush_tlb(vcpu, sregs)
    return None


def _fwait(a: Assists, vcpu: Any, regs: Any, sregs: Any, insn: Instruction) -> Fault | None:
    if sregs.cr0 & CR0_MP and sregs.cr0 & CR0_TS:
        return Fault(NM_VECTOR)
    if vcpu.get_fpu().fsw & FSW_ES:
        return Fault(MF_VECTOR)  # an unmasked x87 exception is pending
    _advance(vcpu, regs, insn)
    return None


def _rdpru(a: Assists, vcpu: Any, regs: Any, sregs: Any, insn: Instruction) -> Fault | None:
    if not a.cpuid(vcpu, 0x8000_0008, 0)[1] & (1 << 4):
        return Fault(UD_VECTOR)  # AMD APM: #UD when CPUID Fn8000_0008_EBX[RDPRU] = 0
    raise CannotComplete("RDPRU with CPUID RDPRU set: its registers (MPERF/APERF) are not modelled")


MSR_IA32_TSC = 0x10
MSR_TSC_AUX = 0xC000_0103


def _rdtscp(a: Assists, vcpu: Any, regs: Any, sregs: Any, insn: Instruction) -> Fault | None:
    # The guest's TSC and TSC_AUX as KVM keeps them (Unicorn's own clock would be wrong).
    if not a.cpuid(vcpu, 0x8000_0001, 0)[3] & (1 << 27):
        return Fault(UD_VECTOR)  # as KVM: RDTSCP follows the guest's CPUID
    if sregs.cr4 & (1 << 2) and _cpl(sregs):  # CR4.TSD at CPL > 0
        return Fault(GP_VECTOR, 0)
    msrs = vcpu.get_msrs([MSR_IA32_TSC, MSR_TSC_AUX])
    tsc = msrs.get(MSR_IA32_TSC)
    if tsc is None:
        raise CannotComplete("KVM_GET_MSRS gave no IA32_TSC")
    regs.rax, regs.rdx = tsc & 0xFFFF_FFFF, tsc >> 32
    regs.rcx = msrs.get(MSR_TSC_AUX, 0) & 0xFFFF_FFFF
    _advance(vcpu, regs, insn)
    return None


# VEX moves of whole XMM/YMM registers, completed on the XSAVE image KVM keeps
# (Unicorn 2.1 has no AVX). Aligned forms #GP(0) on a misaligned operand.
_AVX_MOVES = {"vmovdqa": True, "vmovdqu": False, "vmovaps": True, "vmovups": False, "vmovapd": True,
              "vmovupd": False, "vmovntdq": True, "vmovntdqa": True, "vmovntps": True, "vmovntpd": True}
_XSAVE_XMM, _XSAVE_HDR, _XSAVE_YMM_HI = 160, 512, 576
XCR0_SSE_AVX = 0x6


def _avx_state(a: Assists, vcpu: Any, sregs: Any) -> tuple[bytearray | None, Fault | None]:
    if not sregs.cr4 & CR4_OSXSAVE or vcpu.get_xcrs().get(0, 1) & XCR0_SSE_AVX != XCR0_SSE_AVX:
        return None, Fault(UD_VECTOR)
    if sregs.cr0 & CR0_TS:
        return None, Fault(NM_VECTOR)
    xs = bytearray(vcpu.get_xsave())
    bv = int.from_bytes(xs[_XSAVE_HDR:_XSAVE_HDR + 8], "little")
    if not bv & 2:
        xs[_XSAVE_XMM:_XSAVE_XMM + 256] = bytes(256)
    if not bv & 4:
        xs[_XSAVE_YMM_HI:_XSAVE_YMM_HI + 256] = bytes(256)
    xs[_XSAVE_HDR:_XSAVE_HDR + 8] = (bv | XCR0_SSE_AVX).to_bytes(8, "little")
    return xs, None


def _vreg_get(xs: bytearray, name: str) -> bytes:
    i = int(name[3:])
    lo = bytes(xs[_XSAVE_XMM + 16 * i:_XSAVE_XMM + 16 * i + 16])
    return lo + bytes(xs[_XSAVE_YMM_HI + 16 * i:_XSAVE_YMM_HI + 16 * i + 16]) if name.startswith("ymm") else lo


def _vreg_set(xs: bytearray, name: str, data: bytes) -> None:
    i = int(name[3:])
    xs[_XSAVE_XMM + 16 * i:_XSAVE_XMM + 16 * i + 16] = data[:16]
    hi = data[16:32] if name.startswith("ymm") else bytes(16)  # VEX.128 zeroes bits 255:128
    xs[_XSAVE_YMM_HI + 16 * i:_XSAVE_YMM_HI + 16 * i + 16] = hi


def _avx_move(a: Assists, vcpu: Any, regs: Any, sregs: Any, insn: Instruction) -> Fault | None:
    if any(not r.startswith(("xmm", "ymm")) or int(r[3:]) > 15 for r in insn.regs):
        raise CannotComplete("only XMM0-15/YMM0-15 operands are modelled")
    xs, fault = _avx_state(a, vcpu, sregs)
    if fault is not None:
        return fault
    assert xs is not None
    width = 32 if any(r.startswith("ymm") for r in insn.regs) else 16
    if insn.mems:
        linear = effective_address(insn, insn.mems[0], regs, sregs)
        if _AVX_MOVES[insn.base_mnemonic] and linear % width:
            return Fault(GP_VECTOR, 0)
        if insn.op_str.startswith(("xmmword", "ymmword")):  # store: memory destination
            if not a.write_linear(sregs, linear, _vreg_get(xs, insn.regs[0])):
                return Fault(PF_VECTOR, a.pf_error_code(linear, sregs, write=True), linear)
        else:
            data = a.read_linear(vcpu, sregs, linear, width)
            if data is None:
                return Fault(PF_VECTOR, a.pf_error_code(linear, sregs, write=False), linear)
            _vreg_set(xs, insn.regs[0], data)
    else:
        _vreg_set(xs, insn.regs[0], _vreg_get(xs, insn.regs[1]))
    vcpu.set_xsave(bytes(xs))
    _advance(vcpu, regs, insn)
    return None


def _vzero(a: Assists, vcpu: Any, regs: Any, sregs: Any, insn: Instruction) -> Fault | None:
    xs, fault = _avx_state(a, vcpu, sregs)
    if fault is not None:
        return fault
    assert xs is not None
    xs[_XSAVE_YMM_HI:_XSAVE_YMM_HI + 256] = bytes(256)
    if insn.base_mnemonic == "vzeroall":
        xs[_XSAVE_XMM:_XSAVE_XMM + 256] = bytes(256)
    vcpu.set_xsave(bytes(xs))
    _advance(vcpu, regs, insn)
    return None


def _canonical(address: int) -> bool:
    top = address >> 47
    return top == 0 or top == (1 << 17) - 1


DIRECT: dict[str, Completion] = {
    "int3": _int3, "into": _into, "int": _int_n,
    "clac": _clac, "stac": _stac,
    "clflush": _cache_flush, "clflushopt": _cache_flush, "clwb": _cache_flush,
    "xgetbv": _xgetbv, "invpcid": _invpcid, "invlpg": _invlpg,
    "fwait": _fwait, "wait": _fwait, "rdpru": _rdpru, "rdtscp": _rdtscp,
    "vzeroall": _vzero, "vzeroupper": _vzero,
    **{m: _avx_move for m in _AVX_MOVES},
}


class Assists:
    """The emulation-failure handler of an exit loop.

    `handle(vcpu, exit)` completes the instruction (True) or raises
    `GuestError`. `memory` (a GuestMemory) is needed for everything that reads
    guest memory or runs in Unicorn; `mmio_bus` serves non-RAM operands of
    instructions completed in Unicorn (without it they read as all ones).
    """

    def __init__(self, memory: Any = None, *, enabled: bool = True, mmio_bus: Any = None) -> None:
        self.memory = memory
        self.enabled = enabled
        self.mmio_bus = mmio_bus
        self.completed: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()  # "mnemonic #vector"
        self.seconds: Counter[str] = Counter()
        self.hooks: list[Hook] = []
        self.direct: dict[str, Completion] = dict(DIRECT)
        self.decoder = Decoder()
        self._executor: Any = None
        self._cpuid: dict[tuple[int, int], tuple[int, int, int, int]] | None = None

    # -- helpers used by the completions -----------------------------------------------

    def read_linear(self, vcpu: Any, sregs: Any, linear: int, size: int) -> bytes | None:
        """`size` bytes at a linear address through the guest's page tables; None if unmapped."""
        if self.memory is None:
            return None
        out = bytearray()
        try:
            while size:
                gpa = self.memory.translate(linear, sregs.cr3, cr0=sregs.cr0, cr4=sregs.cr4, efer=sregs.efer)
                n = min(size, 4096 - (gpa & 0xFFF))
                out += self.memory.read(gpa, n)
                linear, size = linear + n, size - n
        except GuestMemoryError:
            return None
        return bytes(out)

    def write_linear(self, sregs: Any, linear: int, data: bytes) -> bool:
        """Store `data` at a linear address through the page tables; False if a page is unmapped.

        Every page is translated before anything is written, so a fault leaves memory as it was.
        """
        if self.memory is None:
            return False
        pieces = []
        offset = 0
        try:
            while offset < len(data):
                gpa = self.memory.translate(linear + offset, sregs.cr3, cr0=sregs.cr0, cr4=sregs.cr4,
                                            efer=sregs.efer)
                n = min(len(data) - offset, 4096 - (gpa & 0xFFF))
                if not self.memory.is_ram(gpa, n):
                    raise CannotComplete(f"store to non-RAM GPA {gpa:#x} from a directly completed instruction")
                pieces.append((gpa, data[offset:offset + n]))
                offset += n
        except GuestMemoryError:
            return False
        for gpa, piece in pieces:
            self.memory.write(gpa, piece)
        return True

    def pf_error_code(self, linear: int, sregs: Any, *, write: bool) -> int:
        from .x86.emulate import page_fault_error_code
        return page_fault_error_code(self.memory, linear, sregs, write=write)

    def check_operand(self, regs: Any, sregs: Any, insn: Instruction, *, write: bool) -> Fault | None:
        """#PF if the memory operand's page is not mapped (paging on), else None."""
        if not insn.mems or not sregs.cr0 & (1 << 31) or self.memory is None:
            return None
        linear = effective_address(insn, insn.mems[0], regs, sregs)
        try:
            self.memory.translate(linear, sregs.cr3, cr0=sregs.cr0, cr4=sregs.cr4, efer=sregs.efer)
        except GuestMemoryError:
            return Fault(PF_VECTOR, self.pf_error_code(linear, sregs, write=write), linear)
        return None

    def check_gate(self, vcpu: Any, sregs: Any, vector: int) -> Fault | None:
        """The checks of a software interrupt through the protected-mode IDT (SDM vol. 3A, 6.12.1.1).

        Done here because the event is injected as an interrupt: the gate must
        be present (#NP(vector*8+2)), its DPL >= CPL (#GP(vector*8+2)), and its
        code segment present (#NP(selector)). The error codes have EXT = 0.
        """
        long_mode = bool(sregs.efer & (1 << 10))
        size = 16 if long_mode else 8
        idt_error = vector * 8 + 2
        if vector * size + size - 1 > sregs.idt.limit:
            return Fault(GP_VECTOR, idt_error)
        gate = self.read_linear(vcpu, sregs, sregs.idt.base + vector * size, 8)
        if gate is None:
            return None  # the IDT page is not mapped: let KVM's delivery raise what it raises
        if not gate[5] & 0x80:
            return Fault(11, idt_error)  # #NP
        if (gate[5] >> 5) & 3 < _cpl(sregs):
            return Fault(GP_VECTOR, idt_error)
        selector = int.from_bytes(gate[2:4], "little")
        if selector & 4 or selector < 4:
            return None  # LDT or null selector: left to KVM
        desc = self.read_linear(vcpu, sregs, sregs.gdt.base + (selector & ~7), 8)
        if desc is not None and (selector | 7) <= sregs.gdt.limit and not desc[5] & 0x80:
            return Fault(11, selector & 0xFFFC)
        return None

    def cpuid(self, vcpu: Any, function: int, index: int) -> tuple[int, int, int, int]:
        """(eax, ebx, ecx, edx) of the guest's CPUID leaf: the table set on the vCPU, else KVM's."""
        if self._cpuid is None:
            try:
                entries = vcpu.get_cpuid2()
            except Exception:
                entries = []
            if not entries:
                entries = vcpu.vm.system.get_supported_cpuid()
            self._cpuid = {(e.function, e.index): (e.eax, e.ebx, e.ecx, e.edx) for e in entries}
        return self._cpuid.get((function, index)) or self._cpuid.get((function, 0)) or (0, 0, 0, 0)

    @property
    def executor(self) -> Any:
        """The Unicorn executor (created at the first instruction that needs it)."""
        if self._executor is None:
            from .x86.emulate import UnicornExecutor
            self._executor = UnicornExecutor(self.memory, self.mmio_bus)
        return self._executor

    # -- the exit handler ---------------------------------------------------------------

    def instruction_bytes(self, vcpu: Any, exit: InternalErrorExit, regs: Any, sregs: Any) -> bytes:
        """The bytes at the faulting RIP: from KVM if it gave them, else through the guest's page tables."""
        if exit.insn_bytes:
            return exit.insn_bytes
        linear = sregs.cs.base + regs.rip
        for size in (15, 4096 - (linear & 0xFFF)):  # the second try stops at the page end
            data = self.read_linear(vcpu, sregs, linear, min(size, 15))
            if data is not None:
                return data
        return b""

    def attach(self, loop: Any) -> None:
        """Complete the emulation failures of one vCPU loop (its KVM_EXIT_INTERNAL_ERROR handler)."""
        vcpu = loop.vcpu

        def on_internal_error(exit: Any) -> bool:
            self.handle(vcpu, exit)  # completes the instruction or raises GuestError
            if loop.accounting is not None:
                loop.accounting.assists += 1
            return True

        loop.add_handler(lib.KVM_EXIT_INTERNAL_ERROR, on_internal_error)

    def handle(self, vcpu: Any, exit: InternalErrorExit) -> bool:
        for hook in self.hooks:
            if hook(vcpu, exit):
                return True
        start = time.perf_counter()
        regs = vcpu.get_regs()
        sregs = vcpu.get_sregs()
        mode = vcpu.cpu_mode(sregs)
        bits = _BITS[mode]
        code = self.instruction_bytes(vcpu, exit, regs, sregs) if exit.is_emulation_failure else b""
        insn = self.decoder.decode(code, bits) if code else None
        if insn is None and exit.insn_bytes:
            # KVM reports the bytes it fetched before giving up, which can be fewer than
            # the instruction has: read them again through the guest's page tables.
            fetched = self.read_linear(vcpu, sregs, sregs.cs.base + regs.rip, 15)
            if fetched:
                code = fetched
                insn = self.decoder.decode(code, bits)

        def fail(why: str) -> GuestError:
            return GuestError(f"{exit.describe()}: {why}", vcpu=vcpu.id, rip=regs.rip, mode=mode,
                              insn=code or None, disassembly=insn.text if insn else None)

        if not exit.is_emulation_failure:
            raise fail("not an emulation failure")
        if not self.enabled:
            raise fail("instruction completion is off")
        if insn is None and code:
            # Bytes no decoder knows are no instruction: the CPU raises #UD (e.g. MOVBE
            # with a register operand, which this backend's emulator gives up on).
            self.inject(vcpu, sregs, Fault(UD_VECTOR))
            self.faults["(invalid) #6"] += 1
            self.completed["(invalid)"] += 1
            exit.handled_as = handled_as("(invalid)")
            return True
        if insn is None:
            raise fail("the instruction bytes could not be read")
        name = insn.base_mnemonic
        completion = self.direct.get(name)
        try:
            if completion is not None:
                fault = completion(self, vcpu, regs, sregs, insn)
            elif self.memory is None:
                raise CannotComplete("no guest memory given to execute it in Unicorn")
            else:
                from .x86.emulate import UnicornUnsupported
                try:
                    fault = self.executor.execute(vcpu, regs, sregs, insn)
                except UnicornUnsupported as e:
                    raise CannotComplete(str(e)) from e
        except CannotComplete as e:
            raise fail(f"cannot complete '{insn.text}': {e}") from None
        if fault is not None:
            self.inject(vcpu, sregs, fault)
            self.faults[f"{name} #{fault.vector}"] += 1
        elif regs.rflags & RFLAGS_TF and name not in ("int3", "int", "into"):
            vcpu.inject_exception(DB_VECTOR)  # single-step trap after the completed instruction
        self.completed[name] += 1
        self.seconds[name] += time.perf_counter() - start
        exit.handled_as = handled_as(name)
        return True


    def inject(self, vcpu: Any, sregs: Any, fault: Fault) -> None:
        """Deliver `fault` (RIP still at the instruction): CR2 first for #PF, then the exception."""
        if fault.vector == PF_VECTOR and fault.cr2 is not None:
            sregs.cr2 = fault.cr2
            vcpu.set_sregs(sregs)
        vcpu.inject_exception(fault.vector, fault.error_code)

    def cost(self) -> dict[str, float]:
        """Mean seconds per completion, by instruction."""
        return {n: self.seconds[n] / c for n, c in self.completed.items() if c}
