"""Which KVM backend this host has, and the workarounds a Linux guest needs on it.

On Intel VT-x (kvm_intel) and AMD-V (kvm_amd) hosts a Linux guest needs no
help. The software backend PVM (kvm_pvm) runs guest kernel code in an
instruction emulator with gaps, passes the host's CPUID through, and hangs
on `vmcall`; there kvmpy completes `int3`/`fwait` in userspace and hides
CPU features the emulator cannot run with the kernel command line (the
measured set from the project's platform notes).
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass


class Backend(enum.Enum):
    VMX = "vmx"  # Intel VT-x, kvm_intel
    SVM = "svm"  # AMD-V, kvm_amd
    PVM = "pvm"  # software KVM backend, kvm_pvm
    UNKNOWN = "unknown"


def detect_backend(sys_module: str = "/sys/module") -> Backend:
    """The loaded KVM vendor module, by /sys/module/<name>."""
    for name, backend in (("kvm_pvm", Backend.PVM), ("kvm_intel", Backend.VMX), ("kvm_amd", Backend.SVM)):
        if os.path.isdir(os.path.join(sys_module, name)):
            return backend
    return Backend.UNKNOWN


# CPU features hidden from Linux on its command line because the PVM emulator
# cannot execute their instructions at guest CPL0 and this backend ignores
# KVM_SET_CPUID2. With kvmpy's instruction completion (kvmpy/assists.py) the
# rest of the original set is no longer needed: bmi1, bmi2, adx, abm, aes,
# pclmulqdq, rdrand, rdseed, clflushopt, clwb, umip, smep and rdtscp were
# dropped (measured 2026-12-02: a 6.1 kernel boots to its shell, "Run /init"
# at 62 s against 56 s with the full set, within this host's noise; no
# instruction of theirs needed completing). Still needed:
# - avx, avx2, avx512f, vaes, gfni, sha_ni: Unicorn 2.1 cannot execute them;
# - movbe, rdpid: PVM injects #UD without an exit, nothing can complete them;
# - cx16, popcnt, smap (stac/clac), invpcid, pcid, fsgsbase, pku: completable
#   or emulated, but on hot kernel paths (each completion costs ~0.5-1.5 ms
#   here) or changing CR3/CR4 semantics; not tried without their masks yet;
# - erms, fsrm: with them Linux's memcpy is `rep movsb`, emulated a byte at a
#   time; a boot without these masks (on a loaded host) had not reached /init
#   after 200 s when one with them did. Not settled; kept.
# `noxsave` stays too: XSAVE/XRSTOR are not completable.
PVM_CLEARCPUID = (
    "cx16,smap,pku,popcnt,movbe,fsgsbase,rdpid,invpcid,pcid,erms,fsrm,"
    "avx,avx2,avx512f,sha_ni,gfni,vaes"
)


@dataclass(frozen=True)
class Quirks:
    """What kvmpy changes for a backend.

    Instruction completion is on everywhere: it acts only when KVM gives up
    on an instruction (KVM_EXIT_INTERNAL_ERROR, emulation), which on a
    hardware host happens only where its emulator has gaps (nested setups,
    older kernels). The rest is for the PVM backend only.
    """

    backend: Backend
    emulation_assists: bool = False  # complete instructions KVM failed to emulate (kvmpy/assists.py)
    cmdline: str = ""  # extra Linux command-line words
    tsc_khz_on_cmdline: bool = False  # pass tsc_early_khz=: no PV clock, no calibration loops
    syscall_trap: bool = False  # route guest SYSCALL through the VMM (LSTAR trap)
    feature_msr_faults: bool = False  # #GP on IA32_SPEC_CTRL/PRED_CMD/FLUSH_CMD when CPUID lacks them

    @property
    def active(self) -> bool:
        return bool(self.emulation_assists or self.cmdline or self.syscall_trap or self.feature_msr_faults)

    def describe(self) -> str:
        if not self.active:
            return f"{self.backend.value}: no quirks"
        parts = []
        if self.emulation_assists:
            parts.append("instruction completion")
        if self.syscall_trap:
            parts.append("syscall trap")
        if self.feature_msr_faults:
            parts.append("feature-MSR faults")
        if self.cmdline:
            parts.append(f"cmdline '{self.cmdline}'")
        return f"{self.backend.value}: " + ", ".join(parts)


def quirks_for(backend: Backend) -> Quirks:
    if backend is Backend.PVM:
        return Quirks(
            backend,
            emulation_assists=True,
            cmdline=f"nopv noxsave clearcpuid={PVM_CLEARCPUID} nopti mitigations=off",
            tsc_khz_on_cmdline=True,
            syscall_trap=True,
            feature_msr_faults=True,
        )
    return Quirks(backend, emulation_assists=True)


def resolve_quirks(choice: str = "auto") -> Quirks:
    """`auto` detects the backend; `pvm` forces the PVM set; `none` disables all."""
    if choice == "auto":
        return quirks_for(detect_backend())
    if choice == "pvm":
        return quirks_for(Backend.PVM)
    if choice == "none":
        return Quirks(detect_backend())
    raise ValueError(f"quirks must be 'auto', 'pvm' or 'none', not {choice!r}")
