#!/usr/bin/env python3
"""What the jail's seccomp filter costs on the hot path: PIO exit round trips with and without it, same run.

Each sample is a fresh process (a filter cannot be removed once loaded)
running scripts/bench_exits.py's `pio` guest (a real-mode loop of `out`s,
kvmpy's VcpuLoop) for --iterations exits; "jailed" processes first load
kvmpy.jail's filter in kill mode, exactly as `lock_down` does. Plain and
jailed processes alternate --repeat times; the report gives the median ns
per exit of each and the median of the paired jailed/plain ratios.
`--update-docs` writes the table into docs/performance.md.

    .venv/bin/python scripts/bench_jail.py [--iterations 20000] [--repeat 7] [--update-docs]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
import sys
from pathlib import Path

HEADING = "## The jail's seccomp filter on the exit path (scripts/bench_jail.py)"


def child(filtered: bool, iterations: int) -> None:
    from bench_exits import ENTRY, GUESTS, run_kvmpy

    import kvmpy
    from kvmpy.x86.asm import assemble

    code = assemble(GUESTS["pio"], "16", ENTRY)
    kvm = kvmpy.Kvm()
    run_kvmpy(kvm, "pio", code, 1000)  # warm up before the filter, as the VMM is set up before lock_down
    if filtered:
        from kvmpy import jail

        jail.install_seccomp(jail.SeccompAction.KILL)
    print(run_kvmpy(kvm, "pio", code, iterations))


def sample(filtered: bool, iterations: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--child", "jailed" if filtered else "plain",
                          "--iterations", str(iterations)], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=20000)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--child", choices=["plain", "jailed"])
    p.add_argument("--update-docs", action="store_true")
    args = p.parse_args()
    if args.child:
        child(args.child == "jailed", args.iterations)
        return 0
    plain, jailed, ratios = [], [], []
    for i in range(args.repeat):
        order = (False, True) if i % 2 == 0 else (True, False)
        got = {f: sample(f, args.iterations) for f in order}
        plain.append(got[False])
        jailed.append(got[True])
        ratios.append(got[True] / got[False])
    ratio = statistics.median(ratios)
    table = (f"| | ns per PIO exit, median (min-max) |\n| --- | --- |\n"
             f"| plain | {statistics.median(plain):,.0f} ({min(plain):,.0f}-{max(plain):,.0f}) |\n"
             f"| with the jail's filter | {statistics.median(jailed):,.0f} ({min(jailed):,.0f}-{max(jailed):,.0f}) |\n"
             f"| **jailed / plain** | **{ratio:.3f}** (pairs {min(ratios):.3f}-{max(ratios):.3f}) |\n")
    print(table)
    if args.update_docs:
        import textwrap

        from perfdoc import update_section

        text = (f"Measured {datetime.date.today()} on this project's host, {args.repeat} alternating pairs "
                f"of fresh processes, {args.iterations} exits each: the same `pio` guest as "
                "scripts/bench_exits.py through `VcpuLoop`, with and without kvmpy.jail's seccomp filter "
                "(kill mode) loaded. Every exit is a KVM_RUN ioctl through the filter (its ioctl rule "
                "compares the request's type byte).")
        section = f"{HEADING}\n\n{textwrap.fill(text, 76)}\n\n{table}"
        update_section(HEADING, section)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
