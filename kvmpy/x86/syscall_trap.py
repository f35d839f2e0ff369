"""Guest SYSCALL through the VMM, for backends whose SYSCALL does not switch to CPL0.

On the PVM software backend a guest `syscall` at CPL3 loads RIP = LSTAR,
RCX, R11 and masks RFLAGS, but leaves CS/SS (and so the privilege level) at
user values; a Linux guest's first system call then faults in its entry
code. Everything else of the transition works. This module completes it:

1. MSR filtering (KVM_CAP_X86_USER_SPACE_MSR + KVM_X86_SET_MSR_FILTER) makes
   the guest's RDMSR/WRMSR of IA32_LSTAR exit to kvmpy. kvmpy keeps the
   guest's value, answers reads with it, and programs the real LSTAR (with
   KVM_SET_MSRS, which the filter does not apply to) to `TRAP_VA`.
2. `TRAP_VA` is mapped user-accessible in a top-level page-table slot Linux
   leaves empty (PGD 509, 0xfffffe8000000000, copied into every process at
   fork) to `TRAP_GPA`, an address in no memory slot. The three page-table
   pages live in guest RAM that the e820 map marks reserved.
3. A `syscall` then fetches its first instruction from `TRAP_GPA` at CPL3,
   which KVM cannot resolve: KVM_EXIT_INTERNAL_ERROR with RIP == TRAP_VA,
   CS.DPL 3 and IF clear (SFMASK applied). kvmpy loads CS = STAR[47:32],
   SS = CS + 8 at DPL 0 and RIP = the guest's LSTAR through the synced
   registers of kvm_run (KVM_CAP_SYNC_REGS, no extra ioctls), which is exactly
   the state a real SYSCALL leaves.

Only used where `Quirks.syscall_trap` says so; inert on VT-x/AMD-V hosts.
"""

from __future__ import annotations

from typing import Any

from .._kvm import lib
from ..exits import InternalErrorExit, MsrExit
from ..memory import GuestMemory
from .arch import Rflags
from .msr_filter import MsrFilter

MSR_STAR = 0xC000_0081
MSR_LSTAR = 0xC000_0082

PGD_SLOT = 509
TRAP_VA = 0xFFFF_0000_0000_0000 | (PGD_SLOT << 39)  # 0xfffffe8000000000
TRAP_GPA = 0xE000_0000  # in the 32-bit MMIO hole: never RAM, no device
# Three reserved pages below the EBDA for the trap's PDPT, PD and PT.
TABLES_GPA = 0x9C000
RESERVED = [(TABLES_GPA, 3 * 4096)]

_PRESENT, _RW, _USER = 1, 2, 4
_ADDR = 0x000F_FFFF_FFFF_F000
_RFLAGS_IF = Rflags.IF
_SYNC = lib.KVM_SYNC_X86_REGS | lib.KVM_SYNC_X86_SREGS
HANDLED_AS = "syscall trap"  # what `kvmpy stat` calls these INTERNAL_ERROR exits


