"""The vhost-user front end: kvmpy's side of QEMU's "Vhost-user Protocol" on a Unix socket.

A vhost-user back end (virtiofsd, say) is another process that serves a
device's virtqueues straight from guest memory. The front end tells it
where that memory is and where the rings are, over a Unix stream socket:
each message is a 12-byte header (`request`, `flags`, `size`, native
endianness, which is little on x86) and `size` bytes of payload; file
descriptors (the memfds of guest RAM, the kick/call/err eventfds) travel as
SCM_RIGHTS ancillary data with the message they belong to.

`VhostUserFrontend` has one method per message, named after it
(VHOST_USER_SET_MEM_TABLE -> `set_mem_table`), as `VhostVsock` has one per
ioctl. The encoders (`encode_*`) are pure functions of the spec's layouts,
unit-tested against them. Every failure raises `VhostUserError` naming the
message and the socket: a back end that closed the socket, sent garbage or
did not answer within `timeout` seconds is an error, never a hang.

Replies: GET_* messages always have one. With VHOST_USER_PROTOCOL_F_REPLY_ACK
negotiated, the front end sets NEED_REPLY on every other message and the
back end answers with a u64 (0: success), so a refused request is seen at
the message that caused it instead of as a silent misbehaviour later.
"""

from __future__ import annotations

import array
import enum
import errno
import os
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Iterable, Sequence

from ...errors import KvmError

HEADER = struct.Struct("<III")  # request, flags, size
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")  # index, num
VRING_ADDR = struct.Struct("<IIQQQQ")  # index, flags, descriptor, used, available, log
MEM_TABLE_HEADER = struct.Struct("<II")  # nregions, padding
MEMORY_REGION = struct.Struct("<QQQQ")  # guest_phys_addr, memory_size, userspace_addr, mmap_offset
MAX_PAYLOAD = 4096  # no message this front end receives is larger (replies are u64 or a vring state)

VHOST_USER_VERSION = 0x1
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
VHOST_USER_MEMORY_MAX_NREGIONS = 8  # without CONFIGURE_MEM_SLOTS, SET_MEM_TABLE carries at most 8 fds
VRING_INDEX_MASK = 0xFF
VRING_NOFD_MASK = 1 << 8  # in SET_VRING_KICK/CALL/ERR: no fd follows (polling / no notification)

# Virtio feature bit 30 in GET_FEATURES: the back end speaks the protocol-feature extension.
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30


class Request(enum.IntEnum):
    """Front-end message types (the spec's "Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18


class ProtocolFeature(enum.IntFlag):
    """VHOST_USER_PROTOCOL_F_* bits (GET/SET_PROTOCOL_FEATURES)."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16


# What this front end can use: it understands MQ (GET_QUEUE_NUM) and REPLY_ACK.
# BACKEND_REQ (a channel for the back end's own requests: DAX mappings, IOTLB)
# and CONFIG (device config served by the back end) are not implemented, so
# they are never acknowledged; the back end then does without them.
FRONTEND_PROTOCOL_FEATURES = ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK


class VhostUserError(KvmError):
    """The vhost-user back end refused a message, broke the protocol, or went away (the message says which)."""


@dataclass(frozen=True)
class VhostUserMemoryRegion:
    """One entry of VHOST_USER_SET_MEM_TABLE; `fd` is sent as SCM_RIGHTS with the message."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    fd: int


# -- encoders: pure functions of the spec's layouts ------------------------------------

def encode_header(request: int, size: int, *, need_reply: bool = False) -> bytes:
    """The 12-byte message header: request, flags (version 1, NEED_REPLY), payload size."""
    return HEADER.pack(request, VHOST_USER_VERSION | (FLAG_NEED_REPLY if need_reply else 0), size)


def encode_u64(value: int) -> bytes:
    return U64.pack(value)


def encode_vring_state(index: int, num: int) -> bytes:
    """A vring state description (SET_VRING_NUM, SET_VRING_BASE, GET_VRING_BASE, SET_VRING_ENABLE)."""
    return VRING_STATE.pack(index, num)


def encode_vring_addr(index: int, descriptor: int, used: int, available: int, *, flags: int = 0,
                      log: int = 0) -> bytes:
    """A vring address description (SET_VRING_ADDR): front-end virtual addresses of the three rings."""
    return VRING_ADDR.pack(index, flags, descriptor, used, available, log)


def encode_vring_file(index: int, has_fd: bool) -> bytes:
    """SET_VRING_KICK/CALL/ERR payload: the vring index in bits 0-7, bit 8 set when no fd follows."""
    if not 0 <= index <= VRING_INDEX_MASK:
        raise VhostUserError(f"vring index {index}: vhost-user file messages carry 8 bits of index")
    return U64.pack(index | (0 if has_fd else VRING_NOFD_MASK))


def encode_mem_table(regions: Sequence[VhostUserMemoryRegion]) -> bytes:
    """SET_MEM_TABLE payload: nregions, padding, then each region's four u64s (the fds go separately)."""
    if not 0 < len(regions) <= VHOST_USER_MEMORY_MAX_NREGIONS:
        raise VhostUserError(f"SET_MEM_TABLE: {len(regions)} memory regions; the message carries 1 to "
                             f"{VHOST_USER_MEMORY_MAX_NREGIONS}")
    return MEM_TABLE_HEADER.pack(len(regions), 0) + b"".join(
        MEMORY_REGION.pack(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset) for r in regions)


