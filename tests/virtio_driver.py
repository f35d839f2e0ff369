"""A minimal virtio-mmio driver for tests: what Linux's virtio_mmio + virtio_ring do, in Python.

It programs a real `MmioTransport` through its registers only (read/write
at offsets, 32-bit), lays rings out in a real `GuestMemory`, and reads the
used ring back, so device tests exercise the same paths as a guest.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from kvmpy.devices.virtio.mmio import DeviceStatus, MmioTransport, Register
from kvmpy.devices.virtio.queue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from kvmpy.memory import GuestMemory


class Allocator:
    """Bump allocation of guest RAM for rings and buffers."""

    def __init__(self, start: int = 0x10000) -> None:
        self.next = start

    def alloc(self, size: int, align: int = 16) -> int:
        self.next = (self.next + align - 1) & ~(align - 1)
        addr = self.next
        self.next += max(size, 1)
        return addr


@dataclass
class DriverQueue:
    memory: GuestMemory
    transport: MmioTransport
    index: int
    size: int
    desc: int
    avail: int
    used: int
    alloc: Allocator
    free: list[int] = field(default_factory=list)
    avail_idx: int = 0
    last_used: int = 0

    def __post_init__(self) -> None:
        self.free = list(range(self.size))

    def write_desc(self, table: int, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.memory.write(table + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def publish(self, head: int) -> None:
        self.memory.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_u16(self.avail + 2, self.avail_idx)

    def add(self, out: list[bytes] = (), in_lens: list[int] = (), *, indirect: bool = False,
            notify: bool = True) -> tuple[int, list[int]]:
        """Queue a chain of device-readable `out` buffers then device-writable buffers of `in_lens`.

        Returns (head, addresses of the writable buffers).
        """
        bufs: list[tuple[int, int, int]] = []
        for data in out:
            a = self.alloc.alloc(len(data))
            self.memory.write(a, data)
            bufs.append((a, len(data), 0))
        in_addrs = []
        for n in in_lens:
            a = self.alloc.alloc(n)
            self.memory.fill(a, n, 0xEE)
            in_addrs.append(a)
            bufs.append((a, n, VIRTQ_DESC_F_WRITE))
        if indirect:
            table = self.alloc.alloc(16 * len(bufs))
            for i, (a, n, f) in enumerate(bufs):
                last = i == len(bufs) - 1
                self.write_desc(table, i, a, n, f | (0 if last else VIRTQ_DESC_F_NEXT), 0 if last else i + 1)
            head = self.free.pop(0)
            self.write_desc(self.desc, head, table, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT, 0)
        else:
            ids = [self.free.pop(0) for _ in bufs]
            for k, (i, (a, n, f)) in enumerate(zip(ids, bufs)):
                last = k == len(ids) - 1
                self.write_desc(self.desc, i, a, n, f | (0 if last else VIRTQ_DESC_F_NEXT), 0 if last else ids[k + 1])
            head = ids[0]
        self.publish(head)
        if notify:
            self.kick()
        return head, in_addrs

    def kick(self) -> None:
        self.transport.write(Register.QUEUE_NOTIFY, 4, self.index)

    def used_entries(self) -> list[tuple[int, int]]:
        """New (id, len) entries in the used ring since the last call."""
        out = []
        idx = self.memory.read_u16(self.used + 2)
        while self.last_used != idx:
            e = self.used + 4 + 8 * (self.last_used % self.size)
            out.append(struct.unpack("<II", self.memory.read(e, 8)))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def recycle(self, head: int, count: int = 1) -> None:
        """Give descriptors back (tests that reuse rings call this for each used entry)."""
        self.free.extend(range(head, head + count))


class Driver:
    """Brings a device up the way Linux does (3.1.1) and hands out `DriverQueue`s."""

    def __init__(self, transport: MmioTransport, memory: GuestMemory, alloc: Allocator | None = None) -> None:
        self.t = transport
        self.memory = memory
        self.alloc = alloc or Allocator()
        self.queues: list[DriverQueue] = []

    def reg(self, offset: int) -> int:
        return self.t.read(offset, 4)

    def set(self, offset: int, value: int) -> None:
        self.t.write(offset, 4, value)

    def device_features(self) -> int:
        self.set(Register.DEVICE_FEATURES_SEL, 0)
        low = self.reg(Register.DEVICE_FEATURES)
        self.set(Register.DEVICE_FEATURES_SEL, 1)
        return low | self.reg(Register.DEVICE_FEATURES) << 32

    def write_features(self, features: int) -> None:
        for sel in (0, 1):
            self.set(Register.DRIVER_FEATURES_SEL, sel)
            self.set(Register.DRIVER_FEATURES, (features >> (32 * sel)) & 0xFFFF_FFFF)

    def setup(self, features: int | None = None, queue_size: int = 16, *, driver_ok: bool = True) -> int:
        self.set(Register.STATUS, 0)
        self.set(Register.STATUS, DeviceStatus.ACKNOWLEDGE)
        self.set(Register.STATUS, DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER)
        feats = self.device_features() if features is None else features
        self.write_features(feats)
        status = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK
        self.set(Register.STATUS, status)
        if not self.reg(Register.STATUS) & DeviceStatus.FEATURES_OK:
            raise RuntimeError(f"device refused features {feats:#x}: {self.t.last_error}")
        self.queues = []
        i = 0
        while True:
            self.set(Register.QUEUE_SEL, i)
            qmax = self.reg(Register.QUEUE_NUM_MAX)
            if qmax == 0:
                break
            n = min(qmax, queue_size)
            desc = self.alloc.alloc(16 * n, 16)
            avail = self.alloc.alloc(6 + 2 * n, 2)
            used = self.alloc.alloc(6 + 8 * n, 4)
            for a, size in ((desc, 16 * n), (avail, 6 + 2 * n), (used, 6 + 8 * n)):
                self.memory.fill(a, size, 0)
            self.set(Register.QUEUE_NUM, n)
            for low, value in ((Register.QUEUE_DESC_LOW, desc), (Register.QUEUE_DRIVER_LOW, avail),
                               (Register.QUEUE_DEVICE_LOW, used)):
                self.set(low, value & 0xFFFF_FFFF)
                self.set(low + 4, value >> 32)
            self.set(Register.QUEUE_READY, 1)
            self.queues.append(DriverQueue(self.memory, self.t, i, n, desc, avail, used, self.alloc))
            i += 1
        if driver_ok:
            self.set(Register.STATUS, status | DeviceStatus.DRIVER_OK)
        return feats

    def config(self, offset: int, size: int) -> int:
        return self.t.read(Register.CONFIG + offset, size)
