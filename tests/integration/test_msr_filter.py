"""MSRs kvmpy answers itself (kvmpy.x86.msr_filter), on a real VM: values, #GP, and feature MSRs."""

from __future__ import annotations

import pytest

from kvmpy.exits import HltExit
from kvmpy.x86.msr_filter import (MSR_IA32_FLUSH_CMD, MSR_IA32_PRED_CMD, MSR_IA32_SPEC_CTRL, MsrFilter,
                                  fault_absent_feature_msrs)

REPORT = 4  # port 0x14: offset 4 of the recording port at 0x10
GP = 13

# CPL0 (emulated on PVM): read SPEC_CTRL, write PRED_CMD and FLUSH_CMD, report what each did.
# The #GP handler reports the MSR in ECX and resumes after the 2-byte rdmsr/wrmsr.
GUEST = """
    mov $0x48, %ecx
    xor %eax, %eax
    xor %edx, %edx
    rdmsr
    out %eax, $0x14             # value read (low half), if it did not fault
    mov %edx, %eax
    out %eax, $0x14             # (high half)
    mov $0x49, %ecx
    mov $1, %eax
    xor %edx, %edx
    wrmsr
    mov $0x10b, %ecx
    wrmsr
    hlt
.org 0x100
gp_handler:
    push %rax
    mov $0xdead0000, %eax
    or %ecx, %eax
    out %eax, $0x14             # 0xdead0000 | the MSR that faulted
    pop %rax
    addq $2, 8(%rsp)            # frame: error code, RIP: skip the rdmsr/wrmsr
    add $8, %rsp
    iretq
"""


def test_every_access_to_absent_feature_msrs_raises_gp(guest):
    g = guest("64", GUEST, idt={GP: 0x100})
    f = MsrFilter(g.vm)
    assert fault_absent_feature_msrs(f, []) == [MSR_IA32_SPEC_CTRL, MSR_IA32_PRED_CMD, MSR_IA32_FLUSH_CMD]
    f.install()
    loop = g.make_loop()
    f.attach(loop)
    assert isinstance(loop.run(), HltExit)
    assert g.port.values(REPORT) == [0xDEAD0048, 0, 0, 0xDEAD0049, 0xDEAD010B]  # the read left edx:eax 0


def test_a_read_handler_answers_and_a_write_handler_sees_the_value(guest):
    g = guest("64", GUEST, idt={GP: 0x100})
    f = MsrFilter(g.vm)
    written = []

    def read(vcpu, exit):
        exit.complete(0x1_0000_0005)

    def write(vcpu, exit):
        written.append((exit.index, exit.data))
        exit.complete()

    f.intercept(MSR_IA32_SPEC_CTRL, read, write)
    f.intercept(MSR_IA32_PRED_CMD, read, write)
    with pytest.raises(ValueError, match="already intercepted"):
        f.intercept(MSR_IA32_PRED_CMD, read, write)
    f.install()
    with pytest.raises(RuntimeError, match="after install"):
        f.intercept(MSR_IA32_FLUSH_CMD, read, write)
    loop = g.make_loop()
    f.attach(loop)
    assert isinstance(loop.run(), HltExit)
    reports = g.port.values(REPORT)
    assert reports[:2] == [5, 1]  # edx:eax = 0x1_00000005
    assert written == [(MSR_IA32_PRED_CMD, 1)]
    # FLUSH_CMD is not in the filter: KVM handles it as it always does (its own #GP or not).
    assert all(r in (0xDEAD010B,) for r in reports[2:])
