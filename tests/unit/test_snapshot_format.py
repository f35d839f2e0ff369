"""The snapshot directory format (kvmpy/snapshot.py): round trip on disk, refusals. No /dev/kvm needed."""

from __future__ import annotations

import json
import mmap

import pytest

from kvmpy._kvm import ffi
from kvmpy.blobs import from_blob, to_blob
from kvmpy.snapshot import (
    FORMAT_VERSION,
    Snapshot,
    SnapshotCorruptError,
    SnapshotData,
    SnapshotError,
    SnapshotVersionError,
)

PAGE = 4096


def _data() -> SnapshotData:
    low = bytearray(64 * PAGE)
    low[0:5] = b"hello"
    low[-3:] = b"end"
    high = bytes([0xAB]) * (4 * PAGE)
    state = {"vcpus": [{"id": 0, "regs": "AAAA"}], "devices": {"pio:0x3f8:COM1": {"ier": 3}}}
    return SnapshotData({"kernel": "/k", "memory": 68 * PAGE, "cpus": 1}, [(0, low), (1 << 32, high)],
                        state, b"console text\n", {"expect_cursor": 7})


def test_round_trip_keeps_memory_state_console_and_meta(tmp_path):
    data = _data()
    data.write(tmp_path / "s")
    snap = Snapshot.open(tmp_path / "s")
    assert snap.state == data.state
    assert snap.console == b"console text\n"
    assert snap.config == data.config
    assert snap.manifest["meta"] == {"expect_cursor": 7}
    assert snap.manifest["version"] == FORMAT_VERSION
    mem = snap.map_memory()
    try:
        assert mem.ram_ranges() == [(0, 64 * PAGE), (1 << 32, 4 * PAGE)]
        assert mem.read(0, 5) == b"hello" and mem.read(64 * PAGE - 3, 3) == b"end"
        assert mem.read(1 << 32, 8) == bytes([0xAB]) * 8
    finally:
        mem.close()


def test_restored_memory_is_copy_on_write(tmp_path):
    _data().write(tmp_path / "s")
    snap = Snapshot.open(tmp_path / "s")
    a, b = snap.map_memory(), snap.map_memory()
    try:
        a.write(0, b"AAAAA")
        assert b.read(0, 5) == b"hello"  # the other clone does not see the write
        assert (tmp_path / "s" / "memory.bin").read_bytes()[:5] == b"hello"  # nor does the file
        assert a.regions[0].mapping is not b.regions[0].mapping
    finally:
        a.close()
        b.close()


def test_other_format_version_is_refused_naming_both_versions(tmp_path):
    _data().write(tmp_path / "s")
    m = tmp_path / "s" / "manifest.json"
    manifest = json.loads(m.read_text())
    manifest["version"] = FORMAT_VERSION + 1
    m.write_text(json.dumps(manifest))
    with pytest.raises(SnapshotVersionError, match=f"version {FORMAT_VERSION + 1}.*version {FORMAT_VERSION}"):
        Snapshot.open(tmp_path / "s")


def test_other_struct_layout_is_refused(tmp_path):
    _data().write(tmp_path / "s")
    m = tmp_path / "s" / "manifest.json"
    manifest = json.loads(m.read_text())
    manifest["struct_sizes"]["regs"] += 8
    m.write_text(json.dumps(manifest))
    with pytest.raises(SnapshotVersionError, match="incompatible"):
        Snapshot.open(tmp_path / "s")


def test_corrupted_memory_file_is_refused(tmp_path):
    _data().write(tmp_path / "s")
    f = tmp_path / "s" / "memory.bin"
    raw = bytearray(f.read_bytes())
    raw[12345] ^= 0x01
    f.write_bytes(raw)
    with pytest.raises(SnapshotCorruptError, match="memory.bin: SHA-256"):
        Snapshot.open(tmp_path / "s")


def test_corrupted_state_file_is_refused(tmp_path):
    _data().write(tmp_path / "s")
    f = tmp_path / "s" / "state.json"
    f.write_bytes(f.read_bytes().replace(b'"ier": 3', b'"ier": 4'))
    with pytest.raises(SnapshotCorruptError, match="state.json: SHA-256"):
        Snapshot.open(tmp_path / "s")


