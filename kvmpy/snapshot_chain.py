"""Incremental snapshots: only the pages written since the parent snapshot; chains, restore and merge.

    snapshot(machine, "s0")                   # full; tracking starts here
    snapshot(machine, "s1", parent="s0")      # the pages written since s0
    snapshot(machine, "s2", parent="s1")
    merge("s2", "full")                       # one full snapshot again

An incremental snapshot is a snapshot directory (kvmpy/snapshot.py, same
files, same atomic write) whose manifest has a `parent` entry:

    "parent": {"path": "../s1",                  # relative to this snapshot
               "manifest_sha256": "...",        # of the parent's manifest.json as it was
               "regions": [{"gpa": 0, "size": 134217728}]}   # the full memory layout

and whose `memory` list names runs of pages ({gpa, size, offset} in
memory.bin) instead of whole regions. Restore (`Snapshot.map_memory`)
resolves the chain: the base's memory.bin mapped MAP_PRIVATE, each
incremental's runs read over it, oldest first. A missing parent, a parent
whose manifest is not the one recorded (replaced, rewritten, another
snapshot moved there), a chain that loops or whose layout differs is
refused with `SnapshotCorruptError` naming it. Parents are opened with
their memory checksum verified, as `Snapshot.open` does by default.

Which pages were written: after a snapshot is written (still inside the
machine's quiesced section) each RAM region is made copy-on-write over a
memfd template holding exactly the written memory (kvmpy/cow.py); the next
snapshot's pages are the region's private copies, read from
/proc/self/pagemap, and the template is refreshed with them. This sees
every writer of guest RAM: vCPUs, and also the VMM's own device emulation
and vhost back ends, whose writes KVM's dirty log (KVM_GET_DIRTY_LOG, the
dirty ring) never reports, so an incremental built from it alone would miss
virtqueue used rings, block reads and received packets.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import cow
from .errors import SnapshotError
from .memory import PAGE_SIZE
from .snapshot import (
    MANIFEST,
    MAX_CHAIN,
    Snapshot,
    SnapshotData,
    chain,
    disk_files,
    kept_files,
    manifest_digest,
    map_chain,
    take_snapshot,
)


@dataclass(frozen=True)
class Base:
    """The snapshot a machine's page tracking started at."""

    directory: Path
    manifest_sha256: str


_bases: weakref.WeakKeyDictionary[Any, Base] = weakref.WeakKeyDictionary()


def tracked_since(machine: Any) -> Base | None:
    """The snapshot whose memory the machine's templates hold (an incremental's possible parent)."""
    return _bases.get(machine)


def _track(machine: Any, directory: Path, runs: dict[Any, list[tuple[int, int]]] | None = None) -> None:
    for r in cow.template_regions(machine.memory):
        cow.refresh_template(r, None if runs is None else runs.get(r))
    _bases[machine] = Base(directory.resolve(), manifest_digest(directory))


def snapshot(machine: Any, directory: str | os.PathLike[str], *, parent: str | os.PathLike[str] | None = None,
             meta: dict | None = None, track: bool = True) -> Path:
    """A full snapshot (`parent=None`), or the pages written since `parent`; the machine must be paused.

    `track=True` starts (or continues) page tracking, so a later snapshot can
    name this one as its parent.
    """
    if parent is None:
        return take_snapshot(machine, directory, meta=meta,
                             then=(lambda d: _track(machine, d)) if track else None)
    return take_incremental(machine, directory, parent, meta=meta)


def take_incremental(machine: Any, directory: str | os.PathLike[str], parent: str | os.PathLike[str], *,
                     meta: dict | None = None) -> Path:
    """Write the pages written since snapshot `parent`, with the machine's full state, to `directory`."""
    if machine.state not in ("paused", "created"):
        raise SnapshotError(f"the machine is {machine.state}; pause it before a snapshot")
    parent_dir = Path(parent).resolve()
    base = _bases.get(machine)
    if base is None:
        raise SnapshotError(f"no page tracking on this machine: take a full snapshot of it first "
                            f"(an incremental's parent must be this machine's last snapshot, not {parent_dir})")
    if base.directory != parent_dir:
        raise SnapshotError(f"{parent_dir} is not this machine's last snapshot ({base.directory}); "
                            "an incremental snapshot's parent must be it")
    if not (parent_dir / MANIFEST).exists() or manifest_digest(parent_dir) != base.manifest_sha256:
        raise SnapshotError(f"parent snapshot {parent_dir} is missing or was replaced since it was taken")
    d = Path(directory)
    with machine.quiesced():
        try:
            virtio = machine.virtio.snapshot_configs() if machine.virtio is not None else []
        except Exception as e:  # SnapshotRefused: a device that cannot be recreated
            raise SnapshotError(f"cannot snapshot: {e}") from None
        state = machine.snapshot_state()
        config = machine.config.to_dict()
        config["virtio"] = virtio
        runs = {r: cow.page_runs(r) for r in cow.template_regions(machine.memory)}
        pieces = [(r.gpa + first * PAGE_SIZE, r.view[first * PAGE_SIZE:(first + count) * PAGE_SIZE])
                  for r, rr in runs.items() for first, count in rr]
        info = {"path": os.path.relpath(parent_dir, d.resolve()), "manifest_sha256": base.manifest_sha256,
                "regions": [{"gpa": r.gpa, "size": r.size} for r in machine.memory]}
        data = SnapshotData(config, pieces, state.to_dict(), machine.console.contents(), dict(meta or {}),
                            disk_files(virtio), parent=info)
        written = data.write(d)
        _track(machine, written, runs)
    return written


def merge(snapshot_dir: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Write the full snapshot the chain ending at `snapshot_dir` stands for into `out` (atomically)."""
    snap = Snapshot.open(snapshot_dir)
    mem = map_chain(snap) if snap.manifest.get("parent") else snap.map_memory()
    try:
        data = SnapshotData(dict(snap.config), [(r.gpa, r.mapping) for r in mem], snap.state, snap.console,
                            dict(snap.manifest.get("meta", {})), kept_files(snap))
        return data.write(out)
    finally:
        mem.close()


__all__ = ["Base", "MAX_CHAIN", "chain", "manifest_digest", "map_chain", "merge", "snapshot", "take_incremental",
           "tracked_since"]
