"""kvmpy's qcow2 against QEMU's own tools: images made by qemu-img, checked by `qemu-img check`,
compared by `qemu-img compare` with the same writes done by qemu-io."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest

from kvmpy.storage import (
    CorruptImageError,
    ImageFormat,
    Qcow2Image,
    RawImage,
    StorageError,
    UnsupportedImageError,
    create_qcow2,
    detect_format,
    open_image,
)

from storage_helpers import assert_clean, assert_same_content, needs_qemu_img, qemu_img, qemu_io_writes

pytestmark = needs_qemu_img
MiB = 1 << 20

# Writes that cover: inside one cluster, across cluster boundaries, a whole cluster, a partial
# rewrite of an allocated cluster, far into the disk (a second L2 table with small clusters).
WRITES = [(0, 512, 0x11), (4096 - 100, 300, 0x22), (65536, 65536, 0x33), (65536 + 1000, 10, 0x44),
          (3 * MiB + 7, 70000, 0x55), (8 * MiB - 512, 512, 0x66)]


def kvmpy_writes(img, writes):
    for off, length, byte in writes:
        img.write(off, bytes([byte]) * length)


def raw_model(path, size, writes, base: bytes | None = None):
    data = bytearray(base if base is not None else bytes(size))
    for off, length, byte in writes:
        data[off:off + length] = bytes([byte]) * length
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("cluster_size", ["512", "4k", "64k", "2M"])
def test_writes_to_an_image_made_by_qemu_img_match_qemu_io(tmp_path, cluster_size):
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", ours, "8M")
    shutil.copy(ours, theirs)
    with open_image(ours) as img:
        assert isinstance(img, Qcow2Image) and img.size == 8 * MiB
        kvmpy_writes(img, WRITES)
        for off, length, byte in WRITES[-2:]:
            assert img.read(off, length) == bytes([byte]) * length
    qemu_io_writes(theirs, WRITES)
    assert_clean(ours)
    assert_same_content(ours, theirs)
    assert_same_content(ours, raw_model(tmp_path / "model.raw", 8 * MiB, WRITES))


def test_reads_what_qemu_io_wrote(tmp_path):
    p = tmp_path / "q.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", p, "4M")
    qemu_io_writes(p, WRITES[:4])
    with open_image(p, readonly=True) as img:
        assert img.read(0, 4 * MiB) == raw_model(tmp_path / "m.raw", 4 * MiB, WRITES[:4]).read_bytes()


def test_image_created_by_kvmpy_is_clean_and_qemu_reads_our_writes(tmp_path):
    p = create_qcow2(tmp_path / "new.qcow2", 8 * MiB)
    assert_clean(p)
    info = qemu_img("info", "--output=json", p).stdout
    assert '"virtual-size": 8388608' in info and '"compat": "1.1"' in info
    with open_image(p) as img:
        kvmpy_writes(img, WRITES)
    assert_clean(p)
    assert_same_content(p, raw_model(tmp_path / "m.raw", 8 * MiB, WRITES))


def test_refcount_table_grows_and_stays_consistent(tmp_path):
    # 512-byte clusters: one refcount block covers 128 KiB of file, one table cluster 8 MiB.
    p = tmp_path / "grow.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", p, "32M")
    writes = [(off, 512, (off >> 9) & 0xFF) for off in range(0, 20 * MiB, 8192)]
    writes.append((24 * MiB, 8 * MiB, 0x77))  # with those, more than the first table covers
    with open_image(p) as img:
        before = img.rt_offset
        kvmpy_writes(img, writes)
        assert img.rt_offset != before  # the table moved
    assert_clean(p)
    assert_same_content(p, raw_model(tmp_path / "m.raw", 32 * MiB, writes))


def test_backing_chain_raw_then_qcow2_then_overlay(tmp_path):
    base = tmp_path / "base.raw"
    content = os.urandom(4 * MiB)
    base.write_bytes(content)
    mid, top = tmp_path / "mid.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "raw", mid)  # relative backing name
    qemu_io_writes(mid, [(MiB, 4096, 0xAA)])
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", mid, "-F", "qcow2", top)
    writes = [(100, 10, 0x01), (MiB + 2048, 4096, 0x02), (2 * MiB, 65536, 0x03)]
    with open_image(top) as img:
        assert [i.format for i in img.chain()] == ["qcow2", "qcow2", "raw"]
        kvmpy_writes(img, writes)
    expect = raw_model(tmp_path / "m.raw", 4 * MiB, [(MiB, 4096, 0xAA)] + writes, base=content)
    assert_clean(top)
    assert_same_content(top, expect)
    assert base.read_bytes() == content
    assert_same_content(mid, raw_model(tmp_path / "mid.raw", 4 * MiB, [(MiB, 4096, 0xAA)], base=content))


def test_overlay_larger_than_its_backing_file_reads_zeros_past_it(tmp_path):
    base = tmp_path / "small.raw"
    base.write_bytes(b"\x99" * MiB)
    top = tmp_path / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top, "2M")
    with open_image(top) as img:
        assert img.read(MiB - 2, 4) == b"\x99\x99\0\0"
        img.write(MiB - 1, b"\x01\x02")
    assert_same_content(top, raw_model(tmp_path / "m.raw", 2 * MiB, [(MiB - 1, 1, 1), (MiB, 1, 2)],
                                       base=b"\x99" * MiB + bytes(MiB)))
    assert_clean(top)


def test_compressed_clusters_read_and_rewritten(tmp_path):
    raw = tmp_path / "src.raw"
    content = b"".join(bytes([i & 0xFF]) * 1000 + os.urandom(24) for i in range(4096))[:4 * MiB]
    raw.write_bytes(content)
    comp = tmp_path / "comp.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", "cluster_size=64k", raw, comp)
    assert json.loads(qemu_img("check", "--output=json", comp).stdout)["compressed-clusters"] > 0
    with open_image(comp) as img:
        assert img.read(0, 4 * MiB) == content
        img.write(70000, b"\xEE" * 100)             # inside a compressed cluster
        img.write(2 * MiB, b"\xDD" * 65536)          # a whole compressed cluster replaced
    assert_clean(comp)                               # no leak: the old compressed clusters were freed
    assert_same_content(comp, raw_model(tmp_path / "m.raw", 4 * MiB, [(70000, 100, 0xEE), (2 * MiB, 65536, 0xDD)],
                                        base=content))


def test_zero_clusters_over_a_backing_file(tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x5A" * (2 * MiB))
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top)
    subprocess_io(top, "write -z 0 128k")           # zero clusters (flag set, no host cluster)
    with open_image(top) as img:
        assert img.read(0, 128 * 1024) == bytes(128 * 1024)
        assert img.read(128 * 1024, 4) == b"\x5A" * 4
        img.write(1000, b"\x01" * 10)                # partial write into a zero cluster
    expect = bytearray(b"\x5A" * (2 * MiB))
    expect[:128 * 1024] = bytes(128 * 1024)
    expect[1000:1010] = b"\x01" * 10
    (tmp_path / "m.raw").write_bytes(expect)
    assert_clean(top)
    assert_same_content(top, tmp_path / "m.raw")


def test_preallocated_zero_clusters_are_reused(tmp_path):
    p = tmp_path / "pre.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", p, "1M")
    subprocess_io(p, "write -P 0x42 0 128k")
    subprocess_io(p, "write -z 0 128k")             # keeps the host clusters, sets the zero flag
    size_before = p.stat().st_size
    with open_image(p) as img:
        assert img.read(0, 128 * 1024) == bytes(128 * 1024)
        img.write(70000, b"\x07" * 3)
    assert p.stat().st_size == size_before          # no new cluster allocated
    assert_clean(p)
    assert_same_content(p, raw_model(tmp_path / "m.raw", MiB, [(70000, 3, 7)]))


def test_version_2_images_are_read_and_written(tmp_path):
    p = tmp_path / "v2.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", p, "4M")
    with open_image(p) as img:
        assert img.version == 2
        kvmpy_writes(img, WRITES[:4])
    assert_clean(p)
    assert_same_content(p, raw_model(tmp_path / "m.raw", 4 * MiB, WRITES[:4]))


def test_extended_l2_is_refused_with_its_name(tmp_path):
    p = tmp_path / "ext.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", p, "1M")
    with pytest.raises(UnsupportedImageError, match="extended L2"):
        open_image(p)


def test_zstd_compression_is_refused(tmp_path):
    p = tmp_path / "zstd.qcow2"
    r = qemu_img("create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", p, "1M", check=False)
    if r.returncode != 0:
        pytest.skip(f"this qemu-img has no zstd: {r.stderr.strip()}")
    with pytest.raises(UnsupportedImageError, match="compression type"):
        open_image(p)


def test_internal_snapshots_read_only(tmp_path):
    p = tmp_path / "snap.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", p, "1M")
    subprocess_io(p, "write -P 0x31 0 4k")
    qemu_img("snapshot", "-c", "s1", p)
    with pytest.raises(UnsupportedImageError, match="internal snapshot"):
        open_image(p)
    with open_image(p, readonly=True) as img:
        assert img.read(0, 4096) == b"\x31" * 4096


def test_dirty_image_is_refused_for_writing(tmp_path):
    p = tmp_path / "dirty.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", p, "1M")
    with open(p, "r+b") as f:
        f.seek(72)
        f.write(struct.pack(">Q", 1))  # incompatible feature bit 0: dirty
    with pytest.raises(CorruptImageError, match="qemu-img check -r all"):
        open_image(p)
    with open_image(p, readonly=True) as img:
        assert img.read(0, 512) == bytes(512)


def test_unaligned_l2_offset_is_a_corrupt_image_error(tmp_path):
    p = tmp_path / "bad.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", p, "1M")
    subprocess_io(p, "write 0 4k")
    with open_image(p, readonly=True) as img:
        l1_off = img.l1_offset
    with open(p, "r+b") as f:
        f.seek(l1_off)
        entry, = struct.unpack(">Q", f.read(8))
        f.seek(l1_off)
        f.write(struct.pack(">Q", entry + 0x200))
    with open_image(p, readonly=True) as img, pytest.raises(CorruptImageError, match="not cluster-aligned"):
        img.read(0, 512)


def test_not_qcow2_and_format_override(tmp_path):
    raw = tmp_path / "looks.img"
    raw.write_bytes(b"QFI\xfb" + bytes(4092))
    assert detect_format(raw) is ImageFormat.QCOW2
    with pytest.raises(UnsupportedImageError, match="looks.img: qcow2 version 0"):
        open_image(raw)
    with open_image(raw, format="raw") as img:       # explicit override: served as raw bytes
        assert isinstance(img, RawImage) and img.read(0, 4) == b"QFI\xfb"
    plain = tmp_path / "plain.img"
    plain.write_bytes(bytes(4096))
    assert detect_format(plain) is ImageFormat.RAW


def test_read_only_and_range_errors(tmp_path):
    p = create_qcow2(tmp_path / "a.qcow2", MiB)
    with open_image(p, readonly=True) as img:
        with pytest.raises(StorageError, match="read-only"):
            img.write(0, b"x")
        with pytest.raises(StorageError, match="outside the disk"):
            img.read(MiB - 1, 2)
    with pytest.raises(StorageError, match="exists|File exists"):
        create_qcow2(p, MiB)


def subprocess_io(path, cmd: str) -> None:
    import subprocess
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", cmd, str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout + r.stderr


def test_absurd_table_sizes_in_the_header_are_refused(tmp_path):
    p = create_qcow2(tmp_path / "huge.qcow2", MiB)
    with open(p, "r+b") as f:
        f.seek(36)
        f.write(struct.pack(">I", 0xFFFF_FFF0))  # l1_size: 32 GiB of L1 table
    with pytest.raises(CorruptImageError, match="larger than QEMU allows"):
        open_image(p)
