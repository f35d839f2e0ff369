"""Incremental snapshots of a machine running a tiny guest: the chain restores exactly (memory byte for byte)."""

from __future__ import annotations

import pytest
from test_fork import COUNTER, MARK, _advance, _counter_kernel

from kvmpy.errors import SnapshotError
from kvmpy.machine import MachineConfig, build, fork
from kvmpy.snapshot import Snapshot, restore_machine
from kvmpy.snapshot_chain import merge, snapshot


@pytest.fixture
def machine(tmp_path, kvm):
    m = build(MachineConfig(kernel=_counter_kernel(tmp_path), memory="64M"), kvm=kvm)
    yield m
    m.close()


def _restored_memory(directory, kvm) -> bytes:
    m, _ = restore_machine(directory, kvm=kvm)
    try:
        return m.memory.read(0, m.memory.size)
    finally:
        m.close()


def test_a_chain_of_incrementals_restores_the_guest_memory_exactly(machine, tmp_path, kvm):
    count = _advance(machine, 0)
    snapshot(machine, tmp_path / "s0")
    images = []
    for i in range(1, 3):
        count = _advance(machine, count)
        machine.memory.write_u32(MARK + i * 4096, 0x1000 + i)  # a VMM write: KVM's dirty log never sees it
        snapshot(machine, tmp_path / f"s{i}", parent=tmp_path / f"s{i - 1}")
        images.append(machine.memory.read(0, machine.memory.size))
    # only the written pages: a few, not the 64 MiB
    assert (tmp_path / "s2" / "memory.bin").stat().st_size <= 16 * 4096
    assert _restored_memory(tmp_path / "s1", kvm) == images[0]
    assert _restored_memory(tmp_path / "s2", kvm) == images[1]
    merged = merge(tmp_path / "s2", tmp_path / "merged")
    assert _restored_memory(merged, kvm) == images[1]
    # the restored chain runs on from the counter it saved
    m, _ = restore_machine(tmp_path / "s2", kvm=kvm)
    try:
        assert m.memory.read_u32(COUNTER) == count
        assert _advance(m, count) > count
    finally:
        m.close()


def test_an_incremental_needs_the_machines_last_snapshot_as_parent(machine, tmp_path):
    _advance(machine, 0)
    with pytest.raises(SnapshotError, match="take a full snapshot of it first"):
        snapshot(machine, tmp_path / "x", parent=tmp_path / "nowhere")
    snapshot(machine, tmp_path / "s0")
    snapshot(machine, tmp_path / "s1", parent=tmp_path / "s0")
    with pytest.raises(SnapshotError, match="s0 is not this machine's last snapshot"):
        snapshot(machine, tmp_path / "s2", parent=tmp_path / "s0")
    assert not (tmp_path / "s2").exists() and not (tmp_path / "x").exists()


def test_an_incremental_is_refused_when_its_parent_was_replaced(machine, tmp_path):
    _advance(machine, 0)
    snapshot(machine, tmp_path / "s0")
    snapshot(machine, tmp_path / "s0", track=False)  # rewritten in place: another manifest
    with pytest.raises(SnapshotError, match="missing or was replaced"):
        snapshot(machine, tmp_path / "s1", parent=tmp_path / "s0")


def test_incrementals_and_forks_of_one_machine_do_not_disturb_each_other(machine, tmp_path, kvm):
    count = _advance(machine, 0)
    snapshot(machine, tmp_path / "s0")
    (child,) = fork(machine, 1)
    try:
        later = _advance(machine, count)
        snapshot(machine, tmp_path / "s1", parent=tmp_path / "s0")
        assert child.memory.read_u32(COUNTER) == count  # the refreshed template is a new memfd
        assert Snapshot.open(tmp_path / "s1").manifest["parent"]["path"] == "../s0"
        m, _ = restore_machine(tmp_path / "s1", kvm=kvm)
        try:
            assert m.memory.read_u32(COUNTER) == later
        finally:
            m.close()
    finally:
        child.close()
