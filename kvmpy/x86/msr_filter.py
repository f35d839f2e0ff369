"""MSRs kvmpy answers itself: one VM's MSR filter, and the feature MSRs a backend forgets to fault.

`KVM_X86_SET_MSR_FILTER` takes a VM's whole filter at once, so every part of
kvmpy that wants an MSR's RDMSR/WRMSR to exit to userspace registers it
here, and `install()` sets the filter: one range per MSR (KVM allows 16),
each with its bit clear (denied -> KVM_EXIT_X86_RDMSR/WRMSR, with
KVM_CAP_X86_USER_SPACE_MSR enabled for KVM_MSR_EXIT_REASON_FILTER).
`attach(loop)` sends each exit to the handler of its MSR, which answers it
with `exit.complete(value)` or `exit.complete(error=True)` (#GP). Users:
the syscall trap (IA32_LSTAR) and `fault_absent_feature_msrs` below.

On the PVM backend the guest sees the host's CPUID, and KVM lets it use
IA32_SPEC_CTRL, IA32_PRED_CMD and IA32_FLUSH_CMD even when that CPUID says
they do not exist, where a CPU (and KVM on VT-x/AMD-V) raises #GP. A guest
that probes for them by the fault (kvm-unit-tests' `msr`) is misled.
`absent_feature_msrs` reads which of them the guest's CPUID lacks, by the
rules KVM applies on hardware (its guest_has_spec_ctrl_msr and
guest_has_pred_cmd_msr; Intel's STIBP and SSBD bits imply IA32_SPEC_CTRL
too); kvmpy filters those and faults every access. The builder asks it of
the CPUID table it gives the vCPU (KVM_GET_CPUID2 on PVM does not always
answer the same), before the irqchip exists: KVM_X86_SET_MSR_FILTER waits
for an SRCU grace period, 7-15 ms here once an irqchip is there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from .._kvm import lib
from ..errors import SnapshotError
from ..exits import Exit, MsrExit

MsrHandler = Callable[[Any, MsrExit], None]  # (vcpu, exit): must call exit.complete(...)

MSR_IA32_SPEC_CTRL = 0x48
MSR_IA32_PRED_CMD = 0x49
MSR_IA32_FLUSH_CMD = 0x10B

# (leaf, subleaf, register, bit) of the CPUID features that make each MSR exist.
_SPEC_CTRL = (7, 0, "edx", 26)       # IBRS/IBPB, Intel
_STIBP = (7, 0, "edx", 27)
_FLUSH_L1D = (7, 0, "edx", 28)
_SSBD = (7, 0, "edx", 31)
_AMD_IBPB = (0x8000_0008, 0, "ebx", 12)
_AMD_IBRS = (0x8000_0008, 0, "ebx", 14)
_AMD_STIBP = (0x8000_0008, 0, "ebx", 15)
_AMD_SSBD = (0x8000_0008, 0, "ebx", 24)
_SBPB = (0x8000_0021, 0, "eax", 27)

FEATURE_MSRS: dict[int, tuple[str, tuple[tuple[int, int, str, int], ...]]] = {
    MSR_IA32_SPEC_CTRL: ("IA32_SPEC_CTRL", (_SPEC_CTRL, _STIBP, _SSBD, _AMD_IBRS, _AMD_STIBP, _AMD_SSBD)),
    MSR_IA32_PRED_CMD: ("IA32_PRED_CMD", (_SPEC_CTRL, _AMD_IBPB, _SBPB)),
    MSR_IA32_FLUSH_CMD: ("IA32_FLUSH_CMD", (_FLUSH_L1D,)),
}


class MsrFilter:
    """The MSRs of one VM that exit to kvmpy, each with its read and write handler."""

    def __init__(self, vm: Any) -> None:
        self.vm = vm
        self.handlers: dict[int, tuple[MsrHandler, MsrHandler]] = {}
        self.installed = False

    def intercept(self, index: int, on_read: MsrHandler, on_write: MsrHandler) -> None:
        """Send the guest's RDMSR/WRMSR of `index` to these handlers (before `install`)."""
        if self.installed:
            raise RuntimeError("MsrFilter: intercept() after install(); KVM takes the filter whole")
        if index in self.handlers:
            raise ValueError(f"MSR {index:#x} is already intercepted")
        self.handlers[index] = (on_read, on_write)

    def install(self) -> None:
        """Enable userspace MSR exits for the filter and set it (KVM_X86_SET_MSR_FILTER)."""
        if self.installed or not self.handlers:
            return
        self.vm.enable_cap(lib.KVM_CAP_X86_USER_SPACE_MSR, lib.KVM_MSR_EXIT_REASON_FILTER)
        flags = lib.KVM_MSR_FILTER_READ | lib.KVM_MSR_FILTER_WRITE
        self.vm.set_msr_filter([(flags, index, 1, bytes([0])) for index in sorted(self.handlers)])
        self.installed = True

    def snapshot_state(self) -> dict[str, Any]:
        """Which MSRs are filtered: the handlers are code, rebuilt from the machine's config."""
        return {"msrs": sorted(self.handlers)}

    def restore_state(self, state: dict[str, Any]) -> None:
        """Check that this filter intercepts the MSRs the saved one did (the guest relies on their answers)."""
        saved = sorted(int(i) for i in state.get("msrs", []))
        if saved != sorted(self.handlers):
            raise SnapshotError(f"the saved machine filtered MSRs {[hex(i) for i in saved]}, this one filters "
                                f"{[hex(i) for i in sorted(self.handlers)]}; the host's quirks differ")

    def attach(self, loop: Any) -> None:
        """Route one vCPU loop's MSR exits to the handlers."""
        vcpu = loop.vcpu
        loop.handlers[lib.KVM_EXIT_X86_RDMSR] = lambda e: self._dispatch(vcpu, e)
        loop.handlers[lib.KVM_EXIT_X86_WRMSR] = lambda e: self._dispatch(vcpu, e)

    def _dispatch(self, vcpu: Any, exit: Exit) -> bool:
        assert isinstance(exit, MsrExit)
        pair = self.handlers.get(exit.index)
        if pair is None:
            exit.complete(error=True)  # not ours: KVM sent it for a reason we did not ask for
        else:
            pair[1 if exit.is_write else 0](vcpu, exit)
        return True


