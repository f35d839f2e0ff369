"""Guest exceptions reach the guest's own IDT handlers; kvmpy's int3 assist.

The handlers report what the CPU gave them (CR2, error code, the frame's
RIP) through port 0x14, so each test checks the guest's view of the
exception, which is the same on this software backend and on hardware.
"""

from __future__ import annotations

import pytest

from kvmpy.assists import Assists
from kvmpy.errors import GuestError
from kvmpy.exits import ExitReason, HltExit, InternalError, InternalErrorExit
from kvmpy.x86 import modes

UNMAPPED = 0x4000_0000  # the first 2 MiB page of the second GiB, removed from the identity map


def _unmap_2m_page(gpa: int):
    def edit(mem):
        pd = modes.PD_ADDR + (gpa >> 30) * 4096
        mem.write_u64(pd + ((gpa >> 21) & 0x1FF) * 8, 0)
    return edit


def test_page_fault_handler_sees_cr2_and_error_code_of_a_write_to_an_unmapped_page(guest):
    g = guest("64", f"""
        movq $1, {UNMAPPED + 0x123:#x}
        hlt
    .org 0x100
    page_fault:
        pop %rax                # the error code
        mov $0x14, %dx
        out %eax, %dx
        mov %cr2, %rax
        out %eax, %dx
        shr $32, %rax
        out %eax, %dx
        hlt
    """, idt={14: 0x100}, setup_memory=_unmap_2m_page(UNMAPPED))
    assert isinstance(g.run(), HltExit)
    error_code, cr2_low, cr2_high = g.port.values(4)
    assert error_code == 0x2  # W=1 (a write), P=0 (not present), U=0 (supervisor)
    assert (cr2_high << 32) | cr2_low == UNMAPPED + 0x123


def test_page_fault_from_a_read_has_error_code_zero(guest):
    g = guest("64", f"""
        mov {UNMAPPED + 8:#x}, %rax
        hlt
    .org 0x100
        pop %rax
        out %eax, $0x14
        hlt
    """, idt={14: 0x100}, setup_memory=_unmap_2m_page(UNMAPPED))
    g.run()
    assert g.port.values(4) == [0]


def test_ud2_reaches_the_invalid_opcode_handler_with_the_ud2_address(guest):
    g = guest("64", """
        nop
        ud2
        hlt
    .org 0x100
    invalid_opcode:
        mov (%rsp), %rax        # frame RIP: the faulting ud2 itself
        out %eax, $0x14
        hlt
    """, idt={6: 0x100})
    assert isinstance(g.run(), HltExit)
    assert g.port.values(4) == [g.entry + 1]


def test_int3_runs_the_breakpoint_handler_with_the_address_after_the_int3(guest):
    g = guest("64", """
        int3
        out %al, $0x11          # reached only after the handler's iretq
        hlt
    .org 0x100
    breakpoint:
        mov (%rsp), %rax        # frame RIP: the instruction after int3
        out %eax, $0x14
        iretq
    """, idt={3: 0x100})
    exit = g.run()
    assert isinstance(exit, HltExit)
    assert g.port.values(4) == [g.entry + 1]
    assert len(g.port.values(1)) == 1
    # Hardware runs int3 without an exit; this backend needs the assist once.
    assert g.assists.completed["int3"] in (0, 1)


def _emulation_failure(insn: bytes) -> InternalErrorExit:
    return InternalErrorExit(ExitReason.INTERNAL_ERROR, InternalError.EMULATION, (), insn)


def test_unknown_emulation_failure_raises_guest_error_with_vcpu_rip_mode_and_bytes(guest):
    g = guest("64", "hlt")
    regs = g.vcpu.get_regs()
    regs.rip = 0x10_0ABC
    g.vcpu.set_regs(regs)
    ldmxcsr = b"\x0f\xae\x10"
    with pytest.raises(GuestError) as info:
        Assists().handle(g.vcpu, _emulation_failure(ldmxcsr))
    e = info.value
    assert (e.vcpu, e.rip, e.mode, e.insn) == (0, 0x10_0ABC, "long64", ldmxcsr)
    assert "rip 0x100abc" in str(e) and "0f ae 10" in str(e)


def test_emulation_failure_without_kvm_bytes_reads_them_through_the_guest_page_tables(guest):
    g = guest("64", "hlt")
    g.mem.write(0x20_0000, b"\x0f\x38\xc8\xc8")  # sha1nexte: Unicorn cannot complete it
    regs = g.vcpu.get_regs()
    regs.rip = 0x20_0000
    g.vcpu.set_regs(regs)
    with pytest.raises(GuestError) as info:
        Assists(memory=g.mem).handle(g.vcpu, _emulation_failure(b""))
    assert info.value.insn[:4] == b"\x0f\x38\xc8\xc8"
    assert info.value.disassembly == "sha1nexte xmm1, xmm0"


def test_assist_completes_int3_by_advancing_rip_and_injecting_breakpoint(guest):
    g = guest("64", "hlt")
    regs = g.vcpu.get_regs()
    start = regs.rip
    assists = Assists()
    assert assists.handle(g.vcpu, _emulation_failure(b"\xcc")) is True
    assert g.vcpu.get_regs().rip == start + 1
    events = g.vcpu.get_vcpu_events()
    # KVM_GET_VCPU_EVENTS reports a soft exception (#BP) with injected=0
    # (it cannot give its instruction length), but the vector is the one queued.
    assert events.exception.nr == 3
    assert assists.completed["int3"] == 1


def test_disabled_assists_raise_even_for_int3(guest):
    g = guest("64", "hlt")
    with pytest.raises(GuestError):
        Assists(enabled=False).handle(g.vcpu, _emulation_failure(b"\xcc"))
