"""Copy-on-write overlays on a read-only base, and disk fingerprints / records."""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest

from kvmpy.storage import (
    DiskChangedError,
    DiskRecord,
    ImageLockedError,
    check_disk_record,
    create_overlay,
    describe_disk,
    fingerprint,
    open_image,
)

from storage_helpers import assert_clean, needs_qemu_img, qemu_img

MiB = 1 << 20


@pytest.fixture
def base(tmp_path):
    p = tmp_path / "base.raw"
    p.write_bytes(os.urandom(2 * MiB))
    return p


def record_of(path):
    with open_image(path, readonly=True) as img:
        return describe_disk(img)


def digest(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


@needs_qemu_img
def test_ten_overlays_on_one_base_see_only_their_own_writes(base):
    before = digest(base)
    content = base.read_bytes()
    overlays = [create_overlay(base) for _ in range(10)]
    try:
        for i, ov in enumerate(overlays):
            ov.write(i * 4096, bytes([i + 1]) * 4096)
        for i, ov in enumerate(overlays):
            assert ov.read(i * 4096, 4096) == bytes([i + 1]) * 4096
            other = (i + 1) % 10
            assert ov.read(other * 4096, 4096) == content[other * 4096:(other + 1) * 4096]
            ov.flush()
            r = qemu_img("check", "-U", ov.path, check=False)  # -U: it is open (and locked) here
            assert r.returncode == 0, r.stdout + r.stderr
        with pytest.raises(ImageLockedError):
            open_image(base)  # the base is read-only while overlays use it
    finally:
        paths = [ov.path for ov in overlays]
        for ov in overlays:
            ov.close()
    assert digest(base) == before
    assert not any(p.exists() or p.parent.exists() for p in paths)  # throwaway: file and temp dir gone
    open_image(base).close()  # and writable again


@needs_qemu_img
def test_kept_overlay_survives_close_and_qemu_reads_it(base, tmp_path):
    path = tmp_path / "vm1.qcow2"
    with create_overlay(base, path, keep=True) as ov:
        assert ov.backing is not None and ov.backing.readonly and ov.backing.path == base.resolve()
        ov.write(MiB, b"kept" * 128)
    assert path.exists()
    assert_clean(path)
    info = qemu_img("info", path).stdout
    assert f"backing file: {base.resolve()}" in info and "backing file format: raw" in info
    out = qemu_img("dd", "-f", "qcow2", "-O", "raw", f"if={path}", f"of={tmp_path / 'flat.raw'}", "bs=1M").returncode
    assert out == 0
    flat = (tmp_path / "flat.raw").read_bytes()
    assert flat[MiB:MiB + 512] == b"kept" * 128 and flat[:MiB] == base.read_bytes()[:MiB]


def test_overlay_at_an_existing_path_is_refused_and_left_alone(base, tmp_path):
    path = tmp_path / "taken.qcow2"
    path.write_bytes(b"precious")
    with pytest.raises(OSError, match="taken.qcow2"):
        create_overlay(base, path)
    assert path.read_bytes() == b"precious"


def test_overlay_of_an_overlay_chains(base, tmp_path):
    with create_overlay(base, tmp_path / "a.qcow2", keep=True) as a:
        a.write(0, b"A" * 512)
    with create_overlay(tmp_path / "a.qcow2") as b:
        assert [i.format for i in b.chain()] == ["qcow2", "qcow2", "raw"]
        assert b.read(0, 512) == b"A" * 512


def test_fingerprint_record_roundtrip_and_unchanged_disk_passes(base):
    with open_image(base, readonly=True) as img:
        rec = describe_disk(img)
    again = DiskRecord.from_dict(rec.to_dict())
    assert again == rec and rec.format == "raw" and rec.virtual_size == 2 * MiB and not rec.overlay
    check_disk_record(again)


def test_a_write_anywhere_is_caught_by_mtime(base):
    rec = record_of(base)
    with open(base, "r+b") as f:  # one byte, not in a sampled block
        f.seek(MiB + 12345)
        f.write(b"\0")
    with pytest.raises(DiskChangedError, match="written at mtime"):
        check_disk_record(rec)


def test_a_write_with_mtime_restored_is_caught_when_sampled(base):
    st = base.stat()
    rec = record_of(base)
    with open(base, "r+b") as f:
        f.write(b"changed")  # the first bytes are always sampled
    os.utime(base, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(DiskChangedError, match="content differs"):
        check_disk_record(rec)


def test_resized_replaced_missing(base, tmp_path):
    rec = record_of(base)
    with open(base, "ab") as f:
        f.write(bytes(512))
    with pytest.raises(DiskChangedError, match="size"):
        check_disk_record(rec)
    base.unlink()
    with pytest.raises(DiskChangedError, match="missing"):
        check_disk_record(rec)


def test_a_copy_with_the_same_content_is_accepted(base, tmp_path):
    rec = record_of(base)
    copy = tmp_path / "copy.raw"
    shutil.copyfile(base, copy)
    rec.path = str(copy)
    assert fingerprint(copy).inode != rec.fingerprint.inode
    check_disk_record(rec)


def test_overlay_record_covers_the_chain_and_catches_a_changed_base(base, tmp_path):
    with create_overlay(base, tmp_path / "o.qcow2", keep=True) as ov:
        ov.write(0, b"x" * 512)
        rec = describe_disk(ov)
    assert rec.overlay and rec.format == "qcow2" and [b.path for b in rec.backing] == [str(base.resolve())]
    check_disk_record(rec)
    with open(base, "r+b") as f:
        f.write(b"base changed under the overlay")
    with pytest.raises(DiskChangedError, match="base.raw"):
        check_disk_record(rec)
