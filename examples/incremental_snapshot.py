"""Incremental snapshots: a full snapshot, then two that hold only the pages written since; restore and merge.

A tiny multiboot guest counts at 0x200000. After a full snapshot (64 MiB of
RAM) the guest runs on and each incremental snapshot writes a few pages;
the newest restores to exactly the memory the machine had, and the chain
merges back into one full snapshot.

    .venv/bin/python examples/incremental_snapshot.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from fork import COUNTER, counter_kernel, run_for

from kvmpy.machine import MachineConfig, build
from kvmpy.snapshot import restore_machine
from kvmpy.snapshot_chain import merge, snapshot


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with build(MachineConfig(kernel=counter_kernel(work), memory="64M")) as m:
            run_for(m, 0.2)
            t = time.perf_counter()
            snapshot(m, work / "s0")
            full = time.perf_counter() - t
            for i in (1, 2):
                run_for(m, 0.2)
                t = time.perf_counter()
                snapshot(m, work / f"s{i}", parent=work / f"s{i - 1}")
                inc = time.perf_counter() - t
            image = m.memory.read(0, m.memory.size)
            count = m.memory.read_u32(COUNTER)
        sizes = {d: (work / d / "memory.bin").stat().st_size for d in ("s0", "s1", "s2")}
        print(f"full snapshot: {sizes['s0'] >> 20} MiB in {full * 1e3:.0f} ms; "
              f"incremental: {sizes['s2'] // 4096} pages in {inc * 1e3:.1f} ms")
        restored, _ = restore_machine(work / "s2")
        with restored:
            print("the chain restores exactly:", restored.memory.read(0, restored.memory.size) == image)
            print("counter as saved:", restored.memory.read_u32(COUNTER) == count)
        merged = merge(work / "s2", work / "full")
        again, _ = restore_machine(merged)
        with again:
            print("the merged snapshot restores the same:", again.memory.read(0, again.memory.size) == image)


if __name__ == "__main__":
    main()
