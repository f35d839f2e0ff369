"""What the KVM backend does on privilege transitions from guest user mode (CPL3).

A CPL0 stub sets STAR/LSTAR/SFMASK like Linux, then `iretq`s to user code
at CPL3 (IOPL 3, so the user code and a handler reached at CPL3 can report
through ports). Handlers report the CS they run with, so each test shows
the privilege level the guest really got. Expectations differ by backend:
on VT-x/AMD-V `syscall` enters CPL0; on the PVM software backend it stays
at CPL3 unless kvmpy's syscall trap completes it (docs/pvm.md).
"""

from __future__ import annotations

import pytest

from kvmpy._kvm import lib
from kvmpy.exits import DebugExit, HltExit
from kvmpy.platform import Backend, detect_backend
from kvmpy.x86 import modes
from kvmpy.stats import profile
from kvmpy.x86.syscall_trap import TRAP_VA, SyscallTrap

PVM = detect_backend() is Backend.PVM
USER_STACK = 0x80000
KERNEL_STACK = 0x7000
REPORT = 0x14  # handler reports: port offset 4
RECORD = 0x90000  # syscall_entry's record: CS, RCX, RFLAGS, R11, count; then user marks (u64 each)
LSTAR_READ = 0x16  # the stub's rdmsr of LSTAR: offset 6
GP, UD, PF, SOFT_INT = 13, 6, 14, 0x80

STUB = f"""
    mov $0xc0000081, %ecx           # STAR: SYSRET base 0x20, SYSCALL CS 0x10 (Linux's)
    xor %eax, %eax
    mov $0x00200010, %edx
    wrmsr
    mov $0xc0000082, %ecx           # LSTAR
    lea syscall_entry(%rip), %rax
    mov %rax, %rdx
    shr $32, %rdx
    wrmsr
    rdmsr                           # what the guest reads back from LSTAR
    out %eax, ${LSTAR_READ:#x}
    mov %edx, %eax
    out %eax, ${LSTAR_READ:#x}
    mov $0xc0000084, %ecx           # SFMASK: clear IF on entry, as Linux does
    mov $0x200, %eax
    xor %edx, %edx
    wrmsr
    push $0x2b                      # SS = __USER_DS
    push ${USER_STACK:#x}
    push $0x3202                    # RFLAGS: IF, IOPL 3
    push $0x33                      # CS = __USER_CS
    lea user(%rip), %rax
    push %rax
    iretq
syscall_entry:                      # records what SYSCALL left, in memory: an `out`
    mov %cs, 0x90000                #   could fault if the entry is not at CPL0
    mov %rcx, 0x90008
    pushfq
    popq 0x90010
    mov %r11, 0x90018
    incq 0x90020                    # entries counted
    sysretq
.org 0x200
gp_handler:
    pop %rbx                        # error code
    mov $13, %eax
    jmp report_fault
.org 0x280
ud_handler:
    mov $6, %eax
    jmp report_fault
.org 0x300
pf_handler:
    pop %rbx                        # error code
    mov $14, %eax
    out %eax, ${REPORT:#x}
    mov %ebx, %eax
    out %eax, ${REPORT:#x}
    mov %cr2, %rax
    out %eax, ${REPORT:#x}
    mov 8(%rsp), %rax               # frame CS
    out %eax, ${REPORT:#x}
    hlt
.org 0x380
soft_int_handler:
    mov $0x80, %eax
    jmp report_fault
report_fault:
    out %eax, ${REPORT:#x}
    mov %cs, %ax
    out %ax, ${REPORT:#x}
    mov 8(%rsp), %rax               # frame CS: where the fault came from
    out %eax, ${REPORT:#x}
    mov %rsp, %rax                  # the stack switch to TSS.RSP0
    out %eax, ${REPORT:#x}
    mov (%rsp), %rax                # frame RIP
    out %eax, ${REPORT:#x}
    mov 16(%rsp), %rax              # frame RFLAGS
    out %eax, ${REPORT:#x}
    hlt
.org 0x400
user:
"""


def _guest(guest, user_code: str, *, trap: bool = False):
    g = guest("64", STUB + user_code)
    idt = {GP: g.entry + 0x200, UD: g.entry + 0x280, PF: g.entry + 0x300, SOFT_INT: g.entry + 0x380}
    modes.setup_long_mode(g.vcpu, g.mem, g.entry, stack=KERNEL_STACK, idt=idt,
                          user_vectors=frozenset({SOFT_INT}), tss_rsp0=KERNEL_STACK,
                          user_pages=True, efer_extra=modes.EFER_SCE)
    loop = g.make_loop()
    if trap:
        SyscallTrap(g.vm, g.mem).attach(loop)
    return g, loop


