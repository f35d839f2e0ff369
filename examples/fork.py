"""Live fork: one running machine, three children sharing its memory copy-on-write, each going its own way.

A tiny multiboot guest counts at 0x200000 forever. The parent runs a while,
then forks; every child starts from the parent's count, counts on in its own
memory (the others' counts do not move), and the parent runs on after the
fork. With a Linux guest it is the same call: `MicroVM.fork(n)`.

    .venv/bin/python examples/fork.py
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path

from kvmpy import cow
from kvmpy.machine import MachineConfig, build, fork

COUNTER = 0x200000


def counter_kernel(work: Path) -> Path:
    (work / "c.s").write_text(".code32\n.text\n.globl _start\n.align 4\n.long 0x1BADB002, 0, -0x1BADB002\n"
                              f"_start:\n1: incl {COUNTER:#x}\njmp 1b\n")
    subprocess.run(["as", "--32", "-o", str(work / "c.o"), str(work / "c.s")], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-N", "-Ttext", "0x100000", "-e", "_start", "-o", str(work / "c.elf"),
                    str(work / "c.o")], check=True, capture_output=True)
    return work / "c.elf"


def run_for(machine, seconds: float) -> int:
    machine.start()
    time.sleep(seconds)
    machine.pause()
    return machine.memory.read_u32(COUNTER)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        with build(MachineConfig(kernel=counter_kernel(Path(tmp)), memory="64M")) as parent:
            at_fork = run_for(parent, 0.3)
            t = time.perf_counter()
            children = fork(parent, 3)
            per_child = (time.perf_counter() - t) / 3
            print(f"forked 3 children in {per_child * 1e3:.1f} ms each")
            print("children start at the parent's count:",
                  all(c.memory.read_u32(COUNTER) == at_fork for c in children))
            counts = []
            for c in children:
                counts.append(run_for(c, 0.2))
                # the children not run yet still hold the count of the fork
            print("each child counted on in its own memory:", all(n > at_fork for n in counts))
            print("no child's count reached another:",
                  [c.memory.read_u32(COUNTER) for c in children] == counts)
            region = parent.memory.region_at(COUNTER)
            print("pages the children share with the parent (template memfd):",
                  cow.template_of(region) is not None and cow.template_of(region).children == 3)
            later = run_for(parent, 0.2)
            print("the parent runs on after the fork:", later > at_fork,
                  "and no child saw it:", all(c.memory.read_u32(COUNTER) != later for c in children))
            for c in children:
                c.close()


if __name__ == "__main__":
    main()
