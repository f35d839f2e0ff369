"""Live fork: n children of a paused machine, sharing its RAM copy-on-write.

    children = fork(machine, 3)      # paused children; fork pauses a running parent and resumes it
    for c in children:
        c.start()

How (kvmpy/cow.py): each RAM region of the parent becomes copy-on-write
over a memfd template of its contents at the fork (the parent's own mapping
is replaced in place by a MAP_PRIVATE mapping of the memfd); each child maps
the same memfd MAP_PRIVATE. No one's later write reaches another: parent
and children each get private copies of the pages they write.

Each child is a whole machine of its own, assembled by `restore()` from the
parent's `snapshot_state()` taken once for all of them: its own VM, vCPUs,
console (continuing from the parent's) and devices, made again from the
parent's device configs as a snapshot restore makes them (a fresh TAP per
NIC, a vsock socket beside the parent's, read-only disks reopened and
shared). A writable disk cannot be shared by two writers: the fork refuses
unless `disk_for_child(child_index, disk_config) -> disk_config` gives each
child its own (e.g. a copy-on-write overlay).

A second fork of the same parent, after it ran on: the parent's private
pages (those it wrote since the first fork) and the first template make a
new template (`cow.refresh_template`: the old memfd's data extents copied in
the kernel, the private pages written over them), since the first children
still read through to the old one.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import cow
from ..devices.virtio.attach import devices_from_snapshot
from ..devices.virtio.mmio import SnapshotRefused
from ..errors import KvmError, SnapshotError
from ..memory import GuestMemory
from .builder import Console, device_configs, restore
from .machine import Machine

DiskForChild = Callable[[int, dict], dict]


class ForkError(KvmError):
    """The machine cannot be forked as it is (the message says what is in the way)."""


def child_device_configs(configs: Sequence[dict], child: int, disk_for_child: DiskForChild | None) -> list[dict]:
    """The parent's device configs for child `child`: writable disks through `disk_for_child`, else refused."""
    out = []
    for i, c in enumerate(configs):
        if c.get("kind") == "blk" and not c.get("read_only") and not c.get("snapshot_file"):
            if disk_for_child is None:
                raise ForkError(f"disk {i} ({c.get('path')}) is writable: children cannot share it; give the VM "
                                "an overlay disk (DiskConfig(..., overlay=True), --disk IMG,overlay), make it "
                                "read-only, or pass disk_for_child=... to give each child its own disk")
            c = dict(disk_for_child(child, dict(c)))
        out.append(c)
    return out


def fork_machine(parent: Machine, n: int, *, disk_for_child: DiskForChild | None = None,
                 console: Console | Sequence[Console | None] | None = None) -> list[Machine]:
    """`n` paused children of the paused (or never started) `parent`; start() each.

    `console`: one sink for all children's console bytes, or one per child.
    """
    if n < 1:
        raise ForkError(f"fork({n}): the number of children must be at least 1")
    if parent.state not in ("paused", "created"):
        raise ForkError(f"the machine is {parent.state}; pause() it before a fork (MicroVM.fork pauses it)")
    shared = [type(d).__name__ for d in _devices(parent) if getattr(d, "needs_shared_memory", False)]
    if shared:
        raise ForkError(f"cannot fork a machine whose guest RAM a back end in another process maps shared "
                        f"({', '.join(shared)}): its writes would reach every child")
    if any(r.readonly for r in parent.memory):
        raise ForkError("cannot fork a machine with a read-only memory slot")
    try:
        configs = parent.virtio.snapshot_configs() if parent.virtio is not None else []
    except SnapshotRefused as e:
        raise ForkError(f"cannot fork: {e}") from None
    sinks: list[Console | None] = list(console) if isinstance(console, (list, tuple)) else [console] * n  # type: ignore[list-item]
    if len(sinks) != n:
        raise ForkError(f"{len(sinks)} console sinks for {n} children")
    frozen = Path(tempfile.mkdtemp(prefix="kvmpy-fork-disks-"))
    try:
        with parent.quiesced():  # RAM, state, console and disks of one instant
            try:
                state = parent.snapshot_state()
            except SnapshotError as e:
                raise ForkError(f"cannot fork: {e}") from None
            log = parent.console.contents()
            # A disk on an overlay: its overlay as it is now, frozen in a copy; each child writes to an
            # overlay of its own on a copy of that (kept with the child's overlay) while the parent writes on.
            if disk_for_child is None:
                for i, dev in enumerate(configs):
                    if dev.get("kind") == "blk" and not dev.get("read_only") and "overlay" in dev:
                        copy = frozen / f"disk{i}.qcow2"
                        shutil.copyfile(dev["overlay"]["file"], copy)
                        dev["snapshot_file"], dev["copy_base"] = str(copy), True
            per_child = [child_device_configs(configs, i, disk_for_child) for i in range(n)]
            for r in parent.memory:
                cow.refresh_template(r)
        children: list[Machine] = []
        try:
            for i in range(n):
                children.append(_child(parent, state, log, per_child[i], sinks[i]))
        except BaseException:
            for c in children:
                c.close()
            raise
    finally:
        shutil.rmtree(frozen, ignore_errors=True)  # each child has its own copy of the frozen disk
    return children


def fork(machine: Machine, n: int, **kw: Any) -> list[Machine]:
    """`n` paused children sharing `machine`'s RAM copy-on-write (`fork_machine`'s keywords);
    a running machine is paused for the fork and resumed after it."""
    was_running = machine.state == "running"
    machine.pause()
    try:
        return fork_machine(machine, n, **kw)
    finally:
        if was_running:
            machine.resume()


def _child(parent: Machine, state: Any, log: bytes, configs: list[dict], sink: Console | None) -> Machine:
    memory = GuestMemory(0)
    try:
        for r in parent.memory:
            memory.add_region(r.gpa, r.size, mapping=cow.map_child(r))
        devices = devices_from_snapshot(configs)
    except BaseException:
        memory.close()
        raise
    config = dataclasses.replace(parent.config, **device_configs(devices))
    try:
        child, _refused = restore(config, state, memory, console_log=log, devices=devices, console=sink)
    except SnapshotError as e:
        raise ForkError(f"cannot fork: {e}") from None
    child.mark_paused()
    return child


def _devices(machine: Machine) -> list[Any]:
    return [s.device for s in machine.virtio.slots] if machine.virtio is not None else []


__all__ = ["DiskForChild", "ForkError", "child_device_configs", "fork", "fork_machine"]
