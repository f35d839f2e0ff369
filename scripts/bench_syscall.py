#!/usr/bin/env python3
"""What a guest system call costs through kvmpy's syscall trap, against references in the same run.

A long-mode guest with a Linux-like GDT drops to user mode and runs N
`syscall`s whose kernel entry only counts and `sysretq`s. Measured, in
alternating rounds:

- trap:    the syscall loop with kvmpy's LSTAR trap (needed on the PVM backend;
           on VT-x/AMD-V the plain loop runs natively and this row is the plain one)
- out:     a CPL0 loop of N `out`s, each a port-I/O exit to kvmpy and back:
           the cheapest round trip through the VMM
- native:  N getppid() system calls on the host, from a C loop

and prints per-call times and ratios. `--update-docs` writes the table into
docs/performance.md.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import kvmpy
from perfdoc import update_section

from kvmpy.platform import Backend, detect_backend
from kvmpy.x86 import modes
from kvmpy.x86.asm import assemble
from kvmpy.x86.syscall_trap import SyscallTrap

ENTRY = 0x10000
HEADING = "## Guest system calls (scripts/bench_syscall.py)"

SYSCALL_GUEST = """
    mov $0xc0000081, %ecx
    xor %eax, %eax
    mov $0x00200010, %edx
    wrmsr
    mov $0xc0000082, %ecx
    lea entry(%rip), %rax
    mov %rax, %rdx
    shr $32, %rdx
    wrmsr
    mov $0xc0000084, %ecx
    mov $0x200, %eax
    xor %edx, %edx
    wrmsr
    push $0x2b
    push $0x80000
    push $0x202
    push $0x33
    lea user(%rip), %rax
    push %rax
    iretq
entry:
    incq 0x90000
    sysretq
user:
    mov $N, %r12
1:  syscall
    dec %r12
    jnz 1b
    hlt                             # CPL3 hlt: #GP, whose handler halts at CPL0
.org 0x400
gp:
    hlt
"""

OUT_GUEST = """
    mov $N, %ecx
1:  out %al, $0x80
    dec %ecx
    jnz 1b
    hlt
"""

NATIVE_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) syscall(SYS_getppid);
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.9f\n", (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9);
    return 0;
}
"""


class Sink:
    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        pass


def run_guest(kvm: kvmpy.Kvm, source: str, n: int, *, user: bool, trap: bool) -> float:
    """Seconds for one run of the guest loop (VM set up outside the timing)."""
    with kvm.create_vm() as vm, kvmpy.GuestMemory("4M") as mem:
        vm.add_memory(mem)
        mem.write(ENTRY, assemble(source.replace("$N", f"${n}"), "64", ENTRY))
        vcpu = vm.create_vcpu()
        vcpu.set_cpuid2(kvm.get_supported_cpuid())
        if user:
            modes.setup_long_mode(vcpu, mem, ENTRY, idt={13: ENTRY + 0x400}, tss_rsp0=0x7000,
                                  user_pages=True, efer_extra=modes.EFER_SCE)
        else:
            modes.setup_long_mode(vcpu, mem, ENTRY)
        pio = kvmpy.pio_bus()
        pio.register(0x80, 1, Sink())
        loop = kvmpy.VcpuLoop(vcpu, pio, kvmpy.mmio_bus())
        if trap:
            SyscallTrap(vm, mem).attach(loop)
        t = time.perf_counter()
        exit = loop.run()
        elapsed = time.perf_counter() - t
        if not isinstance(exit, kvmpy.HltExit):
            raise RuntimeError(f"guest ended with {exit}")
        if user and mem.read_u64(0x90000) != n:
            raise RuntimeError(f"guest made {mem.read_u64(0x90000)} of {n} system calls")
        return elapsed


def native(binary: Path, n: int) -> float:
    return float(subprocess.run([str(binary), str(n)], capture_output=True, text=True, check=True).stdout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=2000, help="system calls / exits per run")
    p.add_argument("--repeat", type=int, default=5, help="alternating rounds")
    p.add_argument("--update-docs", action="store_true", help="write the table into docs/performance.md")
    args = p.parse_args(argv)

    trap = detect_backend() is Backend.PVM
    n = args.iterations
    with tempfile.TemporaryDirectory() as tmp:
        src, binary = Path(tmp) / "n.c", Path(tmp) / "n"
        src.write_text(NATIVE_C)
        subprocess.run(["gcc", "-O2", "-o", str(binary), str(src)], check=True)
        samples: dict[str, list[float]] = {"syscall": [], "out": [], "native": []}
        with kvmpy.Kvm() as kvm:
            for _ in range(args.repeat):
                samples["syscall"].append(run_guest(kvm, SYSCALL_GUEST, n, user=True, trap=trap) / n)
                samples["out"].append(run_guest(kvm, OUT_GUEST, n, user=False, trap=False) / n)
                samples["native"].append(native(binary, n * 50) / (n * 50))

    med = {k: statistics.median(v) for k, v in samples.items()}
    rows = [
        ("guest syscall + sysret" + (" (kvmpy trap)" if trap else ""), med["syscall"], samples["syscall"]),
        ("CPL0 `out` exit round trip", med["out"], samples["out"]),
        ("host getppid() (C loop)", med["native"], samples["native"]),
    ]
    lines = [f"| {name} | {m * 1e6:.2f} us | {min(s) * 1e6:.2f}-{max(s) * 1e6:.2f} us |" for name, m, s in rows]
    table = "\n".join(["| what | per call (median) | range |", "| --- | --- | --- |", *lines])
    ratios = (f"guest syscall / `out` exit: {med['syscall'] / med['out']:.2f}x; "
              f"guest syscall / host syscall: {med['syscall'] / med['native']:.0f}x")
    print(table)
    print(ratios)
    if args.update_docs:
        backend = detect_backend().value
        section = (f"{HEADING}\n\nMeasured {datetime.date.today()} on backend `{backend}`, "
                   f"{n} calls per run, {args.repeat} alternating rounds.\n\n{table}\n\n{ratios}\n")
        update_section(HEADING, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
