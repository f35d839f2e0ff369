"""Warm guest functions: one VM reused by every call, and nothing of one call visible to the next.

The payload below either leaves traces (mode >= 1) of every kind a CPL3
guest can touch, in every page of its RAM, its registers, x87/SSE state,
MXCSR, RFLAGS and segment registers, ending by returning, faulting, running
past its budget or single-stepping; or looks (mode 0): it dumps what it
finds at entry and counts the trace value in all of its memory.
"""

from __future__ import annotations

import struct

import pytest
from kvmpy._kvm import lib

from kvmpy.dirty import DirtyLogMode
from kvmpy.sandbox import PROLOGUE_ADDR, BudgetExceeded, GuestFault, GuestFunction

KVM_SYNC_X86_REGS = lib.KVM_SYNC_X86_REGS
MEMORY = 8 << 20
KEY = 0x5EC2_E77A_111E_A6B5
DUMP = 0x300000
DUMP_SIZE = 728
LOOK, LEAVE, LEAVE_FAULT, LEAVE_SPIN, LEAVE_STEP, LEAVE_AVX, LOOK_AVX, LEAVE_BASES, LOOK_BASES = range(9)

GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
SAVE_GPRS = "\n".join(f"    mov %{r}, {DUMP + 8 * i:#x}" for i, r in enumerate(GPRS) if r != "rsi")
SEGMENTS = ("ds", "es", "fs", "gs", "ss", "cs")
SAVE_SEGMENTS = "\n".join(f"    mov %{s}, %ax\n    mov %rax, {DUMP + 136 + 8 * i:#x}" for i, s in enumerate(SEGMENTS))
SET_GPRS = "\n".join(f"    mov %rsi, %{r}" for r in ("rbx", "rcx", "rbp", "r8", "r9", "r10", "r11", "r12",
                                                        "r13", "r14", "r15"))
SET_XMM = "\n".join(f"    movq %rsi, %xmm{i}" for i in range(16))

# rdi = mode, rsi = trace value, rdx = memory limit. Code stays below image + 0x900.
TRACES = f"""
{SAVE_GPRS}
    pushfq
    pop %rax
    mov %rax, {DUMP + 128:#x}
    xor %eax, %eax
{SAVE_SEGMENTS}
    cmp ${LOOK}, %rdi
    je look
    cmp ${LOOK_AVX}, %rdi
    je look_avx
    cmp ${LEAVE_AVX}, %rdi
    je leave_avx
    cmp ${LEAVE_BASES}, %rdi
    je leave_bases
    cmp ${LOOK_BASES}, %rdi
    je look_bases
    mov $0x200000, %rax             # a trace in every page of RAM the payload can reach
1:  mov %rsi, 0x900(%rax)           # past the return trampoline at 0x200800
    add $4096, %rax
    cmp %rdx, %rax
    jb 1b
{SET_XMM}
    mov %rsi, {DUMP + 0x100:#x}
    fildq {DUMP + 0x100:#x}          # two x87 registers in use
    fildq {DUMP + 0x100:#x}
    movl $0x7f80, {DUMP + 0x108:#x}
    ldmxcsr {DUMP + 0x108:#x}        # round toward zero
{SET_GPRS}
    mov $0x2b, %eax                  # the user data selector where the call began with null ones
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %fs
    mov %eax, %gs
    std
    cmp ${LEAVE_FAULT}, %rdi
    je 2f
    cmp ${LEAVE_SPIN}, %rdi
    je 3f
    cmp ${LEAVE_STEP}, %rdi
    je 4f
    mov %rsi, %rax
    ret
2:  ud2
3:  jmp 3b
4:  pushfq
    orq $0x100, (%rsp)               # TF: a #DB after the next instruction
    popfq
    nop
    nop
    ret
leave_bases:
    mov %rsi, %rax
    shl $17, %rax                    # a canonical address made of the trace value
    shr $17, %rax
    wrfsbase %rax
    wrgsbase %rax
    ret
look_bases:
    rdfsbase %rax
    rdgsbase %rcx
    or %rcx, %rax
    ret
leave_avx:
    vmovq %rsi, %xmm1
    vpbroadcastq %xmm1, %ymm1        # the upper half of ymm1 too
    mov %rsi, %rax
    ret
look_avx:
    vextracti128 $1, %ymm1, %xmm2
    vmovdqu %xmm2, {DUMP + 712:#x}
    vpxor %xmm2, %xmm2, %xmm2
look:
    mov $0x200000, %rax             # count the trace value in all of RAM
    xor %ecx, %ecx
1:  cmp %rsi, (%rax)
    jne 2f
    inc %rcx
2:  add $8, %rax
    cmp %rdx, %rax
    jb 1b
    mov %rcx, {DUMP + 704:#x}
    fxsave64 {DUMP + 192:#x}
    movq ${DUMP:#x}, 0x200008        # kvmpy_write(dump, size) through the doorbell
    movq ${DUMP_SIZE}, 0x200010
    mov $0xc0000000, %ecx
    movb $1, (%rcx)
    xor %eax, %eax
    ret
"""


