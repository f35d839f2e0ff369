#!/usr/bin/env python3
"""Cost of exit accounting in the exit loop: real `ExitAccounting` vs a no-op subclass.

A tiny real-mode guest does N `out`s to a null port device and halts. The
same `VcpuLoop` runs it with the default `ExitAccounting` and with
`NoAccounting` (every recording method a no-op), alternating, `--repeat`
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
from kvmpy.stats.accounting import ExitAccounting
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


class NoAccounting(ExitAccounting):
    """Records nothing: the loop's cost without accounting (the calls remain, their bodies go)."""

    def enter(self) -> None:
        pass

    def leave(self, reason: int) -> None:
        pass

    def count_io(self, port: int, direction: int) -> None:
        pass

    def count_mmio(self, addr: int) -> None:
        pass


class NullPort:
    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        pass


def run_once(kvm: kvmpy.Kvm, code: bytes, count: int, accounting: ExitAccounting) -> float:
    """Nanoseconds per PIO exit for one guest run of `count` outs."""
    with kvm.create_vm() as vm, kvmpy.GuestMemory(MEM_SIZE) as mem:
        vm.add_memory(mem)
        mem.write(ENTRY, code)
        vcpu = vm.create_vcpu()
        modes.setup_real_mode(vcpu, ENTRY)
        regs = vcpu.get_regs()
        regs.rcx = count
        vcpu.set_regs(regs)
        pio = kvmpy.pio_bus()
        pio.register(PORT, 1, NullPort())
        loop = kvmpy.VcpuLoop(vcpu, pio, kvmpy.mmio_bus(), accounting=accounting)
        t0 = time.perf_counter_ns()
        exit = loop.run()
        t1 = time.perf_counter_ns()
        if not isinstance(exit, kvmpy.HltExit):
            raise SystemExit(f"guest ended with {exit}, expected HLT")
        if not isinstance(accounting, NoAccounting):
            got = accounting.exits[kvmpy.ExitReason.IO]
            if got != count:
                raise SystemExit(f"accounting counted {got} IO exits, the guest made {count}")
    return (t1 - t0) / count


def measure(iterations: int, repeat: int) -> dict:
    code = assemble(GUEST, "16", ENTRY)
    with kvmpy.Kvm() as kvm:
        run_once(kvm, code, max(iterations // 10, 1), ExitAccounting())  # warm-up
        on: list[float] = []
        off: list[float] = []
        for i in range(repeat):
            # Alternate which side goes first so drift in host load cancels out.
            order = (True, False) if i % 2 == 0 else (False, True)
            for with_accounting in order:
                acct = ExitAccounting() if with_accounting else NoAccounting()
                (on if with_accounting else off).append(run_once(kvm, code, iterations, acct))
    ratios = [a / b for a, b in zip(on, off)]
    return {"iterations": iterations, "repeat": repeat,
            "on_ns": statistics.median(on), "off_ns": statistics.median(off),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "limit": LIMIT}


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
        print(f"ratio on/off: {r['ratio']:.3f} (pairs {r['ratio_min']:.3f}-{r['ratio_max']:.3f}); "
              f"limit {LIMIT:.2f}: {'ok' if r['ratio'] <= LIMIT else 'OVER'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
