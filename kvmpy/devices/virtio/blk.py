"""virtio-blk on a disk image: raw or qcow2 (virtio 1.2 section 5.2).

One request queue. A request is a chain: a 16-byte device-readable header
(type, reserved, sector), the data buffers (device-readable for OUT,
device-writable for IN and GET_ID) and a final device-writable status byte.
The disk is a `kvmpy.storage.DiskImage`. On a raw image data moves between
the file and guest RAM with `preadv`/`pwritev` straight into or out of the
chain's views of guest memory, so a request is one system call with no copy
in Python; other formats get the same views through `DiskImage.readv/writev`.

Durability: FLUSH is `DiskImage.flush()` (raw: `fdatasync`; qcow2: data,
then refcounts, L2 and L1 tables, each step synced), done before the
request is returned to the guest. A driver that does not negotiate
VIRTIO_BLK_F_FLUSH gets a write-through device: every OUT is flushed
before completion (5.2.6.2). tests/unit/test_blk_durability.py proves the
order of those system calls under strace.
"""

from __future__ import annotations

import enum
import os
import struct
from pathlib import Path

from ...storage import DiskImage, StorageError, open_image
from .mmio import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1, DeviceId, VirtioDevice
from .queue import DescriptorChain, split_views

SECTOR_SIZE = 512
ID_BYTES = 20  # VIRTIO_BLK_ID_BYTES

VIRTIO_BLK_F_SIZE_MAX = 1 << 1
VIRTIO_BLK_F_SEG_MAX = 1 << 2
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_BLK_SIZE = 1 << 6
VIRTIO_BLK_F_FLUSH = 1 << 9

QUEUE_SIZE = 256
SEG_MAX = QUEUE_SIZE - 2  # header and status take a descriptor each
SIZE_MAX = 1 << 20        # bytes per data segment

_HEADER = struct.Struct("<IIQ")


class RequestType(enum.IntEnum):
    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8


class BlkStatus(enum.IntEnum):
    OK = 0
    IOERR = 1
    UNSUPP = 2


