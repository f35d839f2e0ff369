"""The incremental snapshot format: chains resolve to the right bytes, broken chains are refused. No /dev/kvm."""

from __future__ import annotations

import json
import shutil

import pytest

from kvmpy.errors import SnapshotCorruptError
from kvmpy.snapshot import MANIFEST, Snapshot, SnapshotData
from kvmpy.snapshot_chain import chain, manifest_digest, merge

PAGE = 4096
SIZE = 16 * PAGE
LAYOUT = [{"gpa": 0, "size": SIZE}]


def _page(byte: int) -> bytes:
    return bytes([byte]) * PAGE


def _full(path, ram: bytearray):
    return SnapshotData({"k": 1}, [(0, ram)], {"s": "base"}, b"console").write(path)


def _incremental(path, parent, pages: dict[int, int], state="child"):
    pieces = [(n * PAGE, _page(b)) for n, b in sorted(pages.items())]
    info = {"path": f"../{parent.name}", "manifest_sha256": manifest_digest(parent), "regions": LAYOUT}
    return SnapshotData({"k": 1}, pieces, {"s": state}, b"console2", parent=info).write(path)


@pytest.fixture
def snaps(tmp_path):
    ram = bytearray(b"".join(_page(i) for i in range(16)))
    s0 = _full(tmp_path / "s0", ram)
    s1 = _incremental(tmp_path / "s1", s0, {3: 0xA1, 4: 0xA2})
    _incremental(tmp_path / "s2", s1, {4: 0xB2, 15: 0xBF})
    return tmp_path, ram


def _pages(mem) -> list[int]:
    data = mem.read(0, SIZE)
    return [data[i * PAGE] for i in range(16)]


def test_a_chain_resolves_to_the_base_overlaid_by_each_child_in_order(snaps):
    d, _ = snaps
    snap = Snapshot.open(d / "s2")
    assert [s.directory.name for s in chain(snap)] == ["s2", "s1", "s0"]
    mem = snap.map_memory()
    try:
        expect = list(range(16))
        expect[3], expect[4], expect[15] = 0xA1, 0xB2, 0xBF
        assert _pages(mem) == expect
    finally:
        mem.close()
    assert snap.state == {"s": "child"}


def test_an_incremental_holds_only_its_pages(snaps):
    d, _ = snaps
    assert (d / "s2" / "memory.bin").stat().st_size == 2 * PAGE
    assert json.loads((d / "s2" / MANIFEST).read_text())["parent"]["path"] == "../s1"


def test_merge_writes_the_full_snapshot_the_chain_stands_for(snaps):
    d, _ = snaps
    merged = merge(d / "s2", d / "merged")
    full = Snapshot.open(merged)
    assert "parent" not in full.manifest and full.state == {"s": "child"}
    assert (merged / "memory.bin").stat().st_size == SIZE
    a, b = full.map_memory(), Snapshot.open(d / "s2").map_memory()
    try:
        assert a.read(0, SIZE) == b.read(0, SIZE)
    finally:
        a.close()
        b.close()


def test_a_chain_moved_together_still_resolves(snaps, tmp_path_factory):
    d, _ = snaps
    moved = tmp_path_factory.mktemp("moved")
    for name in ("s0", "s1", "s2"):
        shutil.move(d / name, moved / name)
    mem = Snapshot.open(moved / "s2").map_memory()
    try:
        assert _pages(mem)[4] == 0xB2
    finally:
        mem.close()


def test_a_missing_parent_is_refused_naming_it(snaps):
    d, _ = snaps
    shutil.rmtree(d / "s1")
    with pytest.raises(SnapshotCorruptError, match=r"s2: its parent snapshot .*s1 is missing"):
        Snapshot.open(d / "s2").map_memory()


def test_a_replaced_parent_is_refused(snaps):
    d, ram = snaps
    ram[0] = 0xEE
    _full(d / "s0", ram)  # another snapshot written where the base was
    with pytest.raises(SnapshotCorruptError, match=r"s1: its parent .*s0 is not the snapshot it was taken from"):
        Snapshot.open(d / "s2").map_memory()


def test_a_parent_with_a_corrupted_memory_file_is_refused(snaps):
    d, _ = snaps
    with open(d / "s0" / "memory.bin", "r+b") as f:
        f.seek(5 * PAGE)
        f.write(b"\xff")
    with pytest.raises(SnapshotCorruptError, match="s0/memory.bin: SHA-256 does not match"):
        Snapshot.open(d / "s2").map_memory()


def test_a_chain_that_loops_is_refused(tmp_path):
    s0 = _full(tmp_path / "s0", bytearray(SIZE))
    s1 = _incremental(tmp_path / "s1", s0, {1: 1})
    info = json.loads((s1 / MANIFEST).read_text())["parent"]
    # s0 rewritten as an incremental of s1: s1 -> s0 -> s1
    looped = SnapshotData({"k": 1}, [(0, _page(2))], {"s": "x"}, b"",
                          parent={**info, "path": "../s1", "manifest_sha256": manifest_digest(s1)})
    shutil.rmtree(s0)
    looped.write(s0)
    manifest = json.loads((s1 / MANIFEST).read_text())
    manifest["parent"]["manifest_sha256"] = manifest_digest(s0)
    (s1 / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(SnapshotCorruptError, match="loops"):
        chain(Snapshot.open(s1))


def test_a_child_whose_layout_differs_from_its_base_is_refused(tmp_path):
    s0 = _full(tmp_path / "s0", bytearray(SIZE))
    info = {"path": "../s0", "manifest_sha256": manifest_digest(s0), "regions": [{"gpa": 0, "size": 2 * SIZE}]}
    s1 = SnapshotData({"k": 1}, [(0, _page(1))], {}, b"", parent=info).write(tmp_path / "s1")
    with pytest.raises(SnapshotCorruptError, match="memory layout differs"):
        Snapshot.open(s1).map_memory()