def test_truncated_memory_file_is_refused_even_without_hashing(tmp_path):
    _data().write(tmp_path / "s")
    f = tmp_path / "s" / "memory.bin"
    with open(f, "r+b") as fh:
        fh.truncate(PAGE)
    with pytest.raises(SnapshotCorruptError, match="truncated"):
        Snapshot.open(tmp_path / "s", verify_memory=False)


def test_missing_manifest_means_no_snapshot(tmp_path):
    _data().write(tmp_path / "s")
    (tmp_path / "s" / "manifest.json").unlink()
    with pytest.raises(SnapshotCorruptError, match="no manifest.json"):
        Snapshot.open(tmp_path / "s")


def test_garbage_manifest_is_refused(tmp_path):
    _data().write(tmp_path / "s")
    (tmp_path / "s" / "manifest.json").write_text("{not json")
    with pytest.raises(SnapshotCorruptError, match="not valid JSON"):
        Snapshot.open(tmp_path / "s")


def test_missing_file_is_named(tmp_path):
    _data().write(tmp_path / "s")
    (tmp_path / "s" / "console.log").unlink()
    with pytest.raises(SnapshotCorruptError, match="console.log: missing"):
        Snapshot.open(tmp_path / "s")


def test_unaligned_memory_region_is_refused_when_writing(tmp_path):
    data = SnapshotData({}, [(0, bytes(100))], {}, b"")
    with pytest.raises(SnapshotError, match="not page aligned"):
        data.write(tmp_path / "s")


def test_kvm_structures_round_trip_through_their_stored_form():
    regs = ffi.new("struct kvm_regs *")
    regs.rip, regs.rax, regs.rflags = 0xFFFFFFFF81000000, 42, 0x246
    back = from_blob("regs", to_blob(regs))
    assert (back.rip, back.rax, back.rflags) == (0xFFFFFFFF81000000, 42, 0x246)


def test_kvm_structure_of_the_wrong_size_is_refused():
    with pytest.raises(SnapshotVersionError, match="struct kvm_regs"):
        from_blob("regs", "AAAA")


def test_serial_and_i8042_state_round_trip():
    from kvmpy.devices.i8042 import I8042
    from kvmpy.devices.serial import Serial16550

    a = Serial16550(lambda b: None)
    a.write(3, 1, 0x80)       # DLAB
    a.write(0, 1, 0x01)       # divisor 1
    a.write(3, 1, 0x03)
    a.write(2, 1, 0xC7)       # FIFOs on, trigger 14
    a.write(1, 1, 0x01)       # ERBFI
    a.receive(b"x" * 40)      # FIFO full, the rest in the backlog
    b = Serial16550(lambda b: None)
    b.restore_state(json.loads(json.dumps(a.snapshot_state())))
    assert b.snapshot_state() == a.snapshot_state()
    assert b.read(0, 1) == ord("x") and b.rx_fifo_level == 16  # refilled from the restored backlog

    k = I8042(on_reset=lambda: None)
    k.write(4, 1, 0x20)       # read command byte: a byte waits on the data port
    k2 = I8042(on_reset=lambda: None)
    k2.restore_state(k.snapshot_state())
    assert k2.read(4, 1) & 1 and k2.read(0, 1) == k.read(0, 1)


def test_memory_file_maps_private(tmp_path):
    # MAP_PRIVATE is what makes clones share pages: check the mapping's flags through /proc.
    _data().write(tmp_path / "s")
    mem = Snapshot.open(tmp_path / "s").map_memory()
    try:
        path = str(tmp_path / "s" / "memory.bin")
        with open("/proc/self/maps") as f:
            lines = [line for line in f if line.rstrip().endswith(path)]
        assert lines and all(line.split()[1][3] == "p" for line in lines)
    finally:
        mem.close()
    assert mmap.MAP_PRIVATE


# -- atomic writes ------------------------------------------------------------------------