def _fn(mode=None, **kw):
    return GuestFunction(TRACES, lang="asm", memory=MEMORY, warm=True, dirty_mode=mode, timeout=10.0, **kw)


def _look(fn, mode=LOOK):
    out = fn.run(mode, KEY, MEMORY).output
    assert len(out) == DUMP_SIZE
    regs = dict(zip(GPRS, struct.unpack_from("<16Q", out, 0)))
    del regs["rsi"]  # the payload keeps its argument out of memory
    return {
        "memory: trace values found": struct.unpack_from("<Q", out, 704)[0],
        "registers": regs,
        "rflags": struct.unpack_from("<Q", out, 128)[0],
        "segments": dict(zip(SEGMENTS, (v & 0xFFFF for v in struct.unpack_from("<6Q", out, 136)))),
        "x87 control/status/tag, mxcsr": struct.unpack_from("<HHB", out, 192) + struct.unpack_from("<I", out, 192 + 24),
        "x87 registers": out[192 + 32:192 + 160],
        "xmm registers": out[192 + 160:192 + 416],
        "ymm upper halves": out[712:728],
    }


def _assert_same(before, after):
    for kind in before:
        assert after[kind] == before[kind], f"{kind} leaked from one call to the next"


MODES = [DirtyLogMode.RING, DirtyLogMode.BITMAP]


def test_payload_holds_no_trace_value_of_its_own():
    fn = _fn()
    assert KEY.to_bytes(8, "little") not in fn.image.segments[0].data
    assert len(fn.image.segments[0].data) < 0x900  # the traces at +0x900 of each page miss the code


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_nothing_of_a_call_is_visible_to_the_next(mode):
    with _fn(mode) as fn:
        before = _look(fn)
        assert before["memory: trace values found"] == 0
        assert fn.run(LEAVE, KEY, MEMORY).value == KEY
        _assert_same(before, _look(fn))
        assert fn.warm_vms_built == 1  # the same VM all along


ENDINGS = [(LEAVE_FAULT, GuestFault, 10.0), (LEAVE_SPIN, BudgetExceeded, 1.5), (LEAVE_STEP, GuestFault, 10.0)]


@pytest.mark.parametrize("ending,error,budget", ENDINGS, ids=["fault", "budget", "single-step"])
def test_a_call_that_fails_midway_leaves_nothing_either(ending, error, budget):
    # (The budget leaves room for the first write to every page, slow on a loaded shared host.)
    with _fn() as fn:
        before = _look(fn)
        with pytest.raises(error):
            fn.run(ending, KEY, MEMORY, timeout=budget)
        _assert_same(before, _look(fn))
        assert fn.warm_vms_built == 1


def test_pages_left_writable_after_repeated_writes_are_restored_at_every_reset():
    # Pages dirtied by two calls in a row stay writable (no write fault per call) and are copied back
    # at every reset: traces written into them by later calls are gone all the same.
    with _fn(DirtyLogMode.BITMAP) as fn:
        before = _look(fn)
        for _ in range(3):
            fn.run(LEAVE, KEY, MEMORY)
        hot = next(iter(fn._warm_vms.values())).checkpoint.hot
        assert sum(len(p) for p in hot.values()) > 100  # the path under test was taken
        _assert_same(before, _look(fn))
        fn.run(LEAVE, KEY, MEMORY)  # once more, now writing the hot pages without faults
        _assert_same(before, _look(fn))


def test_fault_frame_on_the_kernel_stack_is_restored_too():
    with _fn() as fn:
        _look(fn)
        warm = next(iter(fn._warm_vms.values()))
        image = warm.checkpoint.image[0]
        with pytest.raises(GuestFault, match="#UD"):
            fn.run(LEAVE_FAULT, KEY, MEMORY)
        assert bytes(warm.mem.view(0, 0x80000)) == image.read(0, 0x80000)  # supervisor memory as checkpointed