def _syscall_user() -> str:
    return """
    syscall
    incq 0x90028                    # back in user mode after sysretq
    hlt                             # CPL3 hlt: #GP ends the test
    """


def test_iretq_reaches_user_mode_and_a_user_hlt_is_a_general_protection_fault(guest):
    g, loop = _guest(guest, "hlt")
    assert isinstance(loop.run(), HltExit)
    vector, handler_cs, frame_cs, rsp, rip, rflags = g.port.values(4)
    assert (vector, handler_cs, frame_cs) == (GP, 0x10, 0x33)
    assert g.mem.read(rip, 1) == b"\xf4"  # the user's hlt
    assert rflags & 0x200  # IF as iretq set it
    # The CPU switched to TSS.RSP0 and pushed SS, RSP, RFLAGS, CS, RIP, error code.
    assert rsp == KERNEL_STACK - 5 * 8  # after popping the error code


def _record(g) -> tuple[int, int, int, int, int]:
    """syscall_entry's record: (CS, RCX, RFLAGS, R11, number of entries)."""
    return tuple(g.mem.read_u64(RECORD + 8 * i) for i in range(5))  # type: ignore[return-value]


def _user_marks(g) -> int:
    """How often user code ran past its syscall (it can only report through memory)."""
    return g.mem.read_u64(RECORD + 0x28)


def _fault(g) -> list[int]:
    """The last fault report: vector, handler CS, frame CS, RSP, frame RIP, frame RFLAGS."""
    return g.port.values(4)[-6:]


def test_syscall_from_user_mode_without_help(guest):
    g, loop = _guest(guest, _syscall_user())
    assert isinstance(loop.run(), HltExit)
    cs, rcx, rflags, r11, entries = _record(g)
    assert entries == 1
    assert rcx == g.entry + 0x402  # RCX = the instruction after the 2-byte syscall
    assert r11 & 0x200  # R11 = the user's RFLAGS (IF set)
    if PVM:
        # The backend loads RIP from LSTAR, RCX, R11 and masks RFLAGS, but
        # keeps CS at the user's: the "kernel" entry runs at CPL3 and its
        # sysretq is a #GP from user mode. (pushfq there shows IF=1: user
        # mode runs natively, so the masked IF is not what it reads.)
        assert cs == 0x33
        vector, _, frame_cs, _, rip, _ = _fault(g)
        assert (vector, frame_cs) == (GP, 0x33)
        assert g.mem.read(rip, 3) == b"\x48\x0f\x07"  # the sysretq
        assert _user_marks(g) == 0
    else:
        assert cs == 0x10
        assert not rflags & 0x200  # SFMASK cleared IF
        assert _user_marks(g) == 1  # sysretq returned to user mode


@pytest.mark.skipif(not PVM, reason="the syscall trap is only applied on the PVM backend")
def test_syscall_trap_enters_the_kernel_at_cpl0_and_sysret_returns(guest):
    g, loop = _guest(guest, _syscall_user(), trap=True)
    assert isinstance(loop.run(), HltExit)
    cs, rcx, rflags, r11, entries = _record(g)
    assert (cs, entries) == (0x10, 1)  # the entry ran with the kernel's CS
    assert rcx == g.entry + 0x402
    assert r11 & 0x200 and not rflags & 0x200
    assert _user_marks(g) == 1  # its sysretq came back to user mode
    assert _fault(g)[:3] == [GP, 0x10, 0x33]  # and the final user hlt faulted there


@pytest.mark.skipif(not PVM, reason="the syscall trap is only applied on the PVM backend")
def test_syscall_trap_survives_many_round_trips(guest):
    g, loop = _guest(guest, """
    mov $200, %r12
1:  syscall
    dec %r12
    jnz 1b
    incq 0x90028
    hlt
    """, trap=True)
    assert isinstance(loop.run(), HltExit)
    assert _record(g)[4] == 200
    assert _user_marks(g) == 1


@pytest.mark.skipif(not PVM, reason="the syscall trap is only applied on the PVM backend")
def test_guest_reads_its_own_lstar_while_the_cpu_holds_the_trap_address(guest):
    g, loop = _guest(guest, "hlt", trap=True)
    loop.run()
    low, high = g.port.values(6)
    entry_offset = g.code.index(bytes.fromhex("8c0c25") + RECORD.to_bytes(4, "little"))  # mov %cs, RECORD
    assert (high << 32) | low == g.entry + entry_offset
    assert g.vcpu.get_msrs([0xC000_0082])[0xC000_0082] == 0xFFFF_FE80_0000_0000


