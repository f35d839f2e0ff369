"""Decoding the instruction at a guest's RIP, with capstone, for the completion layer.

`Decoder.decode(code, bits)` returns an `Instruction`: mnemonic, length,
operands (registers, immediates, memory operands with base/index/scale/
displacement/segment) and what the instruction touches, cached by
(bits, bytes) because a guest fails on the same few instructions again and
again. `effective_address()` computes a memory operand's linear address from
KVM's registers, as the CPU's address generation does (Intel SDM vol. 1,
3.7.5 "Specifying an Offset"; vol. 3A, 3.4.4 segment bases in 64-bit mode).

Capstone 5 does not know a few recent instructions; `RAW_INSTRUCTIONS`
names them by their bytes so they can still be completed and reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import capstone
from capstone import x86 as cs_x86

_MODES = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}

# Instructions capstone 5 cannot decode: (bytes, bits or 0 for any) -> mnemonic.
RAW_INSTRUCTIONS: dict[bytes, str] = {
    b"\x0f\x01\xfd": "rdpru",  # AMD APM vol. 3: RDPRU, 0F 01 FD
}

# Capstone groups and register-name prefixes that mean x87/MMX/SSE/AVX state is used.
_FPU_GROUPS = {"sse1", "sse2", "sse3", "ssse3", "sse41", "sse42", "sse4a", "aes", "pclmul", "sha",
               "avx", "avx2", "avx512", "fma", "fma4", "f16c", "mmx", "3dnow", "fpu", "xop", "gfni",
               "vaes", "vpclmulqdq"}
_FPU_REGS = ("xmm", "ymm", "zmm", "st", "mm", "fp", "mxcsr", "fpsw", "fpcw")
_FPU_MNEMONICS = {"fwait", "wait", "fxsave", "fxsave64", "fxrstor", "fxrstor64", "xsave", "xsave64",
                  "xsaveopt", "xsaveopt64", "xsavec", "xsavec64", "xsaves", "xsaves64", "xrstor",
                  "xrstor64", "xrstors", "xrstors64", "ldmxcsr", "stmxcsr", "vldmxcsr", "vstmxcsr", "emms"}
# Read-modify-write memory instructions: a not-present fault reports W=1 (SDM 4.7: the
# access is a write), though capstone marks some memory operands read-only.
_RMW = {"cmpxchg", "cmpxchg8b", "cmpxchg16b", "xadd", "xchg", "add", "adc", "sub", "sbb", "and", "or",
        "xor", "inc", "dec", "neg", "not", "btc", "btr", "bts", "shl", "shr", "sar", "rol", "ror", "rcl",
        "rcr", "movbe", "stosb", "stosw", "stosd", "stosq", "movsb", "movsw", "movsd", "movsq"}


@dataclass(frozen=True)
class Fault:
    """An exception a completed instruction raises instead of finishing (to inject)."""

    vector: int
    error_code: int | None = None
    cr2: int | None = None


@dataclass(frozen=True)
class MemOperand:
    """A memory operand as the CPU's address generation sees it."""

    segment: str | None  # explicit segment override, or None for the default
    base: str | None
    index: str | None
    scale: int
    disp: int
    size: int
    read: bool
    written: bool


@dataclass(frozen=True)
class Instruction:
    """One decoded instruction."""

    mnemonic: str
    op_str: str
    length: int
    bits: int
    code: bytes  # exactly `length` bytes
    groups: frozenset[str]
    regs: tuple[str, ...]  # register operands, in capstone's (Intel) order
    imms: tuple[int, ...]
    mems: tuple[MemOperand, ...]
    regs_read: frozenset[str]
    regs_written: frozenset[str]
    address_size: int  # 16, 32 or 64
    prefixes: tuple[int, ...]

    @property
    def text(self) -> str:
        """The disassembly, e.g. 'lock cmpxchg16b xmmword ptr [rax]'."""
        return f"{self.mnemonic} {self.op_str}".strip()

    @property
    def base_mnemonic(self) -> str:
        """The mnemonic without lock/rep prefixes."""
        return self.mnemonic.split()[-1]

    @property
    def touches_fpu(self) -> bool:
        """True when x87/MMX/SSE/AVX state must be copied in and out to execute it."""
        if self.groups & _FPU_GROUPS or self.base_mnemonic in _FPU_MNEMONICS:
            return True
        return any(r.startswith(_FPU_REGS) for r in self.regs_read | self.regs_written)

    @property
    def writes_memory(self) -> bool:
        return any(m.written for m in self.mems) or (bool(self.mems) and self.base_mnemonic in _RMW)


