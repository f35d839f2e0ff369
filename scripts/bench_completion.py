"""Cost of completing an instruction in userspace, per path (direct / Unicorn / injection).

(invpcid and rdtscp are left out: KVM keeps them out of this host's guest
CPUID, so the completion raises #UD there.)

A tiny CPL0 guest runs `N` iterations of one instruction in a loop; the
reference loop runs `nop` (emulated by KVM, no exit) the same number of
times in the same invocation. Cost per completion = (t_insn - t_nop) / N,
and the time spent inside `Assists.handle` (the VMM's part) is shown too.

    .venv/bin/python scripts/bench_completion.py [N]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import kvmpy  # noqa: E402
from guests import tiny_guest  # noqa: E402
from kvmpy.assists import Assists  # noqa: E402

CASES = [
    ("nop (reference)", "nop", {}),
    ("clac (direct)", "clac", {}),
    ("int3 (injection)", "int3", {3: 0x200}),
    ("int $0x20 (injection)", "int $0x20", {0x20: 0x200}),
    ("xgetbv (direct, KVM_GET_XCRS)", "xor %ecx, %ecx; xgetbv", {}),
    ("fwait (direct, KVM_GET_FPU)", "fwait", {}),
    ("popcnt (Unicorn)", "popcnt %rbx, %rax", {}),
    ("cmpxchg16b (Unicorn)", "lock cmpxchg16b (%rsi)", {}),
    ("pshufb (Unicorn + FPU state)", "pshufb %xmm0, %xmm1", {}),
]


def run(kvm: kvmpy.Kvm, body: str, idt: dict, n: int) -> tuple[float, Assists]:
    src = f"""
        mov $0x8000, %rsi
        movq $0, (%rsi)
        movq $0, 8(%rsi)
        mov $2, %ecx
        mov ${n}, %r15
    1:  {body}
        mov $2, %ecx
        dec %r15
        jnz 1b
        hlt
    .org 0x200
        iretq
    """
    g = tiny_guest(kvm, "64", src, idt=idt or None)
    s = g.vcpu.get_sregs()
    s.cr4 |= 1 << 18  # OSXSAVE, for xgetbv
    g.vcpu.set_sregs(s)
    a = Assists(g.mem, mmio_bus=g.mmio)
    try:
        t = time.perf_counter()
        g.run(assists=a)
        return time.perf_counter() - t, a
    finally:
        g.close()


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    kvm = kvmpy.Kvm()
    ref, _ = run(kvm, "nop", {}, n)
    print(f"{'instruction (path)':34} {'us/completion':>14} {'in handle()':>12} {'x nop':>8}")
    for name, body, idt in CASES:
        t, a = run(kvm, body, idt, n)
        per = (t - ref) / n * 1e6
        inside = sum(a.seconds.values()) / max(1, sum(a.completed.values())) * 1e6
        print(f"{name:34} {per:14.1f} {inside:12.1f} {t / ref:8.1f}")
    kvm.close()


if __name__ == "__main__":
    main()
