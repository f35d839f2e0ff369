"""Lazy restore through userfaultfd: a restored tiny guest runs on pages served on demand, memory exact."""

from __future__ import annotations

import pytest
from test_fork import MARK, _advance, _counter_kernel

from kvmpy import lazy
from kvmpy.machine import MachineConfig, build, fork
from kvmpy.snapshot import Snapshot, restore_machine, take_snapshot

pytestmark = pytest.mark.skipif(lazy.unavailable() is not None, reason=f"userfaultfd: {lazy.unavailable()}")


@pytest.fixture
def snap(tmp_path, kvm):
    with build(MachineConfig(kernel=_counter_kernel(tmp_path), memory="64M"), kvm=kvm) as m:
        count = _advance(m, 0)
        m.memory.write(MARK, b"lazy pages" * 100)
        take_snapshot(m, tmp_path / "s")
    return Snapshot.open(tmp_path / "s"), count


def test_a_lazily_restored_guest_runs_on_pages_served_on_demand(snap, kvm):
    s, count = snap
    m, _ = lazy.restore_lazy(s, kvm=kvm)
    try:
        assert m.memory.pages_served < 64  # almost nothing read up front
        assert _advance(m, count) > count  # the vCPU's faults inside KVM_RUN were served
        served = m.memory.pages_served
        assert 0 < served < (64 << 20) // 4096 // 10  # on demand: a few pages, not the 16384
        assert m.memory.read(MARK, 1000) == b"lazy pages" * 100
        assert m.memory.error is None
    finally:
        m.close()


def test_lazy_memory_reads_exactly_the_snapshots_bytes(snap, kvm):
    s, _ = snap
    m, _ = lazy.restore_lazy(s, kvm=kvm, chunk=16 * 4096)
    ref, _ = restore_machine(s, kvm=kvm)
    try:
        assert m.memory.read(0, m.memory.size) == ref.memory.read(0, ref.memory.size)
    finally:
        m.close()
        ref.close()


def test_a_memory_file_still_being_fetched_is_served_as_its_bytes_arrive(snap, tmp_path, kvm):
    import subprocess

    s, count = snap
    data = (s.directory / "memory.bin").read_bytes()
    partial, rest = tmp_path / "fetching.bin", tmp_path / "rest.bin"
    partial.write_bytes(data[:1 << 20])  # the first MiB has arrived; the counter's page has not
    rest.write_bytes(data[1 << 20:])
    # another process fetches the rest (a thread of this one would wait for the GIL a faulting reader holds)
    fetcher = subprocess.Popen(["sh", "-c", f"sleep 0.5; cat {rest} >> {partial}"])
    m, _ = lazy.restore_lazy(s, kvm=kvm, path=partial)
    try:
        assert _advance(m, count) > count  # the guest waited for its pages, then ran on
        assert m.memory.read(MARK, 1000) == b"lazy pages" * 100 and m.memory.error is None
    finally:
        fetcher.wait(60)
        m.close()


def test_a_memory_file_that_never_arrives_is_reported(snap, tmp_path, kvm):
    s, _ = snap
    short = tmp_path / "short.bin"
    short.write_bytes((s.directory / "memory.bin").read_bytes()[:1 << 20])
    memory = lazy.LazyGuestMemory([(0, 64 << 20, 0)], short, wait=0.2)
    try:
        assert memory.read(MARK, 4) == bytes(4)  # served as zeros, nobody hangs
        assert "the memory file ends before it" in memory.error
    finally:
        memory.close()


def test_a_lazily_restored_machine_forks_with_all_its_memory(snap, kvm):
    s, count = snap
    m, _ = lazy.restore_lazy(s, kvm=kvm)
    try:
        (child,) = fork(m, 1)  # pages never touched yet must reach the child from the file, not as zeros
        try:
            assert child.memory.read(MARK, 1000) == b"lazy pages" * 100
            assert _advance(child, count) > count
        finally:
            child.close()
    finally:
        m.close()
