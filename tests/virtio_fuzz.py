"""A hostile virtio driver for property-based fuzzing through `MmioTransport`.

`Rig` puts one device (blk, net, rng, vsock) behind a real `MmioTransport`
over a real `GuestMemory` laid out with holes, and `OPS` is a hypothesis
strategy of what a hostile guest (and the host side) does: register
accesses of any offset, size and value (feature negotiation, queue set-up
and status writes in any order), descriptor chains with addresses outside
RAM or straddling a region's end, loops, absurd lengths, wrong directions,
indirect tables, avail indexes that jump, chains the guest rewrites while
the device reads them (a hook on the device's reads of guest memory), and
host traffic (frames from the TAP, vsock clients).

`Rig.apply(op)` runs one operation and then checks the invariants:

- nothing raises out of the transport (a `GuestMemoryError` included),
  and the device's generic error path, `_guarded`'s "unexpected error"
  (which means a bug, not a hostile guest), is never taken;
- RAM the device may not write (everything but the rings and the buffer
  pool) is unchanged;
- a well-formed request (`Good`) on a device that has not entered
  DEVICE_NEEDS_RESET completes with the correct response;
- resources are bounded: open fds, vsock control packets, connections.

`Rig.recover()` then resets the device through its Status register, sets it
up again and checks a well-formed request completes: whatever the guest did
only cost it its own service until it reset the device.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import struct
import tempfile
from dataclasses import dataclass

from hypothesis import strategies as st

from kvmpy.devices.virtio import blk, net, rng, vsock
from kvmpy.devices.virtio.iothread import IoThread
from kvmpy.devices.virtio.mmio import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    DeviceStatus,
    MmioTransport,
    Register,
)
from kvmpy.devices.virtio.queue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from kvmpy.memory import GuestMemory

from virtio_driver import Allocator, Driver

# Guest-physical layout: two RAM regions with a hole between them.
LOW_END = 0x40000
HIGH_START, HIGH_END = 0x80000, 0x90000
RINGS = (0x1000, 0x10000)   # the driver's rings (the device writes used rings here)
POOL = (0x10000, 0x30000)   # request buffers and indirect tables (the device may write here)
# The device must never write these: no address the guest is given names them (the last page of each
# region is left out: descriptors at a region's end test straddling, and a short one there is valid RAM).
CANARIES = ((0, 0x1000), (0x30000, LOW_END - 0x1000), (HIGH_START, HIGH_END - 0x1000))
CANARY_BYTE = 0xC3
MIN_OPS = int(os.environ.get("KVMPY_FUZZ_MIN_OPS", "1"))  # shortest program
QUEUE_SIZE = 8              # small rings: full queues, wrap-around and loops come often
GOOD_SLOTS = 4              # descriptors [QUEUE_SIZE - GOOD_SLOTS, QUEUE_SIZE) are for checked requests
SECTORS = 64
RNG_BYTE = 0xA5
GUEST_CID = 3
FD_SLACK = 64               # fds the device may hold open beyond its baseline (connections, clients)

ALL_FEATURES = (1 << 64) - 1
IMAGE = b"".join(struct.pack("<HH", i, j) for i in range(SECTORS) for j in range(128))  # no two sectors alike
_DESC = struct.Struct("<QIHH")


# -- what the guest can do --------------------------------------------------------------

@dataclass(frozen=True)
class RegWrite:
    offset: int
    size: int
    value: int


@dataclass(frozen=True)
class RegRead:
    offset: int
    size: int


@dataclass(frozen=True)
class Setup:
    """A full, correct driver initialisation (3.1.1) with these features."""

    features: int


@dataclass(frozen=True)
class Desc:
    addr: int
    length: int
    flags: int
    next: int


@dataclass(frozen=True)
class Chain:
    """Raw descriptors into table slots [0, QUEUE_SIZE - GOOD_SLOTS), an optional indirect table in the
    pool, then `publish` avail entries with head `head` (notify if asked)."""

    queue: int
    descs: tuple[tuple[int, Desc], ...]
    indirect: tuple[Desc, ...]
    head: int
    publish: int
    notify: bool


@dataclass(frozen=True)
class Request:
    """A plausible request for the device (`bufs`: bytes the device reads, or an int: a writable buffer of
    that size), laid out in 1..n descriptors, maybe through an indirect table, then maybe corrupted."""

    queue: int
    bufs: tuple[bytes | int, ...]
    split: int
    indirect: bool
    corrupt: tuple[tuple[int, int, int], ...]  # (descriptor, field, value): field 0 addr, 1 len, 2 flags, 3 next
    notify: bool


@dataclass(frozen=True)
class Mutate:
    """Notify `queue`; after the device's `after`-th read of guest memory, the guest rewrites `slot`."""

    queue: int
    after: int
    slot: int
    desc: Desc


