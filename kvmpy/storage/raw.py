"""Raw images: the disk's bytes are the file's bytes (a regular file or a block device)."""

from __future__ import annotations

import os

from .image import DiskImage, open_fd, preadv_full, pwritev_full
from .lock import ImageLock


class RawImage(DiskImage):
    """A raw file. I/O is `preadv`/`pwritev` at the same offsets; flush is `fdatasync`."""

    format = "raw"

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False, lock: bool = True) -> None:
        fd = open_fd(path, readonly)
        self.fd = fd
        self.lock: ImageLock | None = None
        try:
            size = os.lseek(fd, 0, os.SEEK_END)  # also right for a block device, where st_size is 0
            super().__init__(path, size, readonly)
            if lock:
                self.lock = ImageLock.acquire(fd, self.path, write=not readonly)
        except BaseException:
            os.close(fd)
            raise

    @property
    def direct_fd(self) -> int:
        return self.fd

    def readv(self, offset: int, views: list[memoryview]) -> None:
        self.check_range(offset, sum(len(v) for v in views), False)
        preadv_full(self.fd, views, offset)

    def writev(self, offset: int, views: list[memoryview]) -> None:
        self.check_range(offset, sum(len(v) for v in views), True)
        pwritev_full(self.fd, views, offset)

    def flush(self) -> None:
        if not self.readonly and not self.closed:
            os.fdatasync(self.fd)

    def _close(self) -> None:
        os.close(self.fd)  # the OFD lock goes with the last fd of its open file description
        self.fd = -1