class BlockDevice(VirtioDevice):
    """A disk on `image`: a path (opened and locked by `kvmpy.storage.open_image`, format by
    magic unless `format` says "raw" or "qcow2") or an open `DiskImage`, which the device then owns.
    `read_only` offers VIRTIO_BLK_F_RO."""

    device_id = DeviceId.BLOCK
    queue_sizes = (QUEUE_SIZE,)

    def __init__(self, image: str | os.PathLike[str] | DiskImage, *, read_only: bool = False,
                 serial: str | None = None, format: str | None = None) -> None:
        super().__init__()
        self.fd = -1
        if isinstance(image, DiskImage):
            self.image = image
            read_only = read_only or image.readonly
        else:
            self.image = open_image(image, format=format, readonly=read_only)
        self.path = Path(self.image.path)
        self.read_only = read_only
        size = self.image.size
        if size < SECTOR_SIZE:
            self.image.close()
            raise StorageError(f"disk image {self.path}: {size} bytes, smaller than one 512-byte sector")
        direct = self.image.direct_fd
        self.fd = direct if direct is not None else -1  # the raw fast path: preadv/pwritev on this fd
        self.capacity = size // SECTOR_SIZE
        ident = serial if serial is not None else self.path.name
        self.device_serial = ident.encode()[:ID_BYTES]
        self.features = (VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC | VIRTIO_F_EVENT_IDX
                         | VIRTIO_BLK_F_SIZE_MAX | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE
                         | VIRTIO_BLK_F_FLUSH | (VIRTIO_BLK_F_RO if read_only else 0))
        self.requests = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self.flushes = 0

    def config_space(self) -> bytes:
        # struct virtio_blk_config up to blk_size (5.2.4); geometry stays zero.
        return struct.pack("<QII4xI", self.capacity, SIZE_MAX, SEG_MAX, SECTOR_SIZE)

    def activate(self) -> None:
        self.queues[0].max_chain_bytes = SEG_MAX * SIZE_MAX + 2 * SECTOR_SIZE

    def process_queue(self, index: int) -> None:
        if index != 0:
            return
        q = self.queues[0]
        for chain in self.chains(q):
            q.add_used(chain.head, self._request(chain))
        self.signal_used(q)  # a no-op unless entries were added (malformed chains included)

    def _request(self, chain: DescriptorChain) -> int:
        """Serve one request; returns the used length (bytes written into the chain)."""
        self.requests += 1
        if chain.writable_len < 1:
            self.bad_chains += 1
            return 0  # no status byte to report anything in
        data_out, status = split_views(chain.writable, chain.writable_len - 1)
        header, data_in = split_views(chain.readable, _HEADER.size)
        if sum(len(v) for v in header) < _HEADER.size:
            return self._status(status, BlkStatus.IOERR)
        rtype, _, sector = _HEADER.unpack(b"".join(bytes(v) for v in header))
        try:
            match rtype:
                case RequestType.IN:
                    n = self._transfer(sector, data_out, write=False)
                    return self._status(status, BlkStatus.OK if n >= 0 else BlkStatus.IOERR, max(n, 0))
                case RequestType.OUT:
                    if self.read_only:
                        return self._status(status, BlkStatus.IOERR)
                    n = self._transfer(sector, data_in, write=True)
                    if n >= 0 and not self.negotiated & VIRTIO_BLK_F_FLUSH:
                        self.image.flush()
                    return self._status(status, BlkStatus.OK if n >= 0 else BlkStatus.IOERR)
                case RequestType.FLUSH:
                    if not self.read_only:
                        self.image.flush()
                    self.flushes += 1
                    return self._status(status, BlkStatus.OK)
                case RequestType.GET_ID:
                    ident = self.device_serial.ljust(ID_BYTES, b"\0")
                    n = _copy_into(data_out, ident)
                    return self._status(status, BlkStatus.OK, n)
        except (OSError, StorageError):
            return self._status(status, BlkStatus.IOERR)
        return self._status(status, BlkStatus.UNSUPP)

    def _transfer(self, sector: int, views: list[memoryview], *, write: bool) -> int:
        """pread/pwrite `views` at `sector`; -1 when the range is not inside the disk."""
        length = sum(len(v) for v in views)
        if length % SECTOR_SIZE or sector + length // SECTOR_SIZE > self.capacity:
            return -1
        offset = sector * SECTOR_SIZE
        views = [v for v in views if len(v)]
        if self.fd < 0:
            if write:
                self.image.writev(offset, views)
                self.bytes_written += length
            else:
                self.image.readv(offset, views)
                self.bytes_read += length
            return length
        done = 0
        while done < length:
            pending = split_views(views, done)[1]
            if write:
                n = os.pwritev(self.fd, pending, offset + done)
            else:
                n = os.preadv(self.fd, pending, offset + done)
            if n <= 0:
                if write:
                    return -1
                _copy_into(pending, bytes(length - done))  # past the end of a short file: zeros
                break
            done += n
        if write:
            self.bytes_written += length
        else:
            self.bytes_read += length
        return length

    @staticmethod
    def _status(status: list[memoryview], code: int, data_len: int = 0) -> int:
        status[-1][-1] = code
        return data_len + 1

    def snapshot_config(self) -> dict:
        """The disk as a restore needs it: path, mode, format, and a record to refuse a changed disk.

        The image is not copied. An overlay also names its base and its own
        file (the snapshot keeps a copy of the overlay: kvmpy/snapshot.py).
        Taken with the device quiet (the machine's `quiesced()`); a
        writable image is flushed first, so the record is of the file as it is.
        """
        from ...storage import describe_disk
        from ...storage.overlay import OverlayImage

        config = {"kind": "blk", "path": str(self.path), "read_only": self.read_only,
                  "serial": self.device_serial.decode(errors="replace"), "format": self.image.format,
                  "record": describe_disk(self.image).to_dict()}
        if isinstance(self.image, OverlayImage):
            config["overlay"] = {"base": str(self.image.base), "file": str(self.image.path),
                                 "keep": bool(self.image.keep)}
        return config

    def close(self) -> None:
        """Flush and close the image (releasing its lock)."""
        self.image.close()
        self.fd = -1

    def __repr__(self) -> str:
        return (f"BlockDevice({self.path}, {self.image.format}, {'ro' if self.read_only else 'rw'}, "
                f"{self.capacity} sectors)")


def _copy_into(views: list[memoryview], data: bytes) -> int:
    done = 0
    for v in views:
        n = min(len(v), len(data) - done)
        v[:n] = data[done:done + n]
        done += n
        if done >= len(data):
            break
    return done


__all__ = ["BlkStatus", "BlockDevice", "RequestType", "SECTOR_SIZE", "VIRTIO_BLK_F_FLUSH", "VIRTIO_BLK_F_RO"]
