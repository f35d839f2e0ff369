"""Cost of the permission-checking page walk and of the table-driven exit decode, as ratios.

Two hot paths this change touched, each against a reference run in the same
invocation:

- `GuestMemory.translate` with an `Access` (R/W, U/S, SMAP/SMEP, NX and
  reserved-bit checks) against the walk kvmpy had before those checks,
  kept below verbatim as `reference_walk`: 4-level tables, a 4 KiB page;
- `exits.decode` (one dict lookup per exit) against the if-chain it
  replaced (`reference_decode`, the same order of tests), for an exit the
  chain tested late (NOTIFY was the last typed one) and early (HLT).

    .venv/bin/python scripts/bench_page_walk.py [N]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from perfdoc import update_section  # noqa: E402

from kvmpy import exits  # noqa: E402
from kvmpy._kvm import ffi, lib  # noqa: E402
from kvmpy.errors import GuestMemoryError  # noqa: E402
from kvmpy.memory import Access, GuestMemory  # noqa: E402

_PRESENT, _PS, _ADDR_MASK = 1, 1 << 7, 0x000F_FFFF_FFFF_F000


def reference_walk(mem: GuestMemory, gva: int, cr3: int) -> int:
    """The 4-level path of the walk before permission checks (kvmpy/memory.py at 662ac12)."""
    levels, table = 4, cr3 & _ADDR_MASK
    shift = 12 + 9 * (levels - 1)
    for _ in range(levels):
        entry = mem.read_u64(table + ((gva >> shift) & 0x1FF) * 8)
        if not entry & _PRESENT:
            raise GuestMemoryError(f"GVA {gva:#x}: paging entry for bit {shift} not present")
        if shift == 12:
            return (entry & _ADDR_MASK) | (gva & 0xFFF)
        if entry & _PS and shift in (21, 30):
            mask = (1 << shift) - 1
            return (entry & _ADDR_MASK & ~mask) | (gva & mask)
        table = entry & _ADDR_MASK
        shift -= 9
    raise GuestMemoryError("malformed")


def reference_decode(run, page):
    """The if-chain exits.decode was before the table (same tests, same order)."""
    reason = run.exit_reason
    for r in (lib.KVM_EXIT_IO, lib.KVM_EXIT_MMIO, lib.KVM_EXIT_HLT, lib.KVM_EXIT_SHUTDOWN, lib.KVM_EXIT_INTR,
              lib.KVM_EXIT_INTERNAL_ERROR, lib.KVM_EXIT_FAIL_ENTRY, lib.KVM_EXIT_SYSTEM_EVENT, lib.KVM_EXIT_DEBUG):
        if reason == r:
            return exits.HltExit(reason) if r == lib.KVM_EXIT_HLT else exits.Exit(reason)
    if reason in (lib.KVM_EXIT_X86_RDMSR, lib.KVM_EXIT_X86_WRMSR):
        return exits.Exit(reason)
    for r in (lib.KVM_EXIT_IRQ_WINDOW_OPEN, lib.KVM_EXIT_EXCEPTION, lib.KVM_EXIT_HYPERCALL, lib.KVM_EXIT_UNKNOWN):
        if reason == r:
            return exits.Exit(reason)
    return exits.Exit(reason)


def timed(fn, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    rows = []
    with GuestMemory(8 << 20) as mem:
        gva = 0x7F80_1234_5000
        for table, nxt, shift in ((0x1000, 0x2000, 39), (0x2000, 0x3000, 30), (0x3000, 0x4000, 21)):
            mem.write_u64(table + ((gva >> shift) & 0x1FF) * 8, nxt | 7)
        mem.write_u64(0x4000 + ((gva >> 12) & 0x1FF) * 8, 0x30_0000 | 7)
        access = Access(write=True, user=True)
        cr0, cr4, efer = 0x8001_0001, 1 << 5 | 1 << 20 | 1 << 21, 1 << 10 | 1 << 11
        assert mem.translate(gva, 0x1000, cr0=cr0, cr4=cr4, efer=efer, access=access) == reference_walk(
            mem, gva, 0x1000)
        ref = timed(lambda: reference_walk(mem, gva, 0x1000), n)
        new = timed(lambda: mem.translate(gva, 0x1000, cr0=cr0, cr4=cr4, efer=efer, access=access), n)
        rows.append(("4-level walk, 4 KiB page, user write, SMAP+SMEP+NX on", ref, new))
    buf = bytearray(8192)
    run = ffi.cast("struct kvm_run *", ffi.from_buffer(buf))
    page = memoryview(buf)
    for reason, label in ((lib.KVM_EXIT_HLT, "decode HLT (early in the old chain)"),
                          (lib.KVM_EXIT_UNKNOWN, "decode UNKNOWN (late in the old chain)")):
        run.exit_reason = reason
        ref = timed(lambda: reference_decode(run, page), n)
        new = timed(lambda: exits.decode(run, page), n)
        rows.append((label, ref, new))
    lines = ["## Page walk with permission checks, exit decode table (scripts/bench_page_walk.py)", "",
             f"{n} calls each, in one process; reference = the code before this change, run in the same "
             "invocation (kept in the script).", "",
             "| what | reference (us) | now (us) | ratio now / reference |", "| --- | --- | --- | --- |"]
    for label, ref, new in rows:
        lines.append(f"| {label} | {ref * 1e6:.2f} | {new * 1e6:.2f} | {new / ref:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    update_section(lines[0], text)


if __name__ == "__main__":
    main()