@dataclass(frozen=True)
class Notify:
    queue: int


@dataclass(frozen=True)
class Good:
    """A well-formed request whose response the rig checks (`seed` picks its details)."""

    seed: int


@dataclass(frozen=True)
class Host:
    """Host-side traffic: a frame from the TAP, a vsock client, data on a connection (`seed` picks)."""

    kind: int
    seed: int


u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)

# Addresses a hostile guest would try: the pool, its own rings, a canary page is never named (a device
# may write where the guest points it), holes, a region's end, the top of the address space.
addresses = st.one_of(
    st.integers(POOL[0], POOL[1] - 0x10000),  # + any in-RAM length stays inside the pool
    st.integers(RINGS[0], RINGS[1] - 1),
    st.sampled_from([LOW_END - 8, LOW_END, 0x50000, HIGH_END - 4, HIGH_END, 1 << 32, 2**64 - 16, 2**64 - 1]),
)
lengths = st.one_of(st.integers(0, 64), st.integers(0, 0x4000), st.sampled_from([2**31, 2**32 - 1, 0x10000]))
flags = st.integers(0, 7)
descs = st.builds(Desc, addresses, lengths, flags, st.integers(0, 0xFFFF) | st.integers(0, QUEUE_SIZE))

queue_register = st.sampled_from([Register.QUEUE_DESC_LOW, Register.QUEUE_DESC_HIGH, Register.QUEUE_DRIVER_LOW,
                                  Register.QUEUE_DRIVER_HIGH, Register.QUEUE_DEVICE_LOW,
                                  Register.QUEUE_DEVICE_HIGH])


def _value_for(size: int) -> st.SearchStrategy[int]:
    return st.integers(0, (1 << (8 * size)) - 1)


reg_writes = st.one_of(
    # any offset and size
    st.integers(1, 8).flatmap(lambda size: st.builds(RegWrite, st.integers(0, 0x1FF), st.just(size),
                                                     _value_for(size))),
    # the interesting registers with 32-bit values of the right kind
    st.builds(RegWrite, st.sampled_from([Register.STATUS]), st.just(4), st.integers(0, 0xFF)),
    st.builds(RegWrite, st.sampled_from([Register.QUEUE_SEL, Register.QUEUE_NUM, Register.QUEUE_READY,
                                         Register.QUEUE_NOTIFY, Register.DRIVER_FEATURES_SEL,
                                         Register.DEVICE_FEATURES_SEL, Register.INTERRUPT_ACK]),
              st.just(4), st.integers(0, 3) | st.sampled_from([8, 16, 3, 0xFFFF, 0xFFFF_FFFF])),
    st.builds(RegWrite, st.just(Register.DRIVER_FEATURES), st.just(4), u32),
    st.builds(RegWrite, queue_register, st.just(4),
              addresses.map(lambda a: a & 0xFFFF_FFFF) | st.integers(0, 3)),
)

OPS = st.one_of(
    reg_writes,
    st.builds(RegRead, st.integers(0, 0x1FF), st.sampled_from([1, 2, 4, 8])),
    st.builds(Setup, st.sampled_from([VIRTIO_F_VERSION_1, VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC,
                                      VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC | VIRTIO_F_EVENT_IDX,
                                      ALL_FEATURES, 0])),
    st.builds(Chain, st.integers(0, 3),
              st.lists(st.tuples(st.integers(0, QUEUE_SIZE - GOOD_SLOTS - 1), descs), max_size=6).map(tuple),
              st.lists(descs, max_size=4).map(tuple),
              st.integers(0, QUEUE_SIZE - 1) | st.integers(0, 0xFFFF),
              st.sampled_from([1, 1, 1, 2, 0, QUEUE_SIZE + 1, 0x8000]), st.booleans()),
    st.builds(Mutate, st.integers(0, 3), st.integers(0, 12), st.integers(0, QUEUE_SIZE - 1), descs),
    st.builds(Notify, st.integers(0, 3) | st.just(0xFFFF)),
    st.builds(Good, st.integers(0, 2**16)),
    st.builds(Host, st.integers(0, 3), st.integers(0, 2**16)),
)