def absent_feature_msrs(cpuid: Iterable[Any]) -> list[int]:
    """The MSRs of FEATURE_MSRS that a CPU with this CPUID (entries with function/index/eax..edx) lacks."""
    table = {(e.function, e.index): e for e in cpuid}

    def has(leaf: int, subleaf: int, reg: str, bit: int) -> bool:
        e = table.get((leaf, subleaf))
        return e is not None and bool(getattr(e, reg) >> bit & 1)

    return [index for index, (_, features) in FEATURE_MSRS.items() if not any(has(*f) for f in features)]


def _fault(vcpu: Any, exit: MsrExit) -> None:
    exit.complete(error=True)


def fault_absent_feature_msrs(msr_filter: MsrFilter, cpuid: Iterable[Any]) -> list[int]:
    """Make every access to the feature MSRs that `cpuid` lacks raise #GP; returns them."""
    return fault_feature_msrs(msr_filter, absent_feature_msrs(cpuid))


def fault_feature_msrs(msr_filter: MsrFilter, indices: Iterable[int]) -> list[int]:
    """Make every access to these MSRs raise #GP (a restored machine: the set its guest saw)."""
    done = []
    for index in indices:
        msr_filter.intercept(index, _fault, _fault)
        done.append(index)
    return done


__all__ = ["FEATURE_MSRS", "MSR_IA32_FLUSH_CMD", "MSR_IA32_PRED_CMD", "MSR_IA32_SPEC_CTRL", "MsrFilter",
           "absent_feature_msrs", "fault_absent_feature_msrs", "fault_feature_msrs"]
