#!/usr/bin/env python3
"""Cost of booking exits by what kvmpy did with them (`Exit.handled_as` -> `ExitAccounting.book_as`).

The syscall trap and instruction completions name every exit they consume;
the loop then moves the exit to its label's row. This measures what that
adds per exit: a tiny real-mode guest loops on `hlt`, and a HLT handler
consumes each exit, naming it ("demo") or not, alternating runs on the same
VM, `--repeat` pairs. The report is the median time per exit of each and
the median of the per-pair ratios (named / unnamed), wall and vCPU-thread
CPU time; the reference is the same handled exit without a name.

    .venv/bin/python scripts/bench_exit_labels.py [--iterations N] [--repeat R] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import kvmpy
from kvmpy.x86 import modes
from kvmpy.x86.asm import assemble

ENTRY = 0x1000
MEM_SIZE = 0x10000
GUEST = """
    1: hlt
       jmp 1b
"""


class Guest:
    """One VM for the whole measurement: only whether the handler names the exit differs."""

    def __init__(self, kvm: kvmpy.Kvm) -> None:
        self.vm = kvm.create_vm()
        self.mem = kvmpy.GuestMemory(MEM_SIZE)
        self.vm.add_memory(self.mem)
        self.mem.write(ENTRY, assemble(GUEST, "16", ENTRY))
        self.vcpu = self.vm.create_vcpu()
        modes.setup_real_mode(self.vcpu, ENTRY)

    def run(self, count: int, named: bool) -> tuple[float, float]:
        """(wall ns, vCPU-thread CPU ns) per HLT exit for `count` exits."""
        left = [count]

        def on_hlt(exit: kvmpy.Exit) -> bool:
            if named:
                exit.handled_as = "demo"
            left[0] -= 1
            return left[0] > 0

        loop = kvmpy.VcpuLoop(self.vcpu, kvmpy.pio_bus(), kvmpy.mmio_bus(),
                              handlers={kvmpy.ExitReason.HLT: on_hlt})
        c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
        loop.run()
        t1, c1 = time.perf_counter_ns(), time.thread_time_ns()
        got = loop.accounting.handled.get("demo", 0)
        if got != (count if named else 0):
            raise SystemExit(f"{got} exits booked as 'demo', expected {count if named else 0}")
        return (t1 - t0) / count, (c1 - c0) / count

    def close(self) -> None:
        self.vm.close()
        self.mem.close()


def measure(iterations: int, repeat: int) -> dict:
    with kvmpy.Kvm() as kvm:
        guest = Guest(kvm)
        guest.run(max(iterations // 10, 1), True)  # warm-up
        named: list[tuple[float, float]] = []
        plain: list[tuple[float, float]] = []
        for i in range(repeat):
            order = (True, False) if i % 2 == 0 else (False, True)  # host-load drift cancels out
            for with_name in order:
                (named if with_name else plain).append(guest.run(iterations, with_name))
        guest.close()
    ratios = [a[0] / b[0] for a, b in zip(named, plain)]
    cpu_ratios = [a[1] / b[1] for a, b in zip(named, plain)]
    return {"iterations": iterations, "repeat": repeat,
            "named_ns": statistics.median(a for a, _ in named), "plain_ns": statistics.median(a for a, _ in plain),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "named_cpu_ns": statistics.median(c for _, c in named),
            "plain_cpu_ns": statistics.median(c for _, c in plain),
            "cpu_ratio": statistics.median(cpu_ratios)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=5000, help="exits per run (default 5000)")
    p.add_argument("--repeat", type=int, default=9, help="named/unnamed pairs (default 9)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    reason = kvmpy.kvm_available()
    if reason is not None:
        print(f"cannot benchmark: {reason}", file=sys.stderr)
        return 1
    r = measure(args.iterations, args.repeat)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"{r['iterations']} HLT exits x {r['repeat']} pairs, consumed by a handler: named "
          f"{r['named_ns'] / 1000:.2f} us/exit, unnamed {r['plain_ns'] / 1000:.2f} us/exit "
          f"(book_as: {(r['named_ns'] - r['plain_ns']) / 1000:+.2f} us)")
    print(f"wall ratio named/unnamed: {r['ratio']:.3f} (pairs {r['ratio_min']:.3f}-{r['ratio_max']:.3f}); "
          f"vCPU-thread CPU ratio {r['cpu_ratio']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
