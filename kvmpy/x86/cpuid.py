"""The CPUID table a vCPU gets: KVM_GET_SUPPORTED_CPUID, made per-CPU.

Without KVM_SET_CPUID2 a guest on VT-x/AMD-V sees almost no features, so
every vCPU gets the supported table with its own APIC ID filled in (leaf 1
EBX[31:24], leaves 0xB/0x1F EDX) and the hypervisor bit set, as QEMU and
Firecracker do.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterable

from ..kvm import CpuidEntry

LEAF1_ECX_HYPERVISOR = 1 << 31


def vcpu_cpuid(supported: Iterable[CpuidEntry], apic_id: int, ncpus: int) -> list[CpuidEntry]:
    out = []
    for e in supported:
        if e.function == 1:
            ebx = (e.ebx & 0x0000FFFF) | (min(ncpus, 255) << 16) | ((apic_id & 0xFF) << 24)
            e = replace(e, ebx=ebx, ecx=e.ecx | LEAF1_ECX_HYPERVISOR)
        elif e.function in (0xB, 0x1F):
            e = replace(e, edx=apic_id)
        out.append(e)
    return out
