"""The x86 architectural vocabulary: control-register, EFER and RFLAGS bits,
exception vectors, and the CPU mode of a vCPU.

The one place these numbers are written; every other module imports them.
Names are those of the Intel SDM (vol. 3A: 2.5 control registers, 2.2.1
EFER, 2.3 and vol. 1 3.4.3 EFLAGS, 6.3.1 and table 6-1 exceptions) and the
AMD APM vol. 2 (3.1.7 EFER, 8.2 exceptions), which Linux's
arch/x86/include/uapi/asm/processor-flags.h also follows.

A leaf module: it imports nothing from kvmpy, so every layer may use it,
the fd layer (memory.py's page walk) included.

On exit paths, bind the members you test to module globals (`_CR0_PG =
Cr0.PG`): looking a member up on its class costs ~0.3 us, because EnumType
defines `__getattr__`, which sends every class attribute lookup through
Python (scripts/bench_arch.py); the operators themselves cost what int's do.
"""

from __future__ import annotations

import enum
from typing import Any, TypeVar

_F = TypeVar("_F", bound=enum.IntFlag)

# The operators IntFlag adds are Python methods (~1 us each: scripts/bench_arch.py);
# register values are tested against these bits on exit paths, so use int's C operators
# (~25 ns) and get plain ints back. `Cr0(value)` still names the bits of a value.
_INT_OPERATORS = ("__or__", "__and__", "__xor__", "__ror__", "__rand__", "__rxor__", "__invert__")


def _int_arithmetic(cls: type[_F]) -> type[_F]:
    for name in _INT_OPERATORS:
        setattr(cls, name, getattr(int, name))
    return cls


@_int_arithmetic
class Cr0(enum.IntFlag):
    """CR0 (SDM vol. 3A, 2.5)."""

    PE = 1 << 0  # protection enable
    MP = 1 << 1  # monitor coprocessor (WAIT/FWAIT honour TS)
    EM = 1 << 2  # x87 emulation
    TS = 1 << 3  # task switched (lazy FPU: #NM on the next x87/SSE use)
    ET = 1 << 4  # extension type (always 1 since the 486)
    NE = 1 << 5  # native x87 error reporting (#MF, not IRQ 13)
    WP = 1 << 16  # supervisor writes honour read-only pages
    AM = 1 << 18  # alignment mask (with RFLAGS.AC at CPL3: #AC)
    NW = 1 << 29  # not write-through
    CD = 1 << 30  # cache disable
    PG = 1 << 31  # paging


@_int_arithmetic
class Cr4(enum.IntFlag):
    """CR4 (SDM vol. 3A, 2.5)."""

    VME = 1 << 0
    PVI = 1 << 1
    TSD = 1 << 2  # RDTSC at CPL > 0 raises #GP
    DE = 1 << 3
    PSE = 1 << 4  # 4 MiB pages in 32-bit paging
    PAE = 1 << 5
    MCE = 1 << 6
    PGE = 1 << 7  # global pages
    PCE = 1 << 8
    OSFXSR = 1 << 9
    OSXMMEXCPT = 1 << 10
    UMIP = 1 << 11
    LA57 = 1 << 12  # 5-level paging
    VMXE = 1 << 13
    SMXE = 1 << 14
    FSGSBASE = 1 << 16
    PCIDE = 1 << 17
    OSXSAVE = 1 << 18
    KL = 1 << 19  # Key Locker
    SMEP = 1 << 20
    SMAP = 1 << 21
    PKE = 1 << 22
    CET = 1 << 23
    PKS = 1 << 24
    UINTR = 1 << 25
    LAM_SUP = 1 << 28


@_int_arithmetic
class Efer(enum.IntFlag):
    """IA32_EFER, MSR 0xC0000080 (SDM vol. 3A, 2.2.1; AMD APM vol. 2, 3.1.7)."""

    SCE = 1 << 0  # SYSCALL/SYSRET enable
    LME = 1 << 8  # long mode enable (requested)
    LMA = 1 << 10  # long mode active (set by the CPU when paging turns on with LME)
    NXE = 1 << 11  # no-execute page bit
    SVME = 1 << 12  # AMD: SVM enable
    LMSLE = 1 << 13  # AMD: long-mode segment limit enable
    FFXSR = 1 << 14  # AMD: fast FXSAVE/FXRSTOR
    TCE = 1 << 15  # AMD: translation cache extension
    AUTOIBRS = 1 << 21  # AMD: automatic IBRS


@_int_arithmetic
class Rflags(enum.IntFlag):
    """RFLAGS (SDM vol. 1, 3.4.3; vol. 3A, 2.3)."""

    CF = 1 << 0
    FIXED = 1 << 1  # reserved, always reads 1: the value of RFLAGS after reset is FIXED alone
    PF = 1 << 2
    AF = 1 << 4
    ZF = 1 << 6
    SF = 1 << 7
    TF = 1 << 8  # single-step trap
    IF = 1 << 9  # maskable interrupts enabled
    DF = 1 << 10
    OF = 1 << 11
    IOPL = 3 << 12  # a two-bit field: IOPL & rflags >> 12 is the level; the mask is IOPL 3
    NT = 1 << 14
    RF = 1 << 16
    VM = 1 << 17  # virtual-8086 mode
    AC = 1 << 18  # alignment check / SMAP override
    VIF = 1 << 19
    VIP = 1 << 20
    ID = 1 << 21


