"""Sandboxed guest functions (kvmpy.sandbox): results, faults, budgets, memory limit, teardown."""

from __future__ import annotations

import threading
import time

import psutil
import pytest

from kvmpy import sandbox
from kvmpy.sandbox import (BudgetExceeded, CompileError, GuestAbort, GuestFault, GuestFunction,
                           MemoryLimitExceeded, SandboxError)

MUL = "long guest_main(long a, long b) { return a * b; }"

FNV = """
#include <kvmpy_guest.h>
long guest_main(const unsigned char *s, long n) {
    uint64_t h = 14695981039346656037UL;
    for (long i = 0; i < n; i++) { h ^= s[i]; h *= 1099511628211UL; }
    return (long)h;
}
"""


def _fnv1a(data: bytes) -> int:
    h = 14695981039346656037
    for b in data:
        h = ((h ^ b) * 1099511628211) % 2**64
    return h - 2**64 if h >> 63 else h


def test_c_function_returns_its_result():
    assert sandbox.run(MUL, args=(6, 7)) == 42


def test_negative_results_come_back_signed():
    assert sandbox.run(MUL, args=(-3, 5)) == -15


def test_bytes_argument_is_passed_as_a_pointer_into_guest_memory():
    data = bytes(range(256)) * 8
    assert GuestFunction(FNV)(data, len(data)) == _fnv1a(data)


def test_guest_function_runs_many_times_each_in_a_fresh_vm():
    counter = GuestFunction("static long calls; long guest_main(long x) { return ++calls * 1000 + x; }")
    # A static starts at zero every call: no state survives from one VM to the next.
    assert [counter(i) for i in range(5)] == [1000, 1001, 1002, 1003, 1004]


def test_six_arguments_arrive_in_order():
    fn = GuestFunction("long guest_main(long a, long b, long c, long d, long e, long f)"
                       "{ return a + 10*b + 100*c + 1000*d + 10000*e + 100000*f; }")
    assert fn(1, 2, 3, 4, 5, 6) == 654321


def test_assembly_function_follows_the_same_calling_convention():
    assert sandbox.run("lea (%rdi,%rsi,2), %rax\nret", args=(1, 20), lang="asm") == 41


def test_machine_code_bytes_run_as_is():
    # mov %rdi, %rax; not %rax; ret
    assert sandbox.run(bytes.fromhex("4889f848f7d0c3"), args=(0,)) == -1


def test_guest_output_is_collected():
    fn = GuestFunction('#include <kvmpy_guest.h>\n'
                       'long guest_main(void) { kvmpy_write("hello ", 6); kvmpy_write("sandbox", 7); return 0; }')
    r = fn.run()
    assert r.output == b"hello sandbox" and r.hostcalls == 2


def test_host_call_reaches_a_python_function_and_returns_its_answer():
    seen = []

    def lookup(ctx, key, *_):
        seen.append(key)
        return key * key

    fn = GuestFunction("#include <kvmpy_guest.h>\n"
                       "long guest_main(long n) { long s = 0; for (long i = 1; i <= n; i++)"
                       " s += kvmpy_hostcall(16, i, 0, 0, 0); return s; }", hostcalls={16: lookup})
    assert fn(4) == 1 + 4 + 9 + 16
    assert seen == [1, 2, 3, 4]


def test_host_call_handler_can_read_guest_memory():
    got = []
    fn = GuestFunction('#include <kvmpy_guest.h>\n'
                       'long guest_main(void) { return kvmpy_hostcall(17, (long)"payload", 7, 0, 0); }',
                       hostcalls={17: lambda ctx, p, n, *_: got.append(ctx.read(p, n)) or 5})
    assert fn() == 5 and got == [b"payload"]


def test_unknown_host_call_is_an_error_naming_it():
    with pytest.raises(SandboxError, match="host call 99"):
        sandbox.run("#include <kvmpy_guest.h>\nlong guest_main(void) { return kvmpy_hostcall(99,0,0,0,0); }")


def test_null_pointer_read_is_a_page_fault_with_cr2():
    with pytest.raises(GuestFault) as info:
        sandbox.run("long guest_main(void) { return *(volatile long *)0x18; }")
    e = info.value
    assert e.vector == 14 and e.cr2 == 0x18 and e.cpl == 3
    assert e.rip >= sandbox.IMAGE_BASE
    assert "#PF" in str(e) and "0x18" in str(e)


def test_invalid_opcode_names_the_vector_and_rip():
    with pytest.raises(GuestFault) as info:
        sandbox.run("nop\nud2\nret", lang="asm")
    assert info.value.vector == 6 and info.value.rip == sandbox.IMAGE_BASE + 1


