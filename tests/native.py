"""Run an instruction natively on the host CPU, for comparison with a guest's result.

`STATE_CODE(body)` is an x86-64 function `void f(uint64_t *state)` that loads
the general registers, RFLAGS' arithmetic flags and XMM0/XMM1 from `state`,
runs `body`, and stores them back. The same assembly runs in a tiny CPL0
guest (called with RDI = the state's guest address) and natively here, from
an executable anonymous mapping through ctypes, so a test compares the
guest-visible result of a completed instruction with what this CPU does.

State layout (u64 slots): see `SLOTS`; XMM0 at slot 16-17, XMM1 at 18-19,
memory operand buffer pointer in RSI by convention.
"""

from __future__ import annotations

import ctypes
import mmap
from typing import Mapping

from kvmpy.x86.asm import assemble

SLOTS = ["rax", "rbx", "rcx", "rdx", "rsi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
         "r15", "rdi", "rflags", "xmm0_lo", "xmm0_hi", "xmm1_lo", "xmm1_hi"]
ARITH_FLAGS = 0x8D5  # CF PF AF ZF SF OF
CF, PF, AF, ZF, SF, OF = 1, 4, 0x10, 0x40, 0x80, 0x800
# Flags the SDM leaves undefined after these instructions: CPUs (and Unicorn) differ there.
UNDEFINED_FLAGS = {"andn": AF | PF, "lzcnt": OF | SF | PF | AF, "tzcnt": OF | SF | PF | AF,
                   "bextr": AF | SF | PF}


def defined(state: dict, body: str) -> dict:
    """`state` with the flags `body`'s instruction leaves undefined cleared."""
    mnemonic = body.split()[0]
    return {**state, "rflags": state["rflags"] & ~UNDEFINED_FLAGS.get(mnemonic, 0)}
STATE_SIZE = 8 * len(SLOTS)

_LOAD = [("rbx", 1), ("rcx", 2), ("rdx", 3), ("rsi", 4), ("rbp", 5)] + \
        [(f"r{i}", i - 2) for i in range(8, 16)]


def state_function(body: str) -> str:
    """Assembly of `f(state)`: load registers, `body`, store registers, return."""
    loads = "\n".join(f"    mov {8 * slot}(%rdi), %{reg}" for reg, slot in _LOAD)
    stores = "\n".join(f"    mov %{reg}, {8 * slot}(%rdi)" for reg, slot in _LOAD)
    return f"""
    push %rbx; push %rbp; push %r12; push %r13; push %r14; push %r15
    push %rdi
    movdqu 128(%rdi), %xmm0
    movdqu 144(%rdi), %xmm1
    mov 120(%rdi), %rax
    and ${ARITH_FLAGS}, %rax
    or $2, %rax
    push %rax
    mov 0(%rdi), %rax
{loads}
    mov 112(%rdi), %rdi
    popfq
{body}
    pushfq
    push %rdi
    mov 16(%rsp), %rdi
    pop 112(%rdi)
    pop 120(%rdi)
    mov %rax, 0(%rdi)
{stores}
    movdqu %xmm0, 128(%rdi)
    movdqu %xmm1, 144(%rdi)
    pop %rdi
    pop %r15; pop %r14; pop %r13; pop %r12; pop %rbp; pop %rbx
    ret
"""


def pack_state(values: Mapping[str, int]) -> bytes:
    return b"".join((values.get(n, 0) & (2**64 - 1)).to_bytes(8, "little") for n in SLOTS)


def unpack_state(data: bytes) -> dict[str, int]:
    out = {n: int.from_bytes(data[8 * i:8 * i + 8], "little") for i, n in enumerate(SLOTS)}
    out["rflags"] &= ARITH_FLAGS
    return out


class NativeRunner:
    """Executes `state_function(body)` on the host CPU."""

    def __init__(self, body: str) -> None:
        code = assemble(state_function(body), "64", 0)
        self._map = mmap.mmap(-1, mmap.PAGESIZE * 2, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        self._map.write(code)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        self._fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(addr)
        self.buffer = ctypes.create_string_buffer(64)

    def run(self, values: Mapping[str, int], memory: bytes = b"") -> tuple[dict[str, int], bytes]:
        """(registers after, the 64-byte memory buffer after); RSI points at the buffer."""
        self.buffer.raw = memory.ljust(64, b"\0")[:64]
        state = ctypes.create_string_buffer(pack_state({**values, "rsi": ctypes.addressof(self.buffer)}),
                                            STATE_SIZE)
        self._fn(ctypes.addressof(state))
        return unpack_state(state.raw), self.buffer.raw
