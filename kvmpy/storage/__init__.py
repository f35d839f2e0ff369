"""Disk images for virtio-blk: raw and qcow2 files, overlays, image locks, fingerprints.

`open_image(path)` detects the format by its magic (qcow2's `QFI\\xfb`,
anything else is raw) unless `format=` says it, locks the image the way
QEMU does (see `lock.py`) and returns a `DiskImage`. See docs/storage.md.
"""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path

from .image import CorruptImageError, DiskChangedError, DiskImage, ImageLockedError, StorageError, UnsupportedImageError
from .qcow2 import MAGIC as QCOW2_MAGIC
from .qcow2 import Qcow2Image, create_qcow2
from .raw import RawImage


class ImageFormat(StrEnum):
    RAW = "raw"
    QCOW2 = "qcow2"




def detect_format(path: str | os.PathLike[str]) -> ImageFormat:
    """qcow2 when the file starts with the qcow2 magic, else raw (as QEMU's probe does for these two)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise StorageError(f"disk image {path}: {e.strerror}") from None
    if head[:4] == QCOW2_MAGIC:
        return ImageFormat.QCOW2
    return ImageFormat.RAW


def open_image(path: str | os.PathLike[str], *, format: str | ImageFormat | None = None, readonly: bool = False,
               lock: bool = True, _depth: int = 0) -> DiskImage:
    """Open a disk image; `format` ("raw", "qcow2") overrides detection by magic."""
    fmt = ImageFormat(format) if format is not None else detect_format(path) if Path(path).exists() else None
    if fmt is None:
        raise StorageError(f"disk image {path}: No such file or directory")
    if fmt is ImageFormat.QCOW2:
        return Qcow2Image(path, readonly=readonly, lock=lock, _depth=_depth)
    return RawImage(path, readonly=readonly, lock=lock)


def parse_format(text: str) -> ImageFormat:
    try:
        return ImageFormat(text)
    except ValueError:
        raise StorageError(f"unknown disk image format {text!r}: raw or qcow2") from None


from .fingerprint import DiskRecord, Fingerprint, check_disk_record, describe_disk, fingerprint  # noqa: E402
from .overlay import create_overlay  # noqa: E402

__all__ = ["CorruptImageError", "DiskChangedError", "DiskImage", "DiskRecord", "Fingerprint", "ImageFormat",
           "ImageLockedError", "Qcow2Image", "RawImage", "StorageError", "UnsupportedImageError",
           "check_disk_record", "create_overlay", "create_qcow2", "describe_disk", "detect_format",
           "fingerprint", "open_image", "parse_format"]
