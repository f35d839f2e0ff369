"""Which feature MSRs a CPUID table lacks (kvmpy.x86.msr_filter), (no /dev/kvm)."""

from __future__ import annotations

import pytest

from kvmpy.kvm import CpuidEntry
from kvmpy.x86.msr_filter import MSR_IA32_FLUSH_CMD, MSR_IA32_PRED_CMD, MSR_IA32_SPEC_CTRL, absent_feature_msrs

ALL = [MSR_IA32_SPEC_CTRL, MSR_IA32_PRED_CMD, MSR_IA32_FLUSH_CMD]


def leaf(function: int, *, eax: int = 0, ebx: int = 0, edx: int = 0) -> CpuidEntry:
    return CpuidEntry(function, 0, 0, eax, ebx, 0, edx)


@pytest.mark.parametrize("entries, absent", [
    ([], ALL),
    ([leaf(7)], ALL),
    ([leaf(7, edx=1 << 26)], [MSR_IA32_FLUSH_CMD]),                        # Intel SPEC_CTRL: both
    ([leaf(7, edx=1 << 28)], [MSR_IA32_SPEC_CTRL, MSR_IA32_PRED_CMD]),     # FLUSH_L1D only
    ([leaf(7, edx=1 << 31)], [MSR_IA32_PRED_CMD, MSR_IA32_FLUSH_CMD]),     # SSBD: SPEC_CTRL exists
    ([leaf(0x8000_0008, ebx=1 << 12)], [MSR_IA32_SPEC_CTRL, MSR_IA32_FLUSH_CMD]),  # AMD IBPB: PRED_CMD
    ([leaf(0x8000_0008, ebx=1 << 14)], [MSR_IA32_PRED_CMD, MSR_IA32_FLUSH_CMD]),   # AMD IBRS: SPEC_CTRL
    ([leaf(0x8000_0008, ebx=1 << 24)], [MSR_IA32_PRED_CMD, MSR_IA32_FLUSH_CMD]),   # AMD SSBD
    ([leaf(0x8000_0021, eax=1 << 27)], [MSR_IA32_SPEC_CTRL, MSR_IA32_FLUSH_CMD]),  # SBPB: PRED_CMD
])
def test_absent_feature_msrs_follow_the_cpuid_bits(entries, absent):
    assert absent_feature_msrs(entries) == absent
