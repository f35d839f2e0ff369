"""Userspace completion of instructions a KVM backend could not emulate.

Some backends (software KVM such as PVM, nested setups, older kernels) stop
with KVM_EXIT_INTERNAL_ERROR / EMULATION on instructions real hardware runs
without exiting. Where the effect is exactly known, the VMM completes the
instruction and the guest goes on; otherwise the exit loop stops the VM with
a `GuestError` naming vCPU, RIP, CPU mode and the instruction bytes.

Completions here:
- ``int3`` (CC): RIP += 1, inject #BP, so the guest's vector-3 handler runs
  with the return address after the breakpoint, as on hardware.
- ``fwait`` (9B): a no-op when no x87 exception is pending (Linux runs it on
  every FPU state switch); RIP += 1.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

from .errors import GuestError, GuestMemoryError
from .exits import InternalErrorExit

# A completion gets (vcpu, regs, instruction bytes) and returns True when done.
Completion = Callable[[Any, Any, bytes], bool]
# A hook sees the raw exit first (before any register ioctl) and returns True if it handled it.
Hook = Callable[[Any, InternalErrorExit], bool]

BP_VECTOR = 3


def _int3(vcpu: Any, regs: Any, insn: bytes) -> bool:
    regs.rip += 1
    vcpu.set_regs(regs)
    vcpu.inject_exception(BP_VECTOR)
    return True


def _fwait(vcpu: Any, regs: Any, insn: bytes) -> bool:
    regs.rip += 1
    vcpu.set_regs(regs)
    return True


class Assists:
    """The emulation-failure handler of an exit loop.

    `handle(vcpu, exit)` completes the instruction (True) or raises
    `GuestError`. `completed` counts completions by instruction name.
    """

    def __init__(self, memory: Any = None, *, enabled: bool = True) -> None:
        self.memory = memory
        self.enabled = enabled
        self.completed: Counter[str] = Counter()
        self.hooks: list[Hook] = []
        # First opcode byte -> (name, completion). Longer patterns are the
        # business of the instruction-completion layer built on this table.
        self.table: dict[int, tuple[str, Completion]] = {0xCC: ("int3", _int3), 0x9B: ("fwait", _fwait)}

    def instruction_bytes(self, vcpu: Any, exit: InternalErrorExit, regs: Any, sregs: Any) -> bytes:
        """The bytes at the faulting RIP: from KVM if it gave them, else through the guest's page tables."""
        if exit.insn_bytes:
            return exit.insn_bytes
        if self.memory is None:
            return b""
        linear = sregs.cs.base + regs.rip
        try:
            gpa = self.memory.translate(linear, sregs.cr3, cr0=sregs.cr0, cr4=sregs.cr4, efer=sregs.efer)
            return self.memory.read(gpa, min(15, 4096 - (gpa & 0xFFF)))
        except GuestMemoryError:
            return b""

    def handle(self, vcpu: Any, exit: InternalErrorExit) -> bool:
        for hook in self.hooks:
            if hook(vcpu, exit):
                return True
        regs = vcpu.get_regs()
        sregs = vcpu.get_sregs()
        insn = self.instruction_bytes(vcpu, exit, regs, sregs) if exit.is_emulation_failure else b""
        if self.enabled and insn:
            entry = self.table.get(insn[0])
            if entry is not None and entry[1](vcpu, regs, insn):
                self.completed[entry[0]] += 1
                return True
        raise GuestError(exit.describe(), vcpu=vcpu.id, rip=regs.rip, mode=vcpu.cpu_mode(sregs),
                         insn=insn or None)