def test_avx_state_does_not_survive_a_call():
    with _fn() as fn:
        try:
            fn.run(LEAVE_AVX, KEY, MEMORY)
        except GuestFault as e:  # a backend that keeps AVX from CPL3 without CR4.OSXSAVE
            assert e.vector == 6
            return
        assert _look(fn, LOOK_AVX)["ymm upper halves"] == bytes(16)


def test_fs_and_gs_bases_do_not_survive_a_call():
    with _fn() as fn:
        try:
            fn.run(LEAVE_BASES, KEY, MEMORY)
        except GuestFault as e:  # CR4.FSGSBASE is clear: a CPU that honours it refuses wrfsbase
            assert e.vector == 6
            return
        assert fn.run(LOOK_BASES, KEY, MEMORY).value == 0


def test_without_the_reset_the_look_call_sees_every_trace():
    # The control: with the reset switched off, each kind of trace is visible, so the tests above can fail.
    with _fn() as fn:
        before = _look(fn)
        warm = next(iter(fn._warm_vms.values()))
        run = warm.vcpu.run_struct

        def restart_only():  # back to the entry point; registers as the last call left them
            run.s.regs.regs.rip, run.s.regs.regs.rsp = PROLOGUE_ADDR, MEMORY - 8
            run.kvm_dirty_regs |= KVM_SYNC_X86_REGS

        warm.checkpoint.reset = restart_only
        fn.run(LEAVE, KEY, MEMORY)
        after = _look(fn)
        assert after["memory: trace values found"] >= (MEMORY - 0x200000) // 4096
        # (Segment selectors are nulled by the sandbox's entry prologue, not by the reset.)
        for kind in ("registers", "rflags", "x87 control/status/tag, mxcsr", "x87 registers", "xmm registers"):
            assert after[kind] != before[kind], kind
        try:
            fn.run(LEAVE_AVX, KEY, MEMORY)
        except GuestFault:
            return  # no AVX from CPL3 here
        assert _look(fn, LOOK_AVX)["ymm upper halves"] == KEY.to_bytes(8, "little") * 2


def test_host_call_output_and_budget_are_per_call():
    with _fn(max_hostcalls=1) as fn:
        for _ in range(3):
            assert len(fn.run(LOOK, KEY, MEMORY).output) == DUMP_SIZE  # one host call each time


def test_warm_calls_from_two_threads_use_a_vm_each():
    import threading
    with _fn() as fn:
        before = _look(fn)
        seen = []
        t = threading.Thread(target=lambda: seen.append(_look(fn)))
        t.start()
        t.join()
        assert fn.warm_vms_built == 2 and seen[0] == before


WRITER = ("long guest_main(long n) { volatile char *p = (char *)0x400000; "
          "for (long i = 0; i < n; i++) p[i * 4096] = 1; return n; }")


def test_a_full_dirty_ring_at_cpl3_exits_and_loses_no_page():
    # 6000 pages through a 4096-entry ring: KVM exits at the soft limit, the loop harvests and goes on.
    with GuestFunction(WRITER, memory="32M", warm=True, dirty_mode=DirtyLogMode.RING, timeout=30.0) as fn:
        fn(1)
        warm = next(iter(fn._warm_vms.values()))
        cp, resets = warm.checkpoint, []
        reset = cp.reset
        cp.reset = lambda: resets.append(reset())
        assert fn(6000) == 6000
        assert cp.tracker.ring_full_exits >= 1 and not resets[-1].full
        assert resets[-1].pages >= 6000
        assert bytes(warm.mem.view(0x400000, 6000 * 4096)) == cp.image[0].read(0x400000, 6000 * 4096)


def test_close_frees_every_warm_vm():
    import threading

    from kvmpy.pool import ResourceSnapshot

    fn = GuestFunction("long guest_main(long x) { return x + 1; }", warm=True)
    fn(1)  # compiled and the shared /dev/kvm handle opened before the baseline
    fn.close()
    before = ResourceSnapshot.take()
    threads = [threading.Thread(target=lambda: [fn(i) for i in range(5)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fn.warm_vms_built == 5  # one per thread that called it (and the first)
    image = sum(len(img.pages) for w in fn._warm_vms.values() for img in w.checkpoint.image.values())
    assert image <= 4 * 64  # each warm VM keeps its non-zero pages only: well under 1 MiB each
    fn.close()
    # fds and kvm_run mappings must be exactly back; the address-space slack covers glibc's
    # malloc arenas of the four new threads (64 MiB each); TAP devices are other tests' business.
    leaks = ResourceSnapshot.take().leaks_since(before, address_space_slack=512 << 20)
    assert [line for line in leaks if "network interfaces" not in line] == []
