"""Cheap content fingerprints of disk images, and records that say which disk a snapshot belongs to.

`fingerprint(path)` costs a stat and at most ~1.2 MiB of reads, whatever
the image size: the file's size, inode, device and mtime_ns, plus a
SHA-256 over the first and last 64 KiB and 16 evenly spaced 4 KiB blocks
(and, for qcow2, the header cluster, the L1 table and the refcount table).

`check_disk_record(record)` refuses a disk whose size or digest differ
(resized, reformatted, another image put there, most writes that allocate
qcow2 tables or touch a sampled block), and an image that is the same
file (same device and inode) but was modified since (mtime_ns differs:
catches any write through the file system, since mtime is updated on
every write). A copy of the file (new inode, same size and digest) is
accepted: `cp` keeps the content. Not caught: an in-place write whose
mtime was set back afterwards (`touch -r`) that misses the sampled blocks,
on a copy; use `verify_full` (a full hash) when that matters.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import asdict, dataclass, field
from typing import Any

from .image import DiskChangedError, DiskImage, StorageError

SAMPLE_EDGE = 64 << 10
SAMPLE_BLOCK = 4096
SAMPLES = 16


@dataclass(frozen=True)
class Fingerprint:
    size: int
    mtime_ns: int
    inode: int
    device: int
    digest: str  # sha256 hex of the sampled bytes (and qcow2 tables)


@dataclass
class DiskRecord:
    """What a snapshot records about one disk: enough to refuse a restore onto a different or changed disk."""

    path: str
    format: str
    virtual_size: int
    read_only: bool
    overlay: bool
    fingerprint: Fingerprint
    backing: list[DiskRecord] = field(default_factory=list)  # the backing chain, nearest first

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DiskRecord:
        return cls(d["path"], d["format"], int(d["virtual_size"]), bool(d["read_only"]), bool(d["overlay"]),
                   Fingerprint(**d["fingerprint"]), [cls.from_dict(b) for b in d.get("backing", [])])


def _qcow2_tables(fd: int, h: hashlib._Hash) -> None:
    head = os.pread(fd, 72, 0)
    if len(head) < 72 or head[:4] != b"QFI\xfb":
        return
    cluster_bits, = struct.unpack_from(">I", head, 20)
    l1_size, l1_off, rt_off, rt_clusters = struct.unpack_from(">IQQI", head, 36)
    if not 9 <= cluster_bits <= 21:
        return
    h.update(os.pread(fd, 1 << cluster_bits, 0))
    h.update(os.pread(fd, min(8 * l1_size, 32 << 20), l1_off))
    h.update(os.pread(fd, min(rt_clusters << cluster_bits, 32 << 20), rt_off))


def fingerprint(path: str | os.PathLike[str]) -> Fingerprint:
    """The fingerprint of the file at `path` (see the module doc for what it catches)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise StorageError(f"disk image {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        size = os.lseek(fd, 0, os.SEEK_END)
        h = hashlib.sha256(str(size).encode())
        h.update(os.pread(fd, SAMPLE_EDGE, 0))
        h.update(os.pread(fd, SAMPLE_EDGE, max(size - SAMPLE_EDGE, 0)))
        for k in range(SAMPLES):
            h.update(os.pread(fd, SAMPLE_BLOCK, (size * k // SAMPLES) & ~(SAMPLE_BLOCK - 1)))
        _qcow2_tables(fd, h)
    finally:
        os.close(fd)
    return Fingerprint(size, st.st_mtime_ns, st.st_ino, st.st_dev, h.hexdigest())


def describe_disk(image: DiskImage) -> DiskRecord:
    """A record of `image` and its backing chain; a writable image is flushed first so the file is current."""
    if not image.readonly:
        image.flush()
    from .overlay import OverlayImage

    chain = image.chain()
    records = [DiskRecord(str(img.path.resolve()), img.format, img.size, img.readonly,
                          isinstance(img, OverlayImage), fingerprint(img.path)) for img in chain]
    records[0].backing = records[1:]
    return records[0]


def check_disk_record(record: DiskRecord) -> None:
    """DiskChangedError naming the file and what differs, unless the disk (and its chain) still match."""
    for rec in [record, *record.backing]:
        try:
            now = fingerprint(rec.path)
        except StorageError:
            raise DiskChangedError(f"{rec.path}: recorded disk is missing") from None
        fp = rec.fingerprint
        if now.size != fp.size:
            raise DiskChangedError(f"{rec.path}: disk changed since it was recorded: size {fp.size} -> {now.size}")
        if now.digest != fp.digest:
            raise DiskChangedError(f"{rec.path}: disk changed since it was recorded: content differs "
                                   "(sampled blocks / qcow2 tables)")
        if (now.device, now.inode) == (fp.device, fp.inode) and now.mtime_ns != fp.mtime_ns:
            raise DiskChangedError(f"{rec.path}: disk changed since it was recorded: written at mtime "
                                   f"{now.mtime_ns} (recorded {fp.mtime_ns})")


def verify_full(path: str | os.PathLike[str]) -> str:
    """SHA-256 of the whole file (expensive: reads every byte), for when sampling is not enough."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


__all__ = ["DiskRecord", "Fingerprint", "check_disk_record", "describe_disk", "fingerprint", "verify_full"]
