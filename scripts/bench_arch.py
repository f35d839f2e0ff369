#!/usr/bin/env python3
"""What the x86 vocabulary (kvmpy/x86/arch.py) costs on exit paths, as ratios in one run.

The bits are IntFlag members whose operators are int's (arch._int_arithmetic).
Measured against references in the same process:
- a register bit test `cr0 & Cr0.PG` vs the same test with an int literal,
  and vs a stock IntFlag (Python-level operators: why arch.py swaps them);
- `cpu_mode(sregs)` on a real struct kvm_sregs vs the inline if-chain it
  replaced (Vcpu.cpu_mode's body);
- `GuestMemory.translate` (a 4-level walk; memory.py tests the arch bits)
  vs the same walk with its bit constants patched to plain ints.

    PYTHONPATH=. python scripts/bench_arch.py [--write-doc]
"""

from __future__ import annotations

import argparse
import datetime
import enum
import os
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from perfdoc import update_section  # noqa: E402

import kvmpy.memory as memory  # noqa: E402
from kvmpy._kvm import ffi  # noqa: E402
from kvmpy.x86 import modes  # noqa: E402
from kvmpy.x86.arch import Cr0, Cr4, Efer, cpu_mode  # noqa: E402, F401 (cpu_mode: timed by name)

HEADING = "## x86 vocabulary on exit paths (scripts/bench_arch.py)"


class StockCr0(enum.IntFlag):  # what Cr0 would be without arch's int operators
    PE = 1
    PG = 1 << 31


def pair(a, b, number: int, rounds: int = 7) -> tuple[float, float]:
    """Seconds per call of `a` and of `b`, each the best of `rounds`, measured alternately
    (so that load from other processes hits both alike)."""
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(timeit.timeit(a, number=number, globals=globals()) / number)
        tb.append(timeit.timeit(b, number=number, globals=globals()) / number)
    return min(ta), min(tb)


CR0 = 0x8005_0033
PG, PG_INT, PG_STOCK = Cr0.PG, int(Cr0.PG), StockCr0.PG


def old_cpu_mode(s) -> str:
    if not s.cr0 & 1:
        return "real"
    if s.efer & (1 << 10):
        return "long64" if s.cs.l else "compat"
    return "protected32" if s.cs.db else "protected16"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write-doc", action="store_true", help="write the table into docs/performance.md")
    args = ap.parse_args()

    rows = []
    t, r = pair("CR0 & PG", "CR0 & PG_INT", 500_000)
    rows.append(("`cr0 & PG`, PG = Cr0.PG a module global", "`cr0 & PG_INT`, an int global", t, r))
    t, r = pair("CR0 & Cr0.PG", "CR0 & PG_INT", 200_000)
    rows.append(("`cr0 & Cr0.PG` (member looked up on the class)", "`cr0 & PG_INT`", t, r))
    t, r = pair("CR0 & PG_STOCK", "CR0 & PG_INT", 100_000)
    rows.append(("`cr0 & PG_STOCK`, a plain IntFlag member", "`cr0 & PG_INT`", t, r))

    s = ffi.new("struct kvm_sregs *")
    s.cr0, s.efer, s.cs.l = Cr0.PE | Cr0.PG, Efer.LME | Efer.LMA, 1
    globals()["SREGS"] = s
    t, r = pair("cpu_mode(SREGS)", "old_cpu_mode(SREGS)", 100_000)
    rows.append(("`cpu_mode(sregs)`", "the inline if-chain it replaced (Vcpu.cpu_mode)", t, r))

    with memory.GuestMemory("4M") as mem:
        cr3 = modes.PML4_ADDR
        mem.write_u64(cr3, modes.PDPT_ADDR | 3)
        mem.write_u64(modes.PDPT_ADDR, modes.PD_ADDR | 3)
        mem.write_u64(modes.PD_ADDR, 0x3000 | 3)
        mem.write_u64(0x3000 + 8 * 0x12, 0x5000 | 3)  # GVA 0x12000 -> GPA 0x5000, 4 KiB page
        regs = dict(cr0=Cr0.PE | Cr0.PG, cr4=Cr4.PAE, efer=Efer.LME | Efer.LMA)
        assert mem.translate(0x12345, cr3, **regs) == 0x5345
        plain = {k: int(v) for k, v in regs.items()}
        names = ("_CR0_PG", "_CR4_PSE", "_CR4_PAE", "_CR4_LA57", "_EFER_LMA")
        flags = {n: getattr(memory, n) for n in names}
        walk, walk_int = [], []
        for _ in range(7):  # alternate: the same walk with arch's flags, then with ints
            walk.append(timeit.timeit(lambda: mem.translate(0x12345, cr3, **regs), number=20_000) / 20_000)
            for n, v in flags.items():
                setattr(memory, n, int(v))
            walk_int.append(timeit.timeit(lambda: mem.translate(0x12345, cr3, **plain), number=20_000) / 20_000)
            for n, v in flags.items():
                setattr(memory, n, v)
        walk, walk_int = min(walk), min(walk_int)
    rows.append(("`GuestMemory.translate` 4-level walk", "the same walk with int constants", walk, walk_int))

    load = os.getloadavg()[0]
    lines = [HEADING, "", f"Measured {datetime.date.today()}, Python {sys.version.split()[0]}, "
             f"load average {load:.1f} at the end: on 2 shared CPUs ratios from about 0.5 to 2 are noise;",
             "the class-lookup and stock-IntFlag rows are the signal.", "",
             "| measured | reference | ns | reference ns | ratio |", "| --- | --- | --- | --- | --- |"]
    for what, ref, t, r in rows:
        lines.append(f"| {what} | {ref} | {t * 1e9:.0f} | {r * 1e9:.0f} | {t / r:.2f} |")
    lines += ["", "Best of 7 alternating runs each, in one process. `Cr0`/`Cr4`/`Efer`/`Rflags` use",
              "int's C operators, so a bit test against a member bound to a module global costs",
              "what an int costs; looking the member up on its class costs more (EnumType's",
              "`__getattr__` routes class attribute lookups through Python), so exit paths bind",
              "the members they test to module globals; a stock IntFlag's Python operators would",
              "cost far more on every exit that looks at CR0 or EFER."]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.write_doc:
        update_section(HEADING, table)


if __name__ == "__main__":
    main()