def _payloads(kind: str) -> st.SearchStrategy[tuple[int, tuple[bytes | int, ...]]]:
    """(queue, buffers) of requests that look like the device's own protocol, with fields gone wrong."""
    small = st.integers(0, 600) | st.sampled_from([0, 1, 511, 512, 1024, 4096, 0x10000])
    if kind == "blk":
        header = st.builds(lambda t, r, sector: struct.pack("<IIQ", t, r, sector),
                           st.sampled_from([0, 1, 4, 8, 2, 0xFFFF_FFFF]), u32 | st.just(0),
                           st.integers(0, SECTORS + 2) | st.sampled_from([2**64 - 1, 2**55]))
        data = st.integers(0, 4) .map(lambda k: bytes([k]) * (512 * k)) | st.binary(max_size=700)
        return st.tuples(st.just(0), st.tuples(header, data, small, st.integers(0, 2)).map(
            lambda t: tuple(b for b in t if b != b"" and b != 0))) | \
            st.tuples(st.just(0), st.lists(st.binary(max_size=40) | small, max_size=4).map(tuple))
    if kind == "rng":
        return st.tuples(st.just(0), st.lists(small | st.binary(max_size=16), min_size=1, max_size=4).map(tuple))
    if kind == "net":
        frame = st.builds(lambda n, b: bytes(net.NET_HDR_SIZE) + bytes([b]) * n,
                          st.integers(0, 1600), st.integers(0, 255))
        return st.one_of(
            st.tuples(st.just(net.TX), st.lists(frame | st.binary(max_size=30), min_size=1, max_size=3).map(tuple)),
            st.tuples(st.just(net.RX), st.lists(small | st.just(net.NET_HDR_SIZE + 1514), min_size=1,
                                                max_size=3).map(tuple)))
    if kind == "vsock":
        ports = st.sampled_from([1000, 1001, 1234, 9000, 1 << 30, 0xFFFF_FFFF])
        hdr = st.builds(
            lambda src_cid, dst_cid, sp, dp, type_, op, flags, buf_alloc, fwd, payload, lie:
                vsock.HDR.pack(src_cid, dst_cid, sp, dp, len(payload) + lie, type_, op, flags, buf_alloc, fwd)
                + payload,
            st.sampled_from([GUEST_CID] * 6 + [2, 0, 2**64 - 1]), st.sampled_from([vsock.HOST_CID] * 6 + [3, 7]),
            st.sampled_from([1000, 1001, 1002, 0]), ports, st.sampled_from([1, 1, 1, 2, 0]), st.integers(0, 8),
            st.integers(0, 3), st.sampled_from([0, 4096, 65536, 2**32 - 1]), u32 | st.just(0),
            st.binary(max_size=300), st.sampled_from([0, 0, 0, 1, 2**20]))
        return st.one_of(
            st.tuples(st.just(vsock.TX), st.lists(hdr | st.binary(max_size=50), min_size=1, max_size=2).map(tuple)),
            st.tuples(st.just(vsock.RX), st.lists(st.sampled_from([vsock.HDR_SIZE + 256, 20, 4096, 0]) | small,
                                                  min_size=1, max_size=2).map(tuple)),
            st.tuples(st.just(vsock.EVENT), st.lists(small, min_size=1, max_size=2).map(tuple)))
    raise ValueError(kind)


def requests(kind: str) -> st.SearchStrategy[Request]:
    # Corrupted fields take the hostile values of their kind (an address never names a canary page).
    field_value = st.one_of(st.tuples(st.just(0), addresses), st.tuples(st.just(1), lengths),
                            st.tuples(st.just(2), st.integers(0, 0xFFFF)),
                            st.tuples(st.just(3), st.integers(0, 0xFFFF)))
    corrupt = st.lists(st.tuples(st.integers(0, 5), field_value).map(lambda t: (t[0], *t[1])),
                       max_size=2).map(tuple)
    return _payloads(kind).flatmap(lambda qb: st.builds(
        Request, st.just(qb[0]), st.just(_fit(qb[1])), st.integers(1, 3), st.booleans(),
        st.sampled_from([()] * 3).flatmap(lambda e: corrupt | st.just(e)), st.booleans() | st.just(True)))


def _fit(bufs: tuple) -> tuple:
    """Vsock headers carry a length lie of `2**20` as negative numbers in the generator: keep them packable."""
    return tuple(b for b in bufs if b != b"")


def programs(kind: str) -> st.SearchStrategy:
    """(start with a correct set-up, operations): mostly plausible requests, the rest hostile."""
    req = requests(kind)
    good = st.builds(Good, st.integers(0, 2**16))
    ops = st.one_of(req, req, req, req, OPS, good)
    return st.tuples(st.sampled_from([True, True, True, False]), st.lists(ops, min_size=MIN_OPS, max_size=40))


PROGRAMS = st.tuples(st.booleans(), st.lists(OPS, max_size=25))


# -- the rig ------------------------------------------------------------------------------

class Failure(AssertionError):
    pass


