"""The `DiskImage` interface every disk format implements, and the storage errors.

A disk image is a virtual disk of `size` bytes addressed by byte offset.
`readv`/`writev` move data between the disk and a list of buffers (the
virtio-blk device passes views of guest RAM, so nothing is copied on the
raw path); `flush` makes everything written so far durable.
"""

from __future__ import annotations

import abc
import os
from pathlib import Path

from ..errors import KvmError

SECTOR_SIZE = 512


class StorageError(KvmError, OSError):
    """A disk image cannot be opened, read or written; the message names the file.

    An OSError too, so callers that caught the OSError of opening a raw file still do."""


class UnsupportedImageError(StorageError):
    """The image uses a format or feature kvmpy does not implement (named in the message)."""


class CorruptImageError(StorageError):
    """The image's metadata is inconsistent; `qemu-img check -r all IMG` may repair it."""


class ImageLockedError(StorageError):
    """Another process holds a lock on the image that conflicts with this open."""


class DiskChangedError(StorageError):
    """A disk no longer matches the description recorded for it (e.g. in a snapshot)."""


class DiskImage(abc.ABC):
    """A virtual disk: byte-addressed reads and writes, flush, size, read-only flag, close."""

    format: str = ""

    def __init__(self, path: str | os.PathLike[str], size: int, readonly: bool) -> None:
        self.path = Path(path)
        self.size = size
        self.readonly = readonly
        self.backing: DiskImage | None = None
        self.closed = False

    @property
    def direct_fd(self) -> int | None:
        """A file descriptor whose byte offsets are the disk's (raw images), else None."""
        return None

    @abc.abstractmethod
    def readv(self, offset: int, views: list[memoryview]) -> None:
        """Fill `views` (in order) with the disk's bytes from `offset` on."""

    @abc.abstractmethod
    def writev(self, offset: int, views: list[memoryview]) -> None:
        """Write the bytes of `views` (in order) to the disk from `offset` on."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Make every completed write durable (data, then the metadata that points to it)."""

    @abc.abstractmethod
    def _close(self) -> None:
        ...

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readv(offset, [memoryview(buf)])
        return bytes(buf)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.writev(offset, [memoryview(data).cast("B")])

    def read_sectors(self, sector: int, count: int) -> bytes:
        return self.read(sector * SECTOR_SIZE, count * SECTOR_SIZE)

    def write_sectors(self, sector: int, data: bytes) -> None:
        self.write(sector * SECTOR_SIZE, data)

    def chain(self) -> list[DiskImage]:
        """This image and its backing files, top first."""
        out: list[DiskImage] = []
        img: DiskImage | None = self
        while img is not None:
            out.append(img)
            img = img.backing
        return out

    def check_range(self, offset: int, length: int, write: bool) -> None:
        if self.closed:
            raise StorageError(f"{self.path}: image is closed")
        if write and self.readonly:
            raise StorageError(f"{self.path}: opened read-only; cannot write")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise StorageError(f"{self.path}: range {offset}+{length} outside the disk's {self.size} bytes")

    def close(self) -> None:
        """Flush (when writable), release the lock and close the file and the backing chain."""
        if self.closed:
            return
        try:
            if not self.readonly:
                self.flush()
        finally:
            self.closed = True
            try:
                self._close()
            finally:
                if self.backing is not None:
                    self.backing.close()

    def __enter__(self) -> DiskImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {self.size} bytes, {'ro' if self.readonly else 'rw'})"


def open_fd(path: str | os.PathLike[str], readonly: bool) -> int:
    """The image file opened for reading (and writing unless `readonly`); StorageError naming it."""
    try:
        return os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
    except OSError as e:
        hint = "; open it read-only (,ro) for a read-only file" if e.errno == 13 and not readonly else ""
        raise StorageError(f"disk image {path}: {e.strerror}{hint}") from None


def views_len(views: list[memoryview]) -> int:
    return sum(len(v) for v in views)


def slice_views(views: list[memoryview], start: int, length: int) -> list[memoryview]:
    """The views covering bytes [start, start+length) of the concatenation of `views`."""
    out: list[memoryview] = []
    pos = 0
    end = start + length
    for v in views:
        n = len(v)
        if pos + n > start and pos < end:
            out.append(v[max(start - pos, 0):min(end - pos, n)])
        pos += n
        if pos >= end:
            break
    return out


def fill_zero(views: list[memoryview]) -> None:
    for v in views:
        v[:] = bytes(len(v))


def copy_into(views: list[memoryview], data: bytes | memoryview) -> None:
    pos = 0
    for v in views:
        n = len(v)
        v[:] = data[pos:pos + n]
        pos += n


def preadv_full(fd: int, views: list[memoryview], offset: int) -> None:
    """preadv until `views` are full; what lies past the end of the file reads as zeros."""
    views = [v for v in views if len(v)]
    total = views_len(views)
    done = 0
    while done < total:
        pending = slice_views(views, done, total - done)
        n = os.preadv(fd, pending, offset + done)
        if n <= 0:
            fill_zero(pending)
            return
        done += n


def pwritev_full(fd: int, views: list[memoryview], offset: int) -> None:
    views = [v for v in views if len(v)]
    total = views_len(views)
    done = 0
    while done < total:
        n = os.pwritev(fd, slice_views(views, done, total - done), offset + done)
        if n <= 0:
            raise OSError(5, "short write")
        done += n
