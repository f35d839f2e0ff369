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


# CPU features the PVM emulator cannot execute at guest CPL0 (or executes
# wrongly), hidden from Linux on its command line because this backend
# ignores KVM_SET_CPUID2. Measured: with these a 6.1 kernel boots to init.
PVM_CLEARCPUID = (
    "cx16,smap,smep,pku,popcnt,movbe,bmi1,bmi2,adx,fsgsbase,rdpid,rdrand,rdseed,invpcid,pcid,"
    "clflushopt,clwb,erms,fsrm,umip,avx,avx2,avx512f,abm,rdtscp,sha_ni,aes,pclmulqdq,gfni,vaes"
)


@dataclass(frozen=True)
class Quirks:
    """What kvmpy changes for a backend; all off on hardware hosts."""

    backend: Backend
    emulation_assists: bool = False  # complete int3/fwait after an emulation failure
    cmdline: str = ""  # extra Linux command-line words
    tsc_khz_on_cmdline: bool = False  # pass tsc_early_khz=: no PV clock, no calibration loops
    syscall_trap: bool = False  # route guest SYSCALL through the VMM (LSTAR trap)

    @property
    def active(self) -> bool:
        return bool(self.emulation_assists or self.cmdline or self.syscall_trap)

    def describe(self) -> str:
        if not self.active:
            return f"{self.backend.value}: no quirks"
        parts = []
        if self.emulation_assists:
            parts.append("int3/fwait completion")
        if self.syscall_trap:
            parts.append("syscall trap")
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
        )
    return Quirks(backend)


def resolve_quirks(choice: str = "auto") -> Quirks:
    """`auto` detects the backend; `pvm` forces the PVM set; `none` disables all."""
    if choice == "auto":
        return quirks_for(detect_backend())
    if choice == "pvm":
        return quirks_for(Backend.PVM)
    if choice == "none":
        return Quirks(detect_backend())
    raise ValueError(f"quirks must be 'auto', 'pvm' or 'none', not {choice!r}")