class Decoder:
    """Capstone decoders for 16/32/64-bit code and a cache of decoded instructions."""

    def __init__(self, cache_size: int = 4096) -> None:
        self._cs: dict[int, capstone.Cs] = {}
        for bits, mode in _MODES.items():
            md = capstone.Cs(capstone.CS_ARCH_X86, mode)
            md.detail = True
            self._cs[bits] = md
        self._cache: dict[tuple[int, bytes], Instruction | None] = {}
        self.cache_size = cache_size
        self.hits = 0
        self.misses = 0

    def decode(self, code: bytes, bits: int) -> Instruction | None:
        """The first instruction of `code` in `bits`-bit mode, or None if it is not decodable."""
        key = (bits, bytes(code[:15]))
        try:
            insn = self._cache[key]
            self.hits += 1
            return insn
        except KeyError:
            pass
        self.misses += 1
        insn = self._decode(key[1], bits)
        if len(self._cache) >= self.cache_size:
            self._cache.clear()
        self._cache[key] = insn
        return insn

    def disassemble(self, code: bytes, bits: int) -> str | None:
        """Text of the first instruction, for error messages."""
        insn = self.decode(code, bits) if code else None
        return insn.text if insn is not None else None

    def _decode(self, code: bytes, bits: int) -> Instruction | None:
        for raw, mnemonic in RAW_INSTRUCTIONS.items():
            if code.startswith(raw):
                return Instruction(mnemonic, "", len(raw), bits, raw, frozenset(), (), (), (),
                                   frozenset(), frozenset(), bits, ())
        md = self._cs[bits]
        try:
            ci = next(md.disasm(code, 0, 1))
        except StopIteration:
            return None
        regs: list[str] = []
        imms: list[int] = []
        mems: list[MemOperand] = []
        for op in ci.operands:
            if op.type == cs_x86.X86_OP_REG:
                regs.append(ci.reg_name(op.reg))
            elif op.type == cs_x86.X86_OP_IMM:
                imms.append(op.imm)
            elif op.type == cs_x86.X86_OP_MEM:
                m = op.mem
                mems.append(MemOperand(
                    segment=ci.reg_name(m.segment) if m.segment else None,
                    base=ci.reg_name(m.base) if m.base else None,
                    index=ci.reg_name(m.index) if m.index else None,
                    scale=m.scale, disp=m.disp, size=op.size,
                    read=bool(op.access & capstone.CS_AC_READ) or not op.access,
                    written=bool(op.access & capstone.CS_AC_WRITE)))
        try:
            read, written = ci.regs_access()
        except capstone.CsError:
            read, written = [], []
        prefixes = tuple(p for p in ci.prefix if p)
        addr_size = bits
        if 0x67 in prefixes:
            addr_size = {16: 32, 32: 16, 64: 32}[bits]
        return Instruction(
            mnemonic=ci.mnemonic, op_str=ci.op_str, length=ci.size, bits=bits, code=bytes(ci.bytes),
            groups=frozenset(ci.group_name(g) for g in ci.groups),
            regs=tuple(regs), imms=tuple(imms), mems=tuple(mems),
            regs_read=frozenset(ci.reg_name(r) for r in read),
            regs_written=frozenset(ci.reg_name(r) for r in written),
            address_size=addr_size, prefixes=prefixes)


# -- registers by capstone name -> (struct kvm_regs field, shift, width in bits) -----------

_GPR64 = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp"] + [f"r{i}" for i in range(8, 16)]
REGISTERS: dict[str, tuple[str, int, int]] = {}
for _r in _GPR64:
    REGISTERS[_r] = (_r, 0, 64)
for _r in ("ax", "bx", "cx", "dx"):
    REGISTERS["e" + _r] = ("r" + _r, 0, 32)
    REGISTERS[_r] = ("r" + _r, 0, 16)
    REGISTERS[_r[0] + "l"] = ("r" + _r, 0, 8)
    REGISTERS[_r[0] + "h"] = ("r" + _r, 8, 8)
for _r in ("si", "di", "sp", "bp"):
    REGISTERS["e" + _r] = ("r" + _r, 0, 32)
    REGISTERS[_r] = ("r" + _r, 0, 16)
    REGISTERS[_r + "l"] = ("r" + _r, 0, 8)
for _i in range(8, 16):
    REGISTERS[f"r{_i}d"] = (f"r{_i}", 0, 32)
    REGISTERS[f"r{_i}w"] = (f"r{_i}", 0, 16)
    REGISTERS[f"r{_i}b"] = (f"r{_i}", 0, 8)
REGISTERS["rip"] = ("rip", 0, 64)
REGISTERS["eip"] = ("rip", 0, 32)
REGISTERS["ip"] = ("rip", 0, 16)


def read_register(regs: Any, name: str) -> int:
    """The value of general register `name` ('eax', 'r9b', 'ah', ...) from a struct kvm_regs."""
    field, shift, width = REGISTERS[name]
    return (getattr(regs, field) >> shift) & ((1 << width) - 1)


def write_register(regs: Any, name: str, value: int) -> None:
    """Write `name` as the CPU does: 32-bit writes zero-extend, 8/16-bit writes merge."""
    field, shift, width = REGISTERS[name]
    mask = (1 << width) - 1
    if width == 32:
        setattr(regs, field, value & mask)
    elif width == 64:
        setattr(regs, field, value & mask)
    else:
        old = getattr(regs, field)
        setattr(regs, field, (old & ~(mask << shift)) | ((value & mask) << shift))


_DEFAULT_SS = {"rsp", "esp", "sp", "rbp", "ebp", "bp"}


def effective_address(insn: Instruction, mem: MemOperand, regs: Any, sregs: Any) -> int:
    """The linear address of memory operand `mem` of `insn` executed at regs.rip."""
    offset = mem.disp
    if mem.base is not None:
        if mem.base in ("rip", "eip"):
            offset += regs.rip + insn.length
        else:
            offset += read_register(regs, mem.base)
    if mem.index is not None:
        offset += read_register(regs, mem.index) * mem.scale
    offset &= (1 << insn.address_size) - 1
    seg = mem.segment or ("ss" if mem.base in _DEFAULT_SS else "ds")
    if insn.bits == 64 and seg not in ("fs", "gs"):
        return offset  # CS/DS/ES/SS bases are treated as 0 in 64-bit mode
    base = getattr(sregs, seg).base
    linear = base + offset
    return linear if insn.bits == 64 else linear & 0xFFFF_FFFF
