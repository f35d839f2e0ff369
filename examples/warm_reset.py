"""Warm reset: one VM reused for every call of a guest function, reset to a checkpoint in between.

A C function counts its calls in a static variable and scribbles over a
buffer. In a fresh VM per call the count is always 1; with `warm=True` the
VM is built once and reset after each call (only the dirtied pages copied
back, registers through kvm_run), and the count is still 1: nothing of one
call is visible to the next. Then the same at the Vm level: checkpoint a VM,
let a guest write pages, reset, and compare memory.

    .venv/bin/python examples/warm_reset.py
"""

from __future__ import annotations

import statistics
import time

import kvmpy
from kvmpy.sandbox import GuestFunction
from kvmpy.x86 import modes
from kvmpy.x86.asm import assemble

COUNTER = r"""
#include <kvmpy_guest.h>

static long calls;            /* .bss: zero in the image */
static char scratch[64 << 10];

long guest_main(long fill) {
    calls++;
    for (long i = 0; i < (long)sizeof scratch; i += 4096)
        scratch[i] = (char)fill;
    return calls * 1000 + scratch[4096];
}
"""


def median_us(fn, n: int) -> float:
    ts = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def main() -> None:
    fresh = GuestFunction(COUNTER)
    with GuestFunction(COUNTER, warm=True) as warm:
        results = {warm(7) for _ in range(20)}
        print(f"warm calls see a fresh guest every time: {sorted(results)}")
        print(f"VMs built for 20 warm calls: {warm.warm_vms_built}")
        f, w = median_us(fresh, 30), median_us(warm, 200)
        print(f"per call: fresh VM {f:.0f} us, warm VM {w:.0f} us ({f / w:.0f}x faster)")

    # The same service at the Vm level: checkpoint, dirty some pages, reset.
    kvm = kvmpy.Kvm()
    with kvm.create_vm() as vm, kvmpy.GuestMemory("4M") as mem:
        vm.add_memory(mem)
        code = assemble("""
            mov $0x200000, %rdi
            mov $5, %ecx
        1:  movq $0x1234, (%rdi)
            add $0x3000, %rdi
            dec %ecx
            jnz 1b
            hlt
        """, "64", 0x10000)
        mem.write(0x10000, code)
        vcpu = vm.create_vcpu()
        vcpu.set_cpuid2(kvm.get_supported_cpuid())
        modes.setup_long_mode(vcpu, mem, entry=0x10000)
        checkpoint = vm.checkpoint()
        before = mem.read(0, mem.size)
        vcpu.run()
        print(f"the guest changed memory: {mem.read(0, mem.size) != before}")
        stats = vm.reset()
        print(f"reset copied back {stats.pages} pages; memory as checkpointed: {mem.read(0, mem.size) == before}")
        print(f"dirty tracking by {checkpoint.tracker.mode.value}")


if __name__ == "__main__":
    main()
