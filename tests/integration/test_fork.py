"""Live fork of machines running tiny multiboot guests: copy-on-write RAM, diverging children.

The guest counts at COUNTER forever; each machine's count is read through its
own mapping, so a child (or a parent) whose writes reached another's memory,
or a KVM that kept the parent's old pages after the remap, shows here.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from kvmpy import cow
from kvmpy.machine import MachineConfig, build, fork
from kvmpy.machine.fork import ForkError

COUNTER = 0x200000  # inside the 64 MiB guest, above the kernel at 1 MiB
MARK = 0x300000


def _counter_kernel(tmp_path: Path) -> Path:
    src, obj, elf = tmp_path / "c.s", tmp_path / "c.o", tmp_path / "c.elf"
    src.write_text(f""".code32
.text
.globl _start
.align 4
    .long 0x1BADB002, 0, -0x1BADB002
_start:
1:  incl {COUNTER:#x}
    jmp 1b
""")
    subprocess.run(["as", "--32", "-o", str(obj), str(src)], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-N", "-Ttext", "0x100000", "-e", "_start", "-o", str(elf), str(obj)],
                   check=True)
    return elf


def _advance(machine, start: int, timeout: float = 20.0) -> int:
    """Run `machine` until its counter passes `start`; returns the count, machine paused."""
    machine.start()
    deadline = time.monotonic() + timeout
    while machine.memory.read_u32(COUNTER) == start and time.monotonic() < deadline:
        time.sleep(0.01)
    machine.pause()
    return machine.memory.read_u32(COUNTER)


@pytest.fixture
def parent(tmp_path, kvm):
    m = build(MachineConfig(kernel=_counter_kernel(tmp_path), memory="64M"), kvm=kvm)
    yield m
    m.close()


def test_children_start_from_the_parent_and_diverge_copy_on_write(parent):
    base = _advance(parent, 0)
    assert base > 0
    parent.memory.write_u32(MARK, 0xAAAA)  # a VMM write before the fork: every child has it
    children = fork(parent, 2)
    try:
        assert [c.state for c in children] == ["paused", "paused"]
        assert all(c.memory.read_u32(COUNTER) == base and c.memory.read_u32(MARK) == 0xAAAA for c in children)
        # the parent's VMM writes after the fork reach no child
        parent.memory.write_u32(MARK, 0xBBBB)
        children[0].memory.write_u32(MARK, 0xCCCC)
        assert [c.memory.read_u32(MARK) for c in children] == [0xCCCC, 0xAAAA]
        # each child's guest counts in its own memory
        c0 = _advance(children[0], base)
        assert c0 > base and children[1].memory.read_u32(COUNTER) == base
        c1 = _advance(children[1], base)
        assert c1 > base and children[0].memory.read_u32(COUNTER) == c0
        # the parent resumes on its copy-on-write mapping: KVM follows the remapped pages
        p = _advance(parent, base)
        assert p > base and [c.memory.read_u32(COUNTER) for c in children] == [c0, c1]
        assert parent.memory.read_u32(MARK) == 0xBBBB
        # the written pages are the processes' private copies; the template holds the fork's bytes
        region = parent.memory.region_at(COUNTER)
        assert (COUNTER - region.gpa) // 4096 in set(cow.private_pages(region).tolist())
        t = cow.template_of(region)
        assert int.from_bytes(os.pread(t.fd, 4, COUNTER - region.gpa), "little") == base
    finally:
        for c in children:
            c.close()


def test_a_second_fork_starts_from_the_parent_as_it_is_then(parent):
    base = _advance(parent, 0)
    first = fork(parent, 1)
    try:
        later = _advance(parent, base)
        second = fork(parent, 1)
        try:
            assert second[0].memory.read_u32(COUNTER) == later
            assert first[0].memory.read_u32(COUNTER) == base  # the first child still reads the old template
            assert _advance(second[0], later) > later
            assert first[0].memory.read_u32(COUNTER) == base and parent.memory.read_u32(COUNTER) == later
        finally:
            second[0].close()
    finally:
        first[0].close()


def test_a_running_parent_is_paused_for_the_fork_and_runs_on(parent):
    parent.start()
    children = fork(parent, 1)
    try:
        assert parent.state == "running"
        before = parent.memory.read_u32(COUNTER)
        time.sleep(0.2)
        assert parent.memory.read_u32(COUNTER) != before
    finally:
        children[0].close()


def test_fork_refuses_a_writable_disk_without_disk_for_child(tmp_path, kvm):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    config = MachineConfig(kernel=_counter_kernel(tmp_path), memory="64M", disks=(str(image),))
    with build(config, kvm=kvm) as m:
        with pytest.raises(ForkError, match="disk 0 .*disk.img.* is writable"):
            fork(m, 1)
        copies = []

        def own_copy(i, disk):
            path = tmp_path / f"child{i}.img"
            path.write_bytes(image.read_bytes())
            copies.append(path)
            return {**disk, "path": str(path)}

        children = fork(m, 2, disk_for_child=own_copy)
        try:
            assert [c.config.disks[0].path for c in children] == copies
        finally:
            for c in children:
                c.close()


def test_fork_refuses_a_bad_count(parent):
    with pytest.raises(ForkError, match="at least 1"):
        fork(parent, 0)