class SyscallTrap:
    """The LSTAR trap for one VM; `attach(loop)` per vCPU loop.

    `msr_filter`: the VM's `MsrFilter`, which the caller installs (with any
    other MSRs it intercepts) and attaches to each loop before the vCPUs
    run; without one the trap makes, installs and attaches its own.
    """

    def __init__(self, vm: Any, memory: GuestMemory, msr_filter: MsrFilter | None = None) -> None:
        self.vm = vm
        self.memory = memory
        self.guest_lstar: dict[int, int] = {}  # vcpu id -> the value the guest wrote
        self.kernel_cs: dict[int, int] = {}
        self.traps = 0
        self._own_filter = msr_filter is None
        self.msr_filter = MsrFilter(vm) if msr_filter is None else msr_filter
        self.msr_filter.intercept(MSR_LSTAR, self._rdmsr, self._wrmsr)
        if self._own_filter:
            self.msr_filter.install()
        self._build_tables()

    def _build_tables(self) -> None:
        pdpt, pd, pt = TABLES_GPA, TABLES_GPA + 0x1000, TABLES_GPA + 0x2000
        self.memory.fill(TABLES_GPA, 3 * 4096)
        flags = _PRESENT | _RW | _USER
        self.memory.write_u64(pdpt, pd | flags)  # TRAP_VA indexes 0 at every lower level
        self.memory.write_u64(pd, pt | flags)
        self.memory.write_u64(pt, TRAP_GPA | _PRESENT | _USER)
        self.pgd_entry = pdpt | flags

    def attach(self, loop: Any) -> None:
        """Take this vCPU's trap exits (before instruction completion sees them)."""
        vcpu = loop.vcpu
        vcpu.run_struct.kvm_valid_regs = _SYNC
        if self._own_filter:
            self.msr_filter.attach(loop)
        loop.add_handler(lib.KVM_EXIT_INTERNAL_ERROR, lambda exit: self._trap(vcpu, exit) or None, first=True)

    # -- saved state -------------------------------------------------------------

    def snapshot_state(self) -> dict[str, Any]:
        """Per vCPU the LSTAR the guest wrote and its kernel CS; the trap count."""
        return {"guest_lstar": {str(k): v for k, v in self.guest_lstar.items()},
                "kernel_cs": {str(k): v for k, v in self.kernel_cs.items()}, "traps": self.traps}

    def restore_state(self, state: dict[str, Any]) -> None:
        self.guest_lstar = {int(k): int(v) for k, v in state["guest_lstar"].items()}
        self.kernel_cs = {int(k): int(v) for k, v in state["kernel_cs"].items()}
        self.traps = int(state["traps"])

    # -- MSR exits ---------------------------------------------------------------

    def _wrmsr(self, vcpu: Any, exit: MsrExit) -> None:
        self.guest_lstar[vcpu.id] = exit.data
        exit.complete()
        star = vcpu.get_msrs([MSR_STAR]).get(MSR_STAR, 0)
        self.kernel_cs[vcpu.id] = (star >> 32) & 0xFFFC
        self._install_pgd_slot(vcpu)
        vcpu.set_msrs({MSR_LSTAR: TRAP_VA})

    def _rdmsr(self, vcpu: Any, exit: MsrExit) -> None:
        exit.complete(self.guest_lstar.get(vcpu.id, 0))

    def _install_pgd_slot(self, vcpu: Any) -> None:
        # The top-level table in force when the kernel sets LSTAR is its
        # init_top_pgt, from which every process's kernel half is copied.
        cr3 = vcpu.get_sregs().cr3 & _ADDR
        slot = cr3 + PGD_SLOT * 8
        current = self.memory.read_u64(slot)
        if current not in (0, self.pgd_entry):
            raise RuntimeError(f"guest PGD slot {PGD_SLOT} at {slot:#x} is in use ({current:#x}); "
                               "cannot place the syscall trap")
        self.memory.write_u64(slot, self.pgd_entry)

    # -- the trap ----------------------------------------------------------------

    def _trap(self, vcpu: Any, exit: InternalErrorExit) -> bool:
        run = vcpu.run_struct
        regs = run.s.regs.regs
        if regs.rip != TRAP_VA:
            return False
        sregs = run.s.regs.sregs
        lstar = self.guest_lstar.get(vcpu.id)
        if lstar is None or sregs.cs.dpl != 3 or regs.rflags & _RFLAGS_IF:
            return False  # a jump to the trap page, not a SYSCALL
        cs = self.kernel_cs[vcpu.id]
        _load_flat(sregs.cs, cs, code=True)
        _load_flat(sregs.ss, cs + 8, code=False)
        regs.rip = lstar
        run.kvm_dirty_regs = _SYNC
        self.traps += 1
        exit.handled_as = HANDLED_AS
        return True


def _load_flat(seg: Any, selector: int, *, code: bool) -> None:
    seg.selector = selector
    seg.base = 0
    seg.limit = 0xFFFF_FFFF
    seg.type = 0xB if code else 0x3
    seg.present, seg.dpl, seg.s, seg.g, seg.avl, seg.unusable = 1, 0, 1, 1, 0, 0
    seg.l, seg.db = (1, 0) if code else (0, 1)