def test_divide_by_zero_is_a_divide_error():
    with pytest.raises(GuestFault) as info:
        sandbox.run("long guest_main(long a, long b) { return a / b; }", args=(1, 0))
    assert info.value.vector == 0 and "#DE" in str(info.value)


def test_guest_abort_carries_code_and_message():
    with pytest.raises(GuestAbort) as info:
        sandbox.run('#include <kvmpy_guest.h>\nlong guest_main(void) { kvmpy_abort(7, "bad input"); }')
    assert info.value.code == 7 and info.value.message == "bad input"


def test_budget_stops_a_runaway_loop_in_user_mode():
    t0 = time.monotonic()
    with pytest.raises(BudgetExceeded) as info:
        sandbox.run("jmp .", lang="asm", timeout=0.2)
    assert info.value.rip == sandbox.IMAGE_BASE
    assert time.monotonic() - t0 < 30  # stopped, not waited out


def test_budget_stops_a_runaway_loop_at_cpl0():
    with pytest.raises(BudgetExceeded) as info:
        sandbox.run("jmp .", lang="asm", timeout=0.2, user_mode=False)
    assert info.value.rip == sandbox.IMAGE_BASE


def test_budget_stops_a_c_infinite_loop():
    with pytest.raises(BudgetExceeded):
        sandbox.run("long guest_main(void) { for (volatile int i = 0;; i++) ; }", timeout=0.2)


def test_host_call_budget_stops_a_chatty_guest():
    fn = GuestFunction('#include <kvmpy_guest.h>\nlong guest_main(void) { for (;;) kvmpy_write("x", 1); }',
                       max_hostcalls=10)
    with pytest.raises(BudgetExceeded, match="more than 10 host calls"):
        fn()


def test_a_function_that_finishes_within_its_budget_returns():
    assert sandbox.run("long guest_main(long n) { volatile long s = 0; for (long i = 0; i < n; i++) s += i;"
                       " return s; }", args=(1_000_000,), timeout=20) == 499999500000


def test_store_beyond_the_memory_limit_is_refused():
    with pytest.raises(MemoryLimitExceeded) as info:
        sandbox.run("long guest_main(void) { *(volatile long *)(8UL << 20) = 1; return 0; }", memory="8M")
    assert info.value.cr2 == 8 << 20 and info.value.error_code & 2  # a write


def test_the_same_address_is_fine_with_more_memory():
    assert sandbox.run("long guest_main(void) { *(volatile long *)(8UL << 20) = 5;"
                       " return *(volatile long *)(8UL << 20); }", memory="16M") == 5


def test_allocator_returns_null_at_the_memory_limit():
    fn = GuestFunction("#include <kvmpy_guest.h>\n"
                       "long guest_main(long mib) { long n = 0; while (kvmpy_alloc(mib << 20)) n++; return n; }",
                       memory="16M")
    n = fn(1)
    assert 10 <= n < 16  # 16 MiB minus the 2 MiB supervisor area, the image and the stack
    assert GuestFunction(fn.image, memory="64M")(1) > 50


def test_argument_larger_than_the_memory_limit_is_refused_before_running():
    with pytest.raises(SandboxError, match="does not fit"):
        GuestFunction(FNV, memory="4M")(b"x" * (3 << 20), 1)


def test_memory_size_is_validated():
    with pytest.raises(ValueError, match="multiple of 2 MiB"):
        GuestFunction(MUL, memory="3M")


def test_compile_error_shows_gcc_diagnostics():
    with pytest.raises(CompileError, match="error"):
        GuestFunction("long guest_main(void) { return undefined_name; }")


def test_missing_entry_function_is_named():
    with pytest.raises(CompileError, match="guest_main"):
        GuestFunction("long other(void) { return 1; }")


def _resources() -> tuple[int, int]:
    p = psutil.Process()
    return p.num_fds(), threading.active_count()


def test_teardown_leaves_no_fds_or_threads_whatever_the_guest_did():
    ok = GuestFunction(MUL)
    fault = GuestFunction("long guest_main(void) { return *(volatile long *)0; }")
    spin = GuestFunction("jmp .", lang="asm", timeout=0.05)
    ok(1, 2)  # opens the shared /dev/kvm handle
    before = _resources()
    for _ in range(20):
        assert ok(3, 4) == 12
        with pytest.raises(GuestFault):
            fault()
        with pytest.raises(BudgetExceeded):
            spin()
    assert _resources() == before


def test_the_same_function_runs_at_cpl0_when_asked():
    # Emulated on the PVM backend (slow), so only a few instructions.
    assert sandbox.run(MUL, args=(6, 7), user_mode=False) == 42


def test_payload_runs_in_user_mode():
    # mov %cs, %ax: the low two bits are the CPL.
    assert sandbox.run("mov %cs, %eax\nand $3, %eax\nret", lang="asm") == 3