def test_a_new_snapshot_replaces_the_old_one_whole(tmp_path):
    _data().write(tmp_path / "s")
    newer = _data()
    newer.console = b"newer console\n"
    newer.write(tmp_path / "s")
    assert Snapshot.open(tmp_path / "s").console == b"newer console\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no partial or old directory left


def test_a_directory_that_is_not_a_snapshot_is_not_overwritten(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(SnapshotError, match="not a kvmpy snapshot"):
        _data().write(tmp_path / "photos")
    assert (tmp_path / "photos" / "cat.jpg").read_bytes() == b"meow"


KILL_MID_WRITE = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from test_snapshot_format import _data
import kvmpy.snapshot as s

s._CHUNK = 4096  # many chunks, so the kill lands in the middle of memory.bin
real = s.hashlib.sha256
class Killer:
    def __init__(self, *a):
        self.h, self.n = real(*a), 0
    def update(self, b):
        self.n += 1
        if self.n == 20:
            os.kill(os.getpid(), signal.SIGKILL)
        self.h.update(b)
    def hexdigest(self):
        return self.h.hexdigest()
s.hashlib = type("H", (), {{"sha256": Killer}})
d = _data()
d.console = b"the second snapshot\\n"
d.write({target!r})
"""


def test_a_vmm_killed_mid_write_leaves_the_previous_snapshot_intact(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    target = tmp_path / "s"
    _data().write(target)
    tests = str(Path(__file__).resolve().parent)
    p = subprocess.run([sys.executable, "-c", KILL_MID_WRITE.format(tests=tests, target=str(target))],
                       capture_output=True, timeout=60)
    assert p.returncode == -9, p.stderr.decode()
    snap = Snapshot.open(target)  # the previous one, verified whole
    assert snap.console == b"console text\n"
    partial = [q for q in tmp_path.iterdir() if q.name.startswith(".s.partial-")]
    assert partial and (partial[0] / "memory.bin").exists()  # the kill really was mid-write
    with pytest.raises(SnapshotCorruptError, match="no manifest.json"):
        Snapshot.open(partial[0])


def test_a_full_disk_is_a_clear_error_and_keeps_the_previous_snapshot(tmp_path):
    import os
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=640k", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        small = SnapshotData({}, [(0, bytes(96 * PAGE))], {}, b"first\n")
        small.write(mnt / "s")  # 384 KiB: fits once, not twice
        with pytest.raises(SnapshotError, match=r"No space left on device.*previous snapshot there is intact"):
            SnapshotData({}, [(0, bytes(96 * PAGE))], {}, b"second\n").write(mnt / "s")
        assert Snapshot.open(mnt / "s").console == b"first\n"
        assert sorted(p.name for p in mnt.iterdir()) == ["s"]
    finally:
        subprocess.run(["umount", str(mnt)])


KILL_AT_PUBLISH = """
import os, shutil, signal, sys
sys.path.insert(0, {tests!r})
from test_snapshot_format import _data
import kvmpy.snapshot as s

real = shutil.rmtree
def rmtree_then_die(path, *a, **k):  # the first directory removed while publishing, then the kill
    real(path, *a, **k)
    os.kill(os.getpid(), signal.SIGKILL)
s.shutil.rmtree = rmtree_then_die
d = _data()
d.console = b"the second snapshot\\n"
d.write({target!r})
"""


def test_a_vmm_killed_while_publishing_leaves_a_whole_snapshot_in_place(tmp_path):
    # Whatever the publish step removes first, the directory's name must never be without a
    # whole snapshot: the old one until the swap, the new one after it.
    import subprocess
    import sys
    from pathlib import Path

    target = tmp_path / "s"
    _data().write(target)
    tests = str(Path(__file__).resolve().parent)
    p = subprocess.run([sys.executable, "-c", KILL_AT_PUBLISH.format(tests=tests, target=str(target))],
                       capture_output=True, timeout=60)
    assert p.returncode == -9, p.stderr.decode()
    assert Snapshot.open(target).console in (b"console text\n", b"the second snapshot\n")
