"""The split virtqueue (virtio 1.2 section 2.7), read and written through `GuestMemory`.

The guest is untrusted: every address comes from it, so every access goes
through `GuestMemory.view`, which refuses anything outside guest RAM. Two
kinds of failure are told apart:

- `ChainError`: one descriptor chain is bad (a buffer outside RAM, a loop,
  a chain longer than the queue, a device-readable buffer after a
  device-writable one, a malformed indirect table, too many bytes). The
  chain's head is known and valid, so the device fails that request and
  returns the head to the used ring; the queue keeps working.
- `QueueError`: the rings themselves are broken (an avail index that ran
  more than a queue's worth ahead, a head index past the table, a ring
  outside RAM). Nothing can be returned safely, so the device must enter
  DEVICE_NEEDS_RESET (section 2.1.2).

Neither ever lets a `GuestMemoryError` or an `IndexError` escape.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ...errors import GuestMemoryError, KvmError
from ...memory import GuestMemory

# struct virtq_desc flags (2.7.5)
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
# struct virtq_avail / virtq_used flags (2.7.6, 2.7.8)
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

DESC_SIZE = 16
USED_ELEM_SIZE = 8
MAX_QUEUE_SIZE = 32768  # 2.7: "The maximum Queue Size value is 32768"

# A request's buffers may not add up to more than this unless a device says
# otherwise: bounds the work and host memory one guest request can demand.
DEFAULT_MAX_CHAIN_BYTES = 64 << 20

_DESC = struct.Struct("<QIHH")


class VirtqueueError(KvmError):
    """Base of the errors the queue code raises about guest-provided rings."""


class QueueError(VirtqueueError):
    """The rings are broken; the device must enter DEVICE_NEEDS_RESET."""


class ChainError(VirtqueueError):
    """One descriptor chain is bad; fail the request whose head is `head`."""

    def __init__(self, head: int, message: str) -> None:
        super().__init__(f"descriptor chain at head {head}: {message}")
        self.head = head


@dataclass
class DescriptorChain:
    """One request: the device-readable buffers, then the device-writable ones.

    Each buffer is a zero-copy view of guest RAM; views are only valid until
    the chain is returned with `Virtqueue.add_used`.
    """

    head: int
    readable: list[memoryview] = field(default_factory=list)
    writable: list[memoryview] = field(default_factory=list)

    @property
    def readable_len(self) -> int:
        return sum(len(v) for v in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(len(v) for v in self.writable)

    def read_all(self) -> bytes:
        return b"".join(bytes(v) for v in self.readable)

    def write(self, data: bytes | memoryview, skip: int = 0) -> int:
        """Copy `data` into the writable buffers from byte `skip` on; returns bytes written."""
        return _scatter(self.writable, data, skip)


def _scatter(views: list[memoryview], data: bytes | memoryview, skip: int = 0) -> int:
    src = memoryview(data)
    done = 0
    for v in views:
        if done >= len(src):
            break
        if skip >= len(v):
            skip -= len(v)
            continue
        n = min(len(v) - skip, len(src) - done)
        v[skip:skip + n] = src[done:done + n]
        done += n
        skip = 0
    return done


def split_views(views: list[memoryview], offset: int) -> tuple[list[memoryview], list[memoryview]]:
    """Split a buffer list at byte `offset` into (before, after)."""
    before: list[memoryview] = []
    after: list[memoryview] = []
    for v in views:
        if offset >= len(v):
            before.append(v)
            offset -= len(v)
        elif offset > 0:
            before.append(v[:offset])
            after.append(v[offset:])
            offset = 0
        else:
            after.append(v)
    return before, after


class Virtqueue:
    """One split virtqueue: the registers the driver programs, and the device's ring state.

    The transport fills in `size`, `desc_table`, `avail_ring`, `used_ring` and
    `ready`; the device calls `pop`, `add_used` and `needs_interrupt`.
    """

    def __init__(self, memory: GuestMemory, max_size: int, index: int = 0) -> None:
        if not 0 < max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue max size {max_size} must be a power of 2 up to {MAX_QUEUE_SIZE}")
        self.memory = memory
        self.index = index
        self.max_size = max_size
        self.max_chain_bytes = DEFAULT_MAX_CHAIN_BYTES
        self.indirect = False   # VIRTIO_F_INDIRECT_DESC negotiated
        self.event_idx = False  # VIRTIO_F_EVENT_IDX negotiated
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.ready = False
        self.desc_table = 0
        self.avail_ring = 0
        self.used_ring = 0
        self.last_avail_idx = 0
        self.next_used_idx = 0
        self._signalled_used = 0

    # -- snapshots --------------------------------------------------------------

    _STATE = ("size", "ready", "desc_table", "avail_ring", "used_ring", "last_avail_idx", "next_used_idx",
              "indirect", "event_idx", "max_chain_bytes")

    @property
    def signalled_used(self) -> int:
        """With VIRTIO_F_EVENT_IDX: the used index the device last interrupted the driver for."""
        return self._signalled_used

    def snapshot_state(self) -> dict:
        """The driver-programmed registers and the device's ring positions (JSON-able)."""
        s = {name: getattr(self, name) for name in self._STATE}
        s["signalled_used"] = self._signalled_used  # event-idx: the used index last interrupted for
        return s

    def restore_state(self, s: dict) -> None:
        """Load `snapshot_state()`; a ready queue's rings are checked against this memory."""
        for name in self._STATE:
            setattr(self, name, type(getattr(self, name))(s[name]))
        self._signalled_used = int(s["signalled_used"])
        if self.ready:
            self.check()

    # -- validation -----------------------------------------------------------

    def check(self) -> None:
        """Raise `QueueError` unless the size is legal and all three rings lie in guest RAM."""
        n = self.size
        if not 0 < n <= self.max_size or n & (n - 1):
            raise QueueError(f"queue {self.index}: size {n} is not a power of 2 up to {self.max_size}")
        for name, addr, length, align in (
                ("descriptor table", self.desc_table, DESC_SIZE * n, 16),
                ("available ring", self.avail_ring, 6 + 2 * n, 2),
                ("used ring", self.used_ring, 6 + USED_ELEM_SIZE * n, 4)):
            if addr % align:
                raise QueueError(f"queue {self.index}: {name} at {addr:#x} is not {align}-byte aligned")
            if not self.memory.is_ram(addr, length):
                raise QueueError(f"queue {self.index}: {name} [{addr:#x}, {addr + length:#x}) "
                                 "is not guest RAM")

    # -- device side: taking requests ----------------------------------------------

    def _avail_idx(self) -> int:
        try:
            return self.memory.read_u16(self.avail_ring + 2)
        except GuestMemoryError as e:
            raise QueueError(f"queue {self.index}: available ring unreadable: {e}") from None

    def has_pending(self) -> bool:
        """True if the driver made a chain available that `pop` has not taken."""
        return self.ready and self._avail_idx() != self.last_avail_idx

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None. Raises `ChainError` (the head is consumed) or `QueueError`."""
        if not self.ready:
            return None
        avail_idx = self._avail_idx()
        pending = (avail_idx - self.last_avail_idx) & 0xFFFF
        if pending == 0:
            return None
        if pending > self.size:
            raise QueueError(f"queue {self.index}: available index {avail_idx} is {pending} entries "
                             f"ahead of {self.last_avail_idx}, more than the queue size {self.size}")
        n = self.size
        try:
            head = self.memory.read_u16(self.avail_ring + 4 + 2 * (self.last_avail_idx % n))
        except GuestMemoryError as e:
            raise QueueError(f"queue {self.index}: available ring unreadable: {e}") from None
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        if self.event_idx:
            self._write_avail_event(self.last_avail_idx)
        if head >= n:
            raise QueueError(f"queue {self.index}: head index {head} is past the table of {n}")
        return self.walk(head)

    def walk(self, head: int) -> DescriptorChain:
        """Follow the chain from descriptor `head` (section 2.7.5), checking everything."""
        mem = self.memory
        chain = DescriptorChain(head)
        table, table_len, idx = self.desc_table, self.size, head
        in_indirect = False
        visited = 0
        total = 0
        while True:
            if idx >= table_len:
                raise ChainError(head, f"next index {idx} is past the table of {table_len}")
            visited += 1
            if visited > table_len:
                raise ChainError(head, f"more than {table_len} descriptors: a loop or an overlong chain")
            try:
                addr, length, flags, nxt = _DESC.unpack(mem.view(table + DESC_SIZE * idx, DESC_SIZE))
            except GuestMemoryError as e:
                raise ChainError(head, f"descriptor {idx} unreadable: {e}") from None
            if flags & VIRTQ_DESC_F_INDIRECT:
                if not self.indirect:
                    raise ChainError(head, "indirect descriptor but VIRTIO_F_INDIRECT_DESC not negotiated")
                if in_indirect:
                    raise ChainError(head, "indirect descriptor inside an indirect table")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise ChainError(head, "indirect descriptor with NEXT set")
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > MAX_QUEUE_SIZE:
                    raise ChainError(head, f"indirect table length {length} is not 1..{MAX_QUEUE_SIZE} "
                                           "descriptors")
                if not mem.is_ram(addr, length):
                    raise ChainError(head, f"indirect table [{addr:#x}, {addr + length:#x}) is not guest RAM")
                table, table_len, idx = addr, length // DESC_SIZE, 0
                in_indirect, visited = True, 0
                continue
            total += length
            if total > self.max_chain_bytes:
                raise ChainError(head, f"buffers add up to more than {self.max_chain_bytes} bytes")
            try:
                view = mem.view(addr, length)
            except GuestMemoryError as e:
                raise ChainError(head, f"descriptor {idx}: {e}") from None
            if flags & VIRTQ_DESC_F_WRITE:
                chain.writable.append(view)
            elif chain.writable:
                raise ChainError(head, f"descriptor {idx} is device-readable after a device-writable one")
            else:
                chain.readable.append(view)
            if not flags & VIRTQ_DESC_F_NEXT:
                return chain
            idx = nxt

    def undo_pop(self) -> None:
        """Put the last popped chain back (the device could not use it yet)."""
        self.last_avail_idx = (self.last_avail_idx - 1) & 0xFFFF
        if self.event_idx:
            self._write_avail_event(self.last_avail_idx)

    # -- device side: completing requests ----------------------------------------

    def add_used(self, head: int, length: int) -> None:
        """Return chain `head` with `length` bytes written into its buffers (2.7.8)."""
        n = self.size
        elem = self.used_ring + 4 + USED_ELEM_SIZE * (self.next_used_idx % n)
        try:
            self.memory.write(elem, struct.pack("<II", head, length))
            self.next_used_idx = (self.next_used_idx + 1) & 0xFFFF
            # The element before the index: x86 keeps stores in order.
            self.memory.write_u16(self.used_ring + 2, self.next_used_idx)
        except GuestMemoryError as e:
            raise QueueError(f"queue {self.index}: used ring unwritable: {e}") from None

    def needs_interrupt(self) -> bool:
        """Whether the used entries added since the last call warrant an interrupt (2.7.7, 2.7.10)."""
        new = self.next_used_idx
        old, self._signalled_used = self._signalled_used, new
        try:
            if not self.event_idx:
                flags = self.memory.read_u16(self.avail_ring)
                return old != new and not flags & VIRTQ_AVAIL_F_NO_INTERRUPT
            used_event = self.memory.read_u16(self.avail_ring + 4 + 2 * self.size)
        except GuestMemoryError as e:
            raise QueueError(f"queue {self.index}: available ring unreadable: {e}") from None
        # vring_need_event(): has new_idx moved past used_event since old?
        return (new - used_event - 1) & 0xFFFF < (new - old) & 0xFFFF

    def _write_avail_event(self, value: int) -> None:
        try:
            self.memory.write_u16(self.used_ring + 4 + USED_ELEM_SIZE * self.size, value)
        except GuestMemoryError as e:
            raise QueueError(f"queue {self.index}: used ring unwritable: {e}") from None


__all__ = [
    "ChainError", "DescriptorChain", "QueueError", "Virtqueue", "VirtqueueError", "split_views",
    "VIRTQ_DESC_F_INDIRECT", "VIRTQ_DESC_F_NEXT", "VIRTQ_DESC_F_WRITE", "VIRTQ_AVAIL_F_NO_INTERRUPT",
]
