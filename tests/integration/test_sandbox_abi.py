"""The sandbox ABI cannot be forged by the payload: reports count only when kvmpy's CPL0 stub made them.

The payload runs at CPL3 with IOPL 0, so it cannot do port I/O itself; its
`out` faults into the stub. A report on a fault port is believed only at
CPL0, from the stub's own address for that vector, with RSP where the CPU
puts an exception frame coming from CPL3 (kvmpy.sandbox docstring).
"""

from __future__ import annotations

import pytest

from kvmpy.sandbox import (
    FAULT_PORT_BASE,
    IMAGE_BASE,
    STUB_ADDR,
    ForgedReport,
    GuestFault,
    GuestFunction,
)
from kvmpy.x86.asm import assemble

PF, GP = 14, 13
FAKE_RIP = 0x7E57_0000


def _asm(source, **kw):
    return GuestFunction(source, lang="asm", **kw)


def _offset_of(source_before):
    """Where the instruction after `source_before` starts in the image."""
    return IMAGE_BASE + len(assemble(source_before, "64", IMAGE_BASE))


def test_payload_runs_with_iopl_0():
    fn = _asm("pushfq\n pop %rax\n shr $12, %rax\n and $3, %rax\n ret")
    assert fn() == 0


def test_out_to_the_page_fault_report_port_is_a_gp_at_the_payloads_own_out():
    # A frame that would make the host report a #PF at FAKE_RIP, then the report itself.
    setup = f"push $0x2b\n push $0x7ff000\n push $0x202\n push $0x33\n push ${FAKE_RIP:#x}\n push $6\n"
    fn = _asm(setup + f"out %al, ${FAULT_PORT_BASE + PF:#x}\n ret")
    with pytest.raises(GuestFault) as info:
        fn()
    assert (info.value.vector, info.value.rip, info.value.cpl) == (GP, _offset_of(setup), 3)


def test_forged_return_through_the_gp_report_port_is_not_a_result():
    # ret = 1234 in the ABI block and al = HC_RETURN, then `out` to the #GP report port.
    before = "movq $1234, 0x200038\n xor %eax, %eax\n"
    fn = _asm(before + f"out %al, ${FAULT_PORT_BASE + GP:#x}\n ret")
    with pytest.raises(GuestFault) as info:
        fn()
    assert (info.value.vector, info.value.rip) == (GP, _offset_of(before))


def test_jump_into_the_stub_is_a_page_fault_on_the_supervisor_page():
    stub = STUB_ADDR + PF * 16
    fn = _asm(f"mov ${stub:#x}, %eax\n jmp *%rax")
    with pytest.raises(GuestFault) as info:
        fn()
    assert (info.value.vector, info.value.rip, info.value.cr2) == (PF, stub, stub)


def test_report_from_code_that_is_not_the_stub_is_refused():
    # At CPL0 (user_mode=False) the payload can do port I/O: a report from its own rip is still refused.
    fn = _asm(f"push ${FAKE_RIP:#x}\n out %al, ${FAULT_PORT_BASE + PF:#x}\n ret", user_mode=False)
    with pytest.raises(ForgedReport, match="not from the sandbox's handler for vector 14"):
        fn()


def test_stub_entered_with_a_fake_frame_address_is_refused():
    # The stub's own `out`, but with RSP far outside memory: refused, never a GuestMemoryError.
    fn = _asm(f"mov $0x40000000, %rsp\n jmp {STUB_ADDR + PF * 16:#x}", user_mode=False)
    with pytest.raises(ForgedReport, match="outside the guest's memory"):
        fn()


def test_host_call_by_out_goes_through_the_gp_gate_and_resumes():
    # `out` to 0xE0 (the old ABI): #GP, the stub reports it, the host answers and resumes after it.
    fn = _asm("movq $0x200000, 0x200008\n movq $4, 0x200010\n mov $1, %eax\n out %al, $0xe0\n"
              "mov $77, %eax\n ret")
    result = fn.run()
    assert result.value == 77 and result.output == b"KVMP"  # the ABI block's magic, written out

