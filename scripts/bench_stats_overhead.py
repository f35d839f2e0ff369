#!/usr/bin/env python3
"""Cost of exit accounting in the exit loop: real `ExitAccounting` vs `NullAccounting`.

A tiny real-mode guest does N `out`s to a null port device and halts. The
same `VcpuLoop` runs it with the default `ExitAccounting` and with
`NullAccounting` (plain KVM_RUN, nothing counted), alternating, `--repeat`
pairs; the report is the median time per exit of each and the median of
the per-pair ratios (accounting on / off). Item 7 of issue 6 asks for a
ratio of at most 1.05.

    .venv/bin/python scripts/bench_stats_overhead.py [--iterations N] [--repeat R] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import kvmpy
from kvmpy.stats.accounting import ExitAccounting, NullAccounting
from kvmpy.x86 import modes
from kvmpy.x86.asm import assemble

ENTRY = 0x1000
MEM_SIZE = 0x10000
PORT = 0x10
LIMIT = 1.05

# The loop count comes in ECX (set through KVM_SET_REGS).
GUEST = """
    1: out %al, $0x10
       dec %ecx
       jnz 1b
       hlt
"""


class NullPort:
    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        pass


class Guest:
    """One VM for the whole measurement: only the accounting differs between runs."""

    def __init__(self, kvm: kvmpy.Kvm, code: bytes) -> None:
        self.vm = kvm.create_vm()
        self.mem = kvmpy.GuestMemory(MEM_SIZE)
        self.vm.add_memory(self.mem)
        self.mem.write(ENTRY, code)
        self.vcpu = self.vm.create_vcpu()
        self.pio = kvmpy.pio_bus()
        self.pio.register(PORT, 1, NullPort())

    def run(self, count: int, accounting: ExitAccounting) -> tuple[float, float]:
        """(wall ns, vCPU-thread CPU ns) per PIO exit for one run of `count` outs."""
        modes.setup_real_mode(self.vcpu, ENTRY)
        regs = self.vcpu.get_regs()
        regs.rcx = count
        self.vcpu.set_regs(regs)
        loop = kvmpy.VcpuLoop(self.vcpu, self.pio, kvmpy.mmio_bus(), accounting=accounting)
        c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
        exit = loop.run()
        t1, c1 = time.perf_counter_ns(), time.thread_time_ns()
        if not isinstance(exit, kvmpy.HltExit):
            raise SystemExit(f"guest ended with {exit}, expected HLT")
        if not isinstance(accounting, NullAccounting):
            got = accounting.exits[kvmpy.ExitReason.IO]
            if got != count:
                raise SystemExit(f"accounting counted {got} IO exits, the guest made {count}")
        return (t1 - t0) / count, (c1 - c0) / count

    def close(self) -> None:
        self.vm.close()
        self.mem.close()


def measure(iterations: int, repeat: int) -> dict:
    code = assemble(GUEST, "16", ENTRY)
    with kvmpy.Kvm() as kvm:
        guest = Guest(kvm, code)
        guest.run(max(iterations // 10, 1), ExitAccounting())  # warm-up
        on: list[tuple[float, float]] = []
        off: list[tuple[float, float]] = []
        for i in range(repeat):
            # Alternate which side goes first so drift in host load cancels out.
            order = (True, False) if i % 2 == 0 else (False, True)
            for with_accounting in order:
                acct = ExitAccounting() if with_accounting else NullAccounting()
                (on if with_accounting else off).append(guest.run(iterations, acct))
        guest.close()
    # Wall time is what a user waits; the vCPU thread's CPU time (in the guest,
    # in KVM and in kvmpy) is what accounting adds, without other processes' noise.
    ratios = [a[0] / b[0] for a, b in zip(on, off)]
    cpu_ratios = [a[1] / b[1] for a, b in zip(on, off)]
    return {"iterations": iterations, "repeat": repeat,
            "on_ns": statistics.median(a for a, _ in on), "off_ns": statistics.median(a for a, _ in off),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "on_cpu_ns": statistics.median(c for _, c in on), "off_cpu_ns": statistics.median(c for _, c in off),
            "cpu_ratio": statistics.median(cpu_ratios), "cpu_ratio_min": min(cpu_ratios),
            "cpu_ratio_max": max(cpu_ratios), "limit": LIMIT}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=20000, help="exits per run (default 20000)")
    p.add_argument("--repeat", type=int, default=9, help="on/off pairs (default 9)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    reason = kvmpy.kvm_available()
    if reason is not None:
        print(f"cannot benchmark: {reason}", file=sys.stderr)
        return 1
    r = measure(args.iterations, args.repeat)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"{r['iterations']} PIO exits x {r['repeat']} pairs: accounting on {r['on_ns'] / 1000:.2f} us/exit, "
              f"off {r['off_ns'] / 1000:.2f} us/exit")
        print(f"wall ratio on/off: {r['ratio']:.3f} (pairs {r['ratio_min']:.3f}-{r['ratio_max']:.3f}); "
              f"limit {LIMIT:.2f}: {'ok' if r['ratio'] <= LIMIT else 'OVER'}")
        print(f"vCPU-thread CPU time: on {r['on_cpu_ns'] / 1000:.2f} us/exit, off {r['off_cpu_ns'] / 1000:.2f} "
              f"us/exit, ratio {r['cpu_ratio']:.3f} (pairs {r['cpu_ratio_min']:.3f}-{r['cpu_ratio_max']:.3f}); "
              f"limit {LIMIT:.2f}: {'ok' if r['cpu_ratio'] <= LIMIT else 'OVER'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