def test_iopl_3_given_to_user_mode_by_iretq(guest):
    g, loop = _guest(guest, "hlt")
    loop.run()
    iopl = (_fault(g)[5] >> 12) & 3
    # The PVM backend runs user mode with IOPL 0 whatever iretq loads, so
    # port I/O from guest user mode always faults there.
    assert iopl == (0 if PVM else 3)


def test_int_0x80_through_a_dpl3_gate(guest):
    g, loop = _guest(guest, "int $0x80\nhlt")
    assert isinstance(loop.run(), HltExit)
    vector, handler_cs, frame_cs = _fault(g)[:3]
    if PVM:
        assert vector == UD  # the backend raises #UD for int n at CPL3
    else:
        assert vector == SOFT_INT
    assert (handler_cs, frame_cs) == (0x10, 0x33)


def test_ud2_from_user_mode_reaches_the_kernel_handler_at_cpl0(guest):
    g, loop = _guest(guest, "ud2")
    assert isinstance(loop.run(), HltExit)
    assert _fault(g)[:3] == [UD, 0x10, 0x33]


def test_user_access_to_a_supervisor_page_faults_with_the_user_bit_in_the_error_code(guest):
    # Clear the user bit of the 2 MiB page holding 0x600000.
    g, loop = _guest(guest, "mov 0x600000, %rax\nhlt")
    pde = modes.PD_ADDR + (0x600000 >> 21) * 8
    g.mem.write_u64(pde, g.mem.read_u64(pde) & ~modes.PTE_US)
    assert isinstance(loop.run(), HltExit)
    vector, error, cr2, frame_cs = g.port.values(4)
    assert (vector, cr2, frame_cs) == (PF, 0x600000, 0x33)
    assert error == 0x5  # present, read, user


def test_guest_debug_single_step_in_user_mode(guest):
    # KVM_GUESTDBG_SINGLESTEP is how a VMM counts guest instructions exactly without a PMU.
    # Each step exits with the PC of the next instruction; the loop stops at the first step
    # inside the #GP handler that the user's hlt enters.
    g, loop = _guest(guest, "nop\nnop\nnop\nnop\nhlt")
    user, handlers = g.entry + 0x400, g.entry + 0x200
    steps = []

    def step(exit: DebugExit) -> bool:
        steps.append(exit.pc)
        return not handlers <= exit.pc < user

    loop.handlers[lib.KVM_EXIT_DEBUG] = step
    g.vcpu.set_guest_debug(lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_SINGLESTEP)
    assert isinstance(loop.run(), DebugExit)
    kernel = [pc for pc in steps if pc < handlers]
    in_user = [pc - user for pc in steps if user <= pc]
    assert kernel and steps[-1] == handlers + 1  # the stub was stepped; then the handler's `pop`
    if PVM:
        # Instructions at CPL0 (emulated) are stepped, user mode (run natively) is not: a
        # sandbox payload at CPL3 cannot be held to an exact instruction budget here.
        assert in_user == []
    else:
        # Steps land on the user's instructions (iretq loads RFLAGS from its frame, so whether
        # KVM's TF survives it into user mode is the host's business; none may land elsewhere).
        assert set(in_user) <= {0, 1, 2, 3, 4}


@pytest.mark.skipif(not PVM, reason="the syscall trap is only applied on the PVM backend")
def test_syscall_traps_are_booked_as_syscall_trap_not_as_internal_errors(guest):
    _, loop = _guest(guest, """
    mov $20, %r12
1:  syscall
    dec %r12
    jnz 1b
    hlt
    """, trap=True)
    sites = profile.attach(loop)  # every exit: the trap syncs the registers
    assert isinstance(loop.run(), HltExit)
    snap = loop.accounting.snapshot()
    trap = snap["reasons"]["syscall trap"]
    assert (trap["count"], trap["kvm_reason"], trap["handled_as"]) == (20, "INTERNAL_ERROR", "syscall trap")
    assert trap["vmm_ns"] > 0 and sum(trap["vmm_hist"]) == 20
    assert "INTERNAL_ERROR" not in snap["reasons"]
    assert snap["kvm_reasons"]["INTERNAL_ERROR"] == 20  # KVM's reason stays available
    assert loop.accounting.exits[lib.KVM_EXIT_INTERNAL_ERROR] == 20
    (site,) = [s for s in sites.top_sites() if "syscall trap" in s["reasons"]]
    assert site["rip"] == TRAP_VA and site["reasons"] == {"syscall trap": 20}