def decode_header(data: bytes) -> tuple[int, int, int]:
    """(request, flags, size) of a received header."""
    return HEADER.unpack(data)


# -- the front end ---------------------------------------------------------------------

class VhostUserFrontend:
    """A connected vhost-user socket: one device's control channel to its back end.

    One caller at a time sends messages (the lock serialises them: the
    device's activate on a vCPU thread and its close may otherwise meet).
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 10.0) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout
        self.protocol_features = 0  # what SET_PROTOCOL_FEATURES acknowledged
        self._lock = threading.Lock()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(self.path)
        except OSError as e:
            self.sock.close()
            raise VhostUserError(f"vhost-user socket {self.path}: cannot connect "
                                 f"({errno.errorcode.get(e.errno or 0, e)}: {e.strerror}); is the back end running?"
                                 ) from None

    @classmethod
    def from_socket(cls, sock: socket.socket, *, name: str = "<socket>", timeout: float = 10.0) -> VhostUserFrontend:
        """A front end on an already connected socket (e.g. one end of a socketpair)."""
        self = cls.__new__(cls)
        self.path, self.timeout, self.protocol_features = name, timeout, 0
        self._lock = threading.Lock()
        self.sock = sock
        sock.settimeout(timeout)
        return self

    @property
    def reply_ack(self) -> bool:
        return bool(self.protocol_features & ProtocolFeature.REPLY_ACK)

    # -- wire -------------------------------------------------------------------

    def _fail(self, request: Request, what: str) -> VhostUserError:
        return VhostUserError(f"vhost-user {request.name} on {self.path}: {what}")

    def _send(self, request: Request, payload: bytes = b"", fds: Iterable[int] = (), *,
              need_reply: bool = False) -> None:
        data = encode_header(request, len(payload), need_reply=need_reply) + payload
        fds = list(fds)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        try:
            sent = self.sock.sendmsg([data], anc)
            if sent < len(data):  # the fds went with the first part; the rest is plain bytes
                self.sock.sendall(data[sent:])
        except TimeoutError:
            raise self._fail(request, f"the back end did not take the message within {self.timeout:g} s") from None
        except OSError as e:
            raise self._fail(request, f"cannot send ({e.strerror}): the back end closed the socket "
                                      "(did the daemon exit?)") from None

    def _recv_exact(self, request: Request, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except TimeoutError:
                raise self._fail(request, f"no reply within {self.timeout:g} s") from None
            except OSError as e:
                raise self._fail(request, f"cannot read the reply ({e.strerror})") from None
            if not chunk:
                raise self._fail(request, "the back end closed the socket before replying (did the daemon exit?)")
            buf += chunk
        return bytes(buf)

    def _reply(self, request: Request, size: int) -> bytes:
        got_request, flags, got_size = decode_header(self._recv_exact(request, HEADER.size))
        if got_request != request or not flags & FLAG_REPLY or flags & 0x3 != VHOST_USER_VERSION:
            raise self._fail(request, f"unexpected reply header (request {got_request}, flags {flags:#x})")
        if got_size > MAX_PAYLOAD:
            raise self._fail(request, f"reply of {got_size} bytes is larger than any reply this message has")
        payload = self._recv_exact(request, got_size) if got_size else b""
        if got_size != size:
            raise self._fail(request, f"reply of {got_size} bytes, expected {size}")
        return payload

    def _call(self, request: Request, payload: bytes = b"", fds: Iterable[int] = ()) -> None:
        """A message without a reply of its own: with REPLY_ACK, wait for the back end's status."""
        with self._lock:
            ack = self.reply_ack
            self._send(request, payload, fds, need_reply=ack)
            if ack:
                (status,) = U64.unpack(self._reply(request, U64.size))
                if status != 0:
                    raise self._fail(request, f"the back end refused it (status {status:#x})")

    def _query(self, request: Request, payload: bytes, size: int) -> bytes:
        with self._lock:
            self._send(request, payload)
            return self._reply(request, size)

    # -- messages -----------------------------------------------------------------

    def get_features(self) -> int:
        """VHOST_USER_GET_FEATURES: the virtio features the back end's device has (+ PROTOCOL_FEATURES)."""
        return U64.unpack(self._query(Request.GET_FEATURES, b"", U64.size))[0]

    def set_features(self, features: int) -> None:
        """VHOST_USER_SET_FEATURES: the driver's acknowledged features (+ PROTOCOL_FEATURES if offered)."""
        self._call(Request.SET_FEATURES, encode_u64(features))

    def get_protocol_features(self) -> int:
        """VHOST_USER_GET_PROTOCOL_FEATURES (only when GET_FEATURES had VHOST_USER_F_PROTOCOL_FEATURES)."""
        return U64.unpack(self._query(Request.GET_PROTOCOL_FEATURES, b"", U64.size))[0]

    def set_protocol_features(self, features: int) -> None:
        """VHOST_USER_SET_PROTOCOL_FEATURES; REPLY_ACK, if in `features`, applies from the next message on."""
        self._call(Request.SET_PROTOCOL_FEATURES, encode_u64(features))
        self.protocol_features = features

    def get_queue_num(self) -> int:
        """VHOST_USER_GET_QUEUE_NUM: how many queues the back end supports (needs PROTOCOL_F_MQ)."""
        return U64.unpack(self._query(Request.GET_QUEUE_NUM, b"", U64.size))[0]

    def set_owner(self) -> None:
        """VHOST_USER_SET_OWNER: this front end owns the session (sent once, first after negotiation)."""
        self._call(Request.SET_OWNER)

    def set_mem_table(self, regions: Sequence[VhostUserMemoryRegion]) -> None:
        """VHOST_USER_SET_MEM_TABLE: guest RAM, one fd per region; the back end mmaps each MAP_SHARED."""
        self._call(Request.SET_MEM_TABLE, encode_mem_table(regions), [r.fd for r in regions])

    def set_vring_num(self, index: int, num: int) -> None:
        """VHOST_USER_SET_VRING_NUM: the queue size the driver chose."""
        self._call(Request.SET_VRING_NUM, encode_vring_state(index, num))

    def set_vring_base(self, index: int, base: int) -> None:
        """VHOST_USER_SET_VRING_BASE: the next available-ring index the back end reads."""
        self._call(Request.SET_VRING_BASE, encode_vring_state(index, base))

    def set_vring_addr(self, index: int, descriptor: int, used: int, available: int) -> None:
        """VHOST_USER_SET_VRING_ADDR: the rings' addresses in this process (no dirty logging)."""
        self._call(Request.SET_VRING_ADDR, encode_vring_addr(index, descriptor, used, available))

    def set_vring_kick(self, index: int, fd: int) -> None:
        """VHOST_USER_SET_VRING_KICK: the eventfd a guest notify signals; the ring starts with it."""
        self._call(Request.SET_VRING_KICK, encode_vring_file(index, True), [fd])

    def set_vring_call(self, index: int, fd: int) -> None:
        """VHOST_USER_SET_VRING_CALL: the eventfd the back end signals when the driver wants an interrupt."""
        self._call(Request.SET_VRING_CALL, encode_vring_file(index, True), [fd])

    def set_vring_err(self, index: int, fd: int) -> None:
        """VHOST_USER_SET_VRING_ERR: the eventfd the back end signals when the ring is broken."""
        self._call(Request.SET_VRING_ERR, encode_vring_file(index, True), [fd])

    def set_vring_enable(self, index: int, enable: bool) -> None:
        """VHOST_USER_SET_VRING_ENABLE: with PROTOCOL_FEATURES, rings start disabled until this says 1."""
        self._call(Request.SET_VRING_ENABLE, encode_vring_state(index, int(enable)))

    def get_vring_base(self, index: int) -> int:
        """VHOST_USER_GET_VRING_BASE: stop the ring; returns where the back end stopped in the available ring."""
        payload = self._query(Request.GET_VRING_BASE, encode_vring_state(index, 0), VRING_STATE.size)
        got_index, num = VRING_STATE.unpack(payload)
        if got_index != index:
            raise self._fail(Request.GET_VRING_BASE, f"reply is for vring {got_index}, asked for {index}")
        return num

    # -- lifetime -----------------------------------------------------------------

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        """Close the socket: a vhost-user back end treats that as the end of the session."""
        self.sock.close()

    def __enter__(self) -> VhostUserFrontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "FRONTEND_PROTOCOL_FEATURES", "ProtocolFeature", "Request", "VHOST_USER_F_PROTOCOL_FEATURES",
    "VHOST_USER_MEMORY_MAX_NREGIONS", "VhostUserError", "VhostUserFrontend", "VhostUserMemoryRegion",
    "encode_header", "encode_mem_table", "encode_u64", "encode_vring_addr", "encode_vring_file",
    "encode_vring_state",
]