class _BugLog(logging.Handler):
    """Records log.exception() from kvmpy's virtio code: the transport's "unexpected error" path."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)


class Rig:
    def __init__(self, kind: str, tmp: str) -> None:
        self.kind = kind
        self.tmp = tmp
        self.mem = GuestMemory(0)
        self.mem.add_region(0, LOW_END)
        self.mem.add_region(HIGH_START, HIGH_END - HIGH_START)
        for a, b in CANARIES:
            self.mem.fill(a, b - a, CANARY_BYTE)
        self.io = IoThread()
        self.host: socket.socket | None = None
        self._dev_end: socket.socket | None = None
        # The image lives in memory where there is /dev/shm: a write-through device syncs every write.
        self._image_dir = tempfile.mkdtemp(prefix="kvmpy-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else tmp)
        self.image = os.path.join(self._image_dir, "disk.img")
        self.clients: list[socket.socket] = []
        self.listener: socket.socket | None = None
        self.accepted: list[socket.socket] = []
        self.fds_before = _fd_count()
        self.dev = self._make_device()
        self.t = MmioTransport(self.dev, self.mem)
        self.dev.start_io(self.io)
        self.bug_log = _BugLog()
        logging.getLogger("kvmpy").addHandler(self.bug_log)
        self.baseline_fds = _fd_count()
        self.drv: Driver | None = None
        self.clean = False     # the rig's own view of the rings is right (set-up, nothing hostile since)
        self.shadow_avail = [0] * len(self.t.queues)
        self.rx_packets: list[tuple] = []
        self.good_done = self.good_reset = 0
        self.aliased = False   # some descriptor may point into the rings: ring contents are the device's
        self.requests_returned = self.requests_reset = 0
        self._next_slot = 0

    def _make_device(self):
        if self.kind == "blk":
            with open(self.image, "wb") as f:
                f.write(IMAGE)
            return blk.BlockDevice(self.image)
        if self.kind == "rng":
            return rng.EntropyDevice(source=lambda n: bytes([RNG_BYTE]) * n)
        if self.kind == "net":
            self.host, self._dev_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self._dev_end.setblocking(False)
            self.host.setblocking(False)
            return net.NetDevice(self._dev_end.fileno(), "52:54:00:12:34:56")
        if self.kind == "vsock":
            uds = os.path.join(self.tmp, "v.sock")
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(f"{uds}_1234")  # a host service the guest may connect to
            self.listener.listen(64)
            self.listener.setblocking(False)
            return vsock.VsockDevice(uds, GUEST_CID)
        raise ValueError(self.kind)

    def close(self) -> None:
        logging.getLogger("kvmpy").removeHandler(self.bug_log)
        with self.t.lock:
            self.dev.close()
        self.io.close()
        for s in self.clients + self.accepted + [self.host, self._dev_end, self.listener]:
            if s is not None:
                s.close()
        if self.listener is not None:
            os.unlink(f"{self.dev.uds_path}_1234")
        self.mem.close()
        shutil.rmtree(self._image_dir, ignore_errors=True)

    # -- guest memory helpers -----------------------------------------------------------

    def _queue_addr(self, index: int) -> tuple[int, int, int, int] | None:
        if index >= len(self.t.queues):
            return None
        q = self.t.queues[index]
        return q.size, q.desc_table, q.avail_ring, q.used_ring

    def _write(self, gpa: int, data: bytes) -> bool:
        """A guest store: only where the guest has RAM (a hostile address is simply not written)."""
        if not self.mem.is_ram(gpa, len(data)) or not _inside(gpa, len(data), RINGS, POOL):
            return False
        self.mem.write(gpa, data)
        return True

    # -- running an operation --------------------------------------------------------------

    def apply(self, op) -> None:
        canaries = [self.mem.read(a, b - a) for a, b in CANARIES]
        match op:
            case RegWrite(offset, size, value):
                self.clean = False
                self.t.write(offset, size, value)
            case RegRead(offset, size):
                self.t.read(offset, size)
            case Setup(features):
                self.setup(features)
            case Chain():
                self.clean = False
                self._chain(op)
            case Mutate():
                self.clean = False
                self._mutate(op)
            case Request():
                self.clean = False
                self._request(op)
            case Notify(queue):
                self.t.write(Register.QUEUE_NOTIFY, 4, queue)
            case Good(seed):
                self.good(seed)
            case Host(kind, seed):
                self._host(kind, seed)
        self.io.poll_once(0)
        self.check(canaries)

    def check(self, canaries: list[bytes]) -> None:
        if self.bug_log.records:
            r = self.bug_log.records[0]
            raise Failure(f"device bug path taken: {r.getMessage()}\n"
                          + logging.Formatter().formatException(r.exc_info))
        for (a, b), before in zip(CANARIES, canaries):
            if self.mem.read(a, b - a) != before:
                raise Failure(f"the device wrote guest RAM [{a:#x}, {b:#x}) that no descriptor or ring names")
        fds = _fd_count()
        if fds > self.baseline_fds + FD_SLACK:
            raise Failure(f"{fds - self.baseline_fds} fds more than at start")
        if self.kind == "vsock":
            if len(self.dev.control) > vsock.MAX_CONTROL_PACKETS:
                raise Failure(f"vsock control queue grew to {len(self.dev.control)} packets")
            if len(self.dev.conns) > vsock.MAX_CONNECTIONS:
                raise Failure(f"vsock has {len(self.dev.conns)} connections")
            if self.dev.pending_clients > vsock.MAX_PENDING_CLIENTS:
                raise Failure(f"vsock has {self.dev.pending_clients} half-open clients")

    def setup(self, features: int) -> None:
        drv = Driver(self.t, self.mem, Allocator(RINGS[0]))
        try:
            # ALL_FEATURES asks for bits the device does not offer: it must refuse FEATURES_OK.
            drv.setup(features if features == ALL_FEATURES else features & drv.device_features(),
                      queue_size=QUEUE_SIZE)
        except RuntimeError:
            self.clean = False  # features refused (no VERSION_1): the device is not active
            return
        self.drv = drv
        self.aliased = False
        self.clean = not self.t.needs_reset and self.t.active
        self.shadow_avail = [0] * len(self.t.queues)
        self.rx_packets = []
        if self.kind == "vsock" and self.clean:
            self._post_rx(4)

    def _chain(self, op: Chain) -> None:
        qa = self._queue_addr(op.queue)
        if qa is None:
            return
        size, desc, avail, _ = qa
        table_slots = max(size, 1)
        for slot, d in op.descs:
            if slot < table_slots:
                self._write(desc + 16 * slot, _DESC.pack(d.addr, d.length, d.flags, d.next))
        if op.indirect:
            self._write(POOL[0], b"".join(_DESC.pack(d.addr, d.length, d.flags, d.next) for d in op.indirect))
        idx = self.shadow_avail[op.queue] if op.queue < len(self.shadow_avail) else 0
        for i in range(min(op.publish, QUEUE_SIZE)):
            self._write(avail + 4 + 2 * ((idx + i) % table_slots), struct.pack("<H", op.head & 0xFFFF))
        idx = (idx + op.publish) & 0xFFFF
        if op.queue < len(self.shadow_avail):
            self.shadow_avail[op.queue] = idx
        self._write(avail + 2, struct.pack("<H", idx))
        self.aliased |= any(_in_rings(d) for _, d in op.descs) or any(_in_rings(d) for d in op.indirect)
        if op.notify:
            self.t.write(Register.QUEUE_NOTIFY, 4, op.queue)
            self.check_returned(op.queue)

    def _rings_ours(self, queue: int) -> bool:
        dq, q = self.drv.queues[queue], self.t.queues[queue]
        return q.ready and (q.desc_table, q.avail_ring, q.used_ring, q.size) == (dq.desc, dq.avail, dq.used, dq.size)

    def check_returned(self, queue: int) -> None:
        """After a notify of a request queue whose rings are the driver's: every chain the guest made
        available came back in the used ring (served, or failed as malformed), or the device needs a reset."""
        if (self.drv is None or queue != REQUEST_QUEUE[self.kind] or self.aliased
                or not self.t.active or queue >= len(self.drv.queues)):
            return
        if not self._rings_ours(queue):
            return  # the guest moved the rings with register writes: nothing to compare against
        dq = self.drv.queues[queue]
        if self.t.needs_reset:
            self.requests_reset += 1
            return
        avail, used = self.mem.read_u16(dq.avail + 2), self.mem.read_u16(dq.used + 2)
        if avail != used:
            raise Failure(f"{self.kind}: the guest made {avail} chains available, {used} came back, and the "
                          f"device does not need a reset ({self.t.last_error})")
        self.requests_returned += 1

    def _request(self, op: Request) -> None:
        """Lay out `op` in the hostile slots: buffers from the pool, links as a driver would, then corruptions."""
        qa = self._queue_addr(op.queue)
        if qa is None:
            return
        size, desc, avail, _ = qa
        raw: list[list[int]] = []
        addr = POOL[0] + 0x200
        for b in op.bufs:
            if isinstance(b, int):
                raw.append([addr, b, VIRTQ_DESC_F_WRITE, 0])
                self._write(addr, bytes([0xEE]) * min(b, POOL[1] - addr)) if addr + b <= POOL[1] else None
                addr += (b + 15) & ~15
            else:
                parts = [b[i * len(b) // op.split:(i + 1) * len(b) // op.split] for i in range(op.split)] \
                    if len(b) >= op.split else [b]
                for part in parts:
                    self._write(addr, part)
                    raw.append([addr, len(part), 0, 0])
                    addr += (len(part) + 15) & ~15
            if addr >= POOL[1] - 0x10000:
                break
        slots = QUEUE_SIZE - GOOD_SLOTS
        if not raw or size == 0:
            return
        table_base = self._next_slot
        if op.indirect:
            for k, d in enumerate(raw):
                d[2] |= VIRTQ_DESC_F_NEXT if k < len(raw) - 1 else 0
                d[3] = k + 1 if k < len(raw) - 1 else 0
            for i, field, value in op.corrupt:
                _corrupt(raw, i, field, value)
            table = POOL[0] + 0x100 - 16 * min(len(raw), 16)
            self._write(table, b"".join(_DESC.pack(a, n & 0xFFFF_FFFF, f & 0xFFFF, x & 0xFFFF)
                                        for a, n, f, x in raw[:16]))
            entries = [[table, 16 * min(len(raw), 16), VIRTQ_DESC_F_INDIRECT, 0]]
        else:
            entries = raw
        ids = [(table_base + k) % slots for k in range(len(entries))]
        for k, d in enumerate(entries):
            if k < len(entries) - 1:
                d[2] |= VIRTQ_DESC_F_NEXT
                d[3] = ids[k + 1]
        if not op.indirect:
            for i, field, value in op.corrupt:
                _corrupt(entries, i, field, value)
        self._next_slot = (table_base + len(entries)) % slots
        for slot, (a, n, f, x) in zip(ids, entries):
            if slot < size:
                self._write(desc + 16 * slot, _DESC.pack(a & (2**64 - 1), n & 0xFFFF_FFFF, f & 0xFFFF, x & 0xFFFF))
        self.aliased |= any(a < RINGS[1] and a + max(n & 0xFFFF_FFFF, 1) > RINGS[0] for a, n, _, _ in entries + raw)
        idx = self.shadow_avail[op.queue]
        self._write(avail + 4 + 2 * (idx % size), struct.pack("<H", ids[0]))
        self.shadow_avail[op.queue] = (idx + 1) & 0xFFFF
        self._write(avail + 2, struct.pack("<H", self.shadow_avail[op.queue]))
        if op.notify:
            self.t.write(Register.QUEUE_NOTIFY, 4, op.queue)
            self.check_returned(op.queue)

    def _mutate(self, op: Mutate) -> None:
        """The guest changes descriptor `slot` while the device is in the middle of reading the rings."""
        qa = self._queue_addr(op.queue)
        if qa is None:
            return
        _, desc, _, _ = qa
        original = self.mem.view
        count = 0

        def view(gpa: int, size: int) -> memoryview:
            nonlocal count
            count += 1
            if count == op.after:
                self._write(desc + 16 * op.slot, _DESC.pack(op.desc.addr, op.desc.length, op.desc.flags,
                                                            op.desc.next))
            return original(gpa, size)

        self.aliased |= _in_rings(op.desc)
        self.mem.view = view  # type: ignore[method-assign]
        try:
            self.t.write(Register.QUEUE_NOTIFY, 4, op.queue)
        finally:
            del self.mem.view
        self.check_returned(op.queue)

    # -- host traffic ------------------------------------------------------------------------

    def _host(self, kind: int, seed: int) -> None:
        if self.kind == "net":
            assert self.host is not None
            frame = bytes(net.NET_HDR_SIZE) + bytes([seed & 0xFF]) * (14 + seed % 1500)
            try:
                self.host.send(frame)
            except BlockingIOError:
                pass  # the socket is full: the guest is not taking frames (back-pressure)
        elif self.kind == "vsock":
            uds = self.dev.uds_path
            if kind == 0 and len(self.clients) < 8:   # a host client asks for a guest port
                c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                c.setblocking(False)
                try:
                    c.connect(uds)
                    c.send(f"CONNECT {seed % 3 + 1000}\n".encode() if seed % 4 else b"garbage" * 20)
                except OSError:
                    c.close()
                    return
                self.clients.append(c)
            elif kind == 1 and self.clients:          # a host client sends data or hangs up
                c = self.clients[seed % len(self.clients)]
                try:
                    if seed % 3:
                        c.send(bytes(seed % 200 + 1))
                    else:
                        c.close()
                        self.clients.remove(c)
                except OSError:
                    pass
            elif kind == 2 and self.listener is not None:  # the host service accepts what the guest opened
                try:
                    s, _ = self.listener.accept()
                    self.accepted.append(s)
                    s.send(b"hello from the host")
                except OSError:
                    pass
            elif self.accepted:
                self.accepted.pop(seed % len(self.accepted)).close()
        elif self.kind == "rng" or self.kind == "blk":
            self.t.write(Register.QUEUE_NOTIFY, 4, 0)  # a spurious notify from the host side
        for _ in range(3):
            if not self.io.poll_once(0):
                break

    # -- checked, well-formed requests ---------------------------------------------------------

    def good(self, seed: int) -> bool:
        """Post a well-formed request and check its response; False if the device was not in a state to
        take it (not clean), True if it was checked (completed correctly or NEEDS_RESET)."""
        if self.drv is None or not self.t.active or self.t.needs_reset:
            return False
        if not self.clean:
            # Hostile chains came before: only on a request queue whose rings are still the driver's, after
            # serving what is pending (so no hostile buffer is written while this request is in the ring).
            queue = REQUEST_QUEUE[self.kind]
            if self.kind == "vsock" or self.aliased or not self._rings_ours(queue):
                return False
            self.t.write(Register.QUEUE_NOTIFY, 4, queue)
            self.check_returned(queue)
            if self.t.needs_reset:
                return False
        match self.kind:
            case "blk":
                ok = self._good_blk(seed)
            case "rng":
                ok = self._good_rng(seed)
            case "net":
                ok = self._good_net(seed)
            case "vsock":
                ok = self._good_vsock(seed)
        if ok:
            self.good_done += 1
        elif self.t.needs_reset:
            self.good_reset += 1
        else:
            raise Failure(f"{self.kind}: a well-formed request neither completed correctly nor reset the device")
        return True

    def _post(self, queue: int, out: list[bytes], in_lens: list[int]) -> tuple[int, list[int], list[int]]:
        """A chain in the good slots: returns (head, out addresses, in addresses)."""
        q = self.drv.queues[queue]
        slots = list(range(QUEUE_SIZE - GOOD_SLOTS, QUEUE_SIZE))
        bufs = []
        addr = POOL[0] + 0x8000 + 0x2000 * queue
        out_addrs, in_addrs = [], []
        for data in out:
            self.mem.write(addr, data)
            bufs.append((addr, len(data), 0))
            out_addrs.append(addr)
            addr += (len(data) + 15) & ~15
        for n in in_lens:
            self.mem.fill(addr, n, 0xEE)
            bufs.append((addr, n, VIRTQ_DESC_F_WRITE))
            in_addrs.append(addr)
            addr += (n + 15) & ~15
        assert len(bufs) <= GOOD_SLOTS and addr <= POOL[1]
        for k, (a, n, f) in enumerate(bufs):
            last = k == len(bufs) - 1
            q.write_desc(q.desc, slots[k], a, n, f | (0 if last else VIRTQ_DESC_F_NEXT), 0 if last else slots[k + 1])
        idx = self.shadow_avail[queue]
        self.mem.write_u16(q.avail + 4 + 2 * (idx % q.size), slots[0])
        self.shadow_avail[queue] = (idx + 1) & 0xFFFF
        self.mem.write_u16(q.avail + 2, self.shadow_avail[queue])
        return slots[0], out_addrs, in_addrs

    def _used_since(self, queue: int, before: int) -> list[tuple[int, int]]:
        q = self.drv.queues[queue]
        now = self.mem.read_u16(q.used + 2)
        out = []
        i = before
        while i != now:
            e = q.used + 4 + 8 * (i % q.size)
            out.append(struct.unpack("<II", self.mem.read(e, 8)))
            i = (i + 1) & 0xFFFF
        return out

    def _used_idx(self, queue: int) -> int:
        return self.mem.read_u16(self.drv.queues[queue].used + 2)

    def _good_blk(self, seed: int) -> bool:
        sector = seed % (SECTORS - 2)
        before = self._used_idx(0)
        if seed % 2:
            data = bytes([seed & 0xFF]) * 512
            head, outs, ins = self._post(0, [struct.pack("<IIQ", blk.RequestType.OUT, 0, sector), data], [1])
            self.t.write(Register.QUEUE_NOTIFY, 4, 0)
            if (head, 1) not in self._used_since(0, before):
                return False
            with open(self.image, "rb") as f:
                f.seek(sector * 512)
                return self.mem.read_u8(ins[0]) == blk.BlkStatus.OK and f.read(512) == data
        head, outs, ins = self._post(0, [struct.pack("<IIQ", blk.RequestType.IN, 0, sector)], [1024, 1])
        self.t.write(Register.QUEUE_NOTIFY, 4, 0)
        if (head, 1025) not in self._used_since(0, before):
            return False
        with open(self.image, "rb") as f:
            f.seek(sector * 512)
            want = f.read(1024)
        return self.mem.read_u8(ins[1]) == blk.BlkStatus.OK and self.mem.read(ins[0], 1024) == want

    def _good_rng(self, seed: int) -> bool:
        n = seed % 3000 + 1
        before = self._used_idx(0)
        head, _, ins = self._post(0, [], [n])
        self.t.write(Register.QUEUE_NOTIFY, 4, 0)
        return (head, n) in self._used_since(0, before) and self.mem.read(ins[0], n) == bytes([RNG_BYTE]) * n

    def _good_net(self, seed: int) -> bool:
        assert self.host is not None
        while True:  # drop what earlier (hostile) transmits sent
            try:
                self.host.recv(1 << 17)
            except BlockingIOError:
                break
        frame = bytes(net.NET_HDR_SIZE) + bytes([seed & 0xFF]) * (60 + seed % 1000)
        before = self._used_idx(1)
        head, _, _ = self._post(1, [frame[:20], frame[20:]], [])
        self.t.write(Register.QUEUE_NOTIFY, 4, 1)
        if (head, 0) not in self._used_since(1, before):
            return False
        try:
            return self.host.recv(1 << 17) == frame
        except BlockingIOError:
            return False

    def _post_rx(self, n: int) -> None:
        q = self.drv.queues[0]
        for k in range(n):
            slot = QUEUE_SIZE - GOOD_SLOTS + k
            addr = POOL[0] + 0x1000 * (k + 1)
            q.write_desc(q.desc, slot, addr, vsock.HDR_SIZE + 256, VIRTQ_DESC_F_WRITE, 0)
            idx = self.shadow_avail[0]
            self.mem.write_u16(q.avail + 4 + 2 * (idx % q.size), slot)
            self.shadow_avail[0] = (idx + 1) & 0xFFFF
        self.mem.write_u16(q.avail + 2, self.shadow_avail[0])
        self.t.write(Register.QUEUE_NOTIFY, 4, 0)

    def _good_vsock(self, seed: int) -> bool:
        """A REQUEST to a host port nobody listens on: the answer is an RST for exactly that pair."""
        guest_port = 50000 + seed % 1000
        host_port = 9000 + seed % 7  # no listener there
        rx_before = self._used_idx(0)
        hdr = vsock.HDR.pack(GUEST_CID, vsock.HOST_CID, guest_port, host_port, 0, vsock.TYPE_STREAM,
                             vsock.Op.REQUEST, 0, 65536, 0)
        tx_before = self._used_idx(1)
        head, _, _ = self._post(1, [hdr], [])
        self.t.write(Register.QUEUE_NOTIFY, 4, 1)
        if (head, 0) not in self._used_since(1, tx_before):
            return False
        if self._used_idx(0) == rx_before:
            self._post_rx(GOOD_SLOTS)  # no receive buffer was left: post some, the RST must come
        for _ in range(2 * vsock.MAX_CONTROL_PACKETS // GOOD_SLOTS + 2):
            for h, length in self._used_since(0, rx_before):
                if QUEUE_SIZE - GOOD_SLOTS <= h < QUEUE_SIZE and length >= vsock.HDR_SIZE:
                    addr = POOL[0] + 0x1000 * (h - (QUEUE_SIZE - GOOD_SLOTS) + 1)
                    f = vsock.HDR.unpack(self.mem.read(addr, vsock.HDR_SIZE))
                    if f[6] == vsock.Op.RST and (f[2], f[3]) == (host_port, guest_port):
                        return True
            rx_before = self._used_idx(0)
            self._post_rx(GOOD_SLOTS)
        return False

    # -- after the hostile program ----------------------------------------------------------------

    def recover(self) -> None:
        """Reset through Status, set up again: the device must serve a well-formed request."""
        self.t.write(Register.STATUS, 4, 0)
        if self.t.read(Register.STATUS, 4) != 0:
            raise Failure("Status does not read 0 after a reset")
        for c in self.clients:
            c.close()
        self.clients.clear()
        self.io.poll_once(0)
        if self.kind == "vsock" and (self.dev.conns or self.dev.control or self.dev.pending_clients):
            raise Failure("vsock kept connections or packets across a device reset")
        self.setup(VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC | VIRTIO_F_EVENT_IDX)
        if not self.clean:
            raise Failure(f"set-up after a reset failed: {self.t.last_error}")
        self.check([self.mem.read(a, b - a) for a, b in CANARIES])
        for seed in (12344, 12345):  # both kinds of request (blk: a read and a write)
            before = (self.good_done, self.good_reset)
            self.good(seed)
            if (self.good_done, self.good_reset) != (before[0] + 1, before[1]):
                raise Failure(f"{self.kind}: a well-formed request after a reset did not complete: "
                              f"{self.t.last_error}")
        if self.t.status & DeviceStatus.DEVICE_NEEDS_RESET:
            raise Failure("NEEDS_RESET after a clean request")


def _corrupt(descs: list[list[int]], i: int, field: int, value: int) -> None:
    if descs:
        d = descs[i % len(descs)]
        d[field] = value & (0xFFFF if field >= 2 else (2**64 - 1 if field == 0 else 0xFFFF_FFFF))


def _in_rings(d: Desc) -> bool:
    return d.addr < RINGS[1] and d.addr + max(d.length, 1) > RINGS[0]


def _inside(gpa: int, size: int, *ranges: tuple[int, int]) -> bool:
    return any(a <= gpa and gpa + size <= b for a, b in ranges)


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


KINDS = ("blk", "net", "rng", "vsock")
REQUEST_QUEUE = {"blk": 0, "rng": 0, "net": net.TX, "vsock": vsock.TX}  # queues served at once on notify