# Exceptions that push an error code when the CPU delivers them (SDM vol. 3A, table 6-1:
# #DF #TS #NP #SS #GP #PF #AC #CP), plus two defined only by AMD (APM vol. 2, table 8-1):
# #VC (SEV-ES: the error code is the exit code) and #SX (the security exception of SVM
# INIT redirection). On Intel those vectors are reserved and never delivered, so counting
# them costs nothing there and is right on AMD hosts. #DF and #AC always push 0.
# A software INT n, an external interrupt and an NMI never push one, whatever the vector.
_ERROR_CODE = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})


class Vector(enum.IntEnum):
    """Exception vectors 0-31 (SDM vol. 3A, table 6-1; AMD APM vol. 2, table 8-1)."""

    DE = 0  # divide error
    DB = 1  # debug
    NMI = 2
    BP = 3  # breakpoint (int3)
    OF = 4  # overflow (into)
    BR = 5  # bound range exceeded
    UD = 6  # invalid opcode
    NM = 7  # device not available
    DF = 8  # double fault
    TS = 10  # invalid TSS
    NP = 11  # segment not present
    SS = 12  # stack-segment fault
    GP = 13  # general protection
    PF = 14  # page fault
    MF = 16  # x87 floating-point error
    AC = 17  # alignment check
    MC = 18  # machine check
    XM = 19  # SIMD floating-point exception
    VE = 20  # virtualization exception (Intel EPT violations as #VE)
    CP = 21  # control protection (CET)
    HV = 28  # AMD: hypervisor injection exception
    VC = 29  # AMD: VMM communication exception (SEV-ES)
    SX = 30  # AMD: security exception

    @property
    def has_error_code(self) -> bool:
        """True if the CPU pushes an error code when it delivers this exception."""
        return self._value_ in _ERROR_CODE


# For tests on a raw vector number (0-255) that may be no Vector member, e.g. `v in ERROR_CODE_VECTORS`.
ERROR_CODE_VECTORS: frozenset[Vector] = frozenset(v for v in Vector if v.has_error_code)


class CpuMode(enum.StrEnum):
    """The operating mode a vCPU executes in (SDM vol. 3A, 2.2 and 5.2.1; vol. 1, 3.1).

    The values are what `GuestError.mode` and messages show.
    """

    REAL = "real"
    VM86 = "vm86"  # virtual-8086: protected mode with RFLAGS.VM (never in IA-32e mode)
    PROTECTED16 = "protected16"  # CS.D = 0
    PROTECTED32 = "protected32"  # CS.D = 1
    COMPAT16 = "compat16"  # IA-32e compatibility mode, CS.L = 0, CS.D = 0
    COMPAT32 = "compat32"  # IA-32e compatibility mode, CS.L = 0, CS.D = 1
    LONG64 = "long64"  # IA-32e 64-bit mode, CS.L = 1

    @property
    def bits(self) -> int:
        """Default operand and address size of code in this mode: 16, 32 or 64."""
        return _BITS[self]

    @property
    def ia32e(self) -> bool:
        """True in IA-32e (long) mode, EFER.LMA = 1: 16-byte IDT gates, 64-bit page tables."""
        return self in _IA32E


_BITS = {CpuMode.REAL: 16, CpuMode.VM86: 16, CpuMode.PROTECTED16: 16, CpuMode.PROTECTED32: 32,
         CpuMode.COMPAT16: 16, CpuMode.COMPAT32: 32, CpuMode.LONG64: 64}
_IA32E = frozenset({CpuMode.COMPAT16, CpuMode.COMPAT32, CpuMode.LONG64})
# cpu_mode runs on every completion exit: module globals, not class lookups (see the top).
_PE, _LMA, _VM = Cr0.PE, Efer.LMA, Rflags.VM
_REAL, _VM86, _P16, _P32 = CpuMode.REAL, CpuMode.VM86, CpuMode.PROTECTED16, CpuMode.PROTECTED32
_C16, _C32, _L64 = CpuMode.COMPAT16, CpuMode.COMPAT32, CpuMode.LONG64


def cpu_mode(sregs: Any, rflags: int | None = None) -> CpuMode:
    """The CPU mode of a `struct kvm_sregs` (from CR0.PE, EFER.LMA, CS.L and CS.D).

    Pass RFLAGS to tell virtual-8086 mode apart; without it a vm86 guest reads
    as protected16/32, its CS as KVM reports it. CS.L = 1 with CS.D = 1 is
    reserved (loading it raises #GP), so CS.L decides.
    """
    if not sregs.cr0 & _PE:
        return _REAL
    if sregs.efer & _LMA:
        if sregs.cs.l:
            return _L64
        return _C32 if sregs.cs.db else _C16
    if rflags is not None and rflags & _VM:
        return _VM86
    return _P32 if sregs.cs.db else _P16


def cpl(sregs: Any) -> int:
    """The current privilege level: CS.DPL in protected and IA-32e modes, 0 in real mode."""
    return sregs.cs.dpl if sregs.cr0 & _PE else 0
