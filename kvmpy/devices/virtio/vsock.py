"""virtio-vsock (virtio 1.2 section 5.10): the kernel's vhost-vsock, or a userspace back end on AF_UNIX sockets.

`vsock_device(cid, backend=...)` makes one: "vhost" is `VhostVsockDevice`
(the host kernel serves the vrings; host programs use AF_VSOCK), "userspace"
is `VsockDevice` (below), "auto" takes vhost when /dev/vhost-vsock exists
and opens. Both share `VirtioVsock`: device ID, queues, features, the
configuration space (`guest_cid`).

The userspace back end does the vsock stream protocol itself, following
Firecracker's model of the host side:

- guest connects to host (CID 2) port P: kvmpy connects to the AF_UNIX
  socket `<uds_path>_<P>`; a listener there gets the guest's byte stream.
- host connects to the guest: a host program connects to `uds_path` and
  writes `CONNECT <port>\\n`; kvmpy sends the guest a REQUEST from a fresh
  host port and, once the guest answers RESPONSE, replies `OK <host port>\\n`
  and the socket carries the stream.

Packets (`struct virtio_vsock_hdr`, 44 bytes, then the payload) travel on
rxq (0, device to driver) and txq (1, driver to device); eventq (2) is only
used for transport resets, which a VM without migration never sends.
Operations: REQUEST, RESPONSE, RST, SHUTDOWN, RW, CREDIT_UPDATE and
CREDIT_REQUEST. Credit (5.10.6.3): each side announces `buf_alloc` (its
receive buffer) and `fwd_cnt` (bytes it has consumed); a sender may have at
most `peer_buf_alloc - (tx_cnt - peer_fwd_cnt)` bytes in flight. kvmpy
honours the guest's credit when it reads from a host socket, announces
its own in every packet, and resets a connection whose guest overruns it.

Host sockets are polled by the I/O thread one-shot: a readable socket is
disarmed, read while the guest has credit and receive buffers, and re-armed
only when it would block, so a slow guest is never busy-polled.

The vhost back end hands rxq and txq to the kernel at DRIVER_OK (see
`VhostVsockDevice`); the transport keeps feature negotiation and the
configuration space, and the event queue stays with kvmpy (unused).
"""

from __future__ import annotations

import collections
import enum
import errno
import itertools
import logging
import os
import select
import socket
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ...errors import KvmError, VhostUnavailableError
from .mmio import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    DeviceId,
    SnapshotRefused,
    VirtioDevice,
)
from .queue import QueueError
from .vhost import VHOST_VSOCK_PATH, BackendVrings, VhostVsock, memory_table

if TYPE_CHECKING:
    from .iothread import IoThread

log = logging.getLogger("kvmpy.virtio")

HOST_CID = 2
DEFAULT_GUEST_CID = 3
BACKENDS = ("auto", "vhost", "userspace")
VIRTIO_VSOCK_F_SEQPACKET = 1 << 1  # 5.10.3; only the vhost back end offers it

HDR = struct.Struct("<QQIIIHHIII")  # src_cid dst_cid src_port dst_port len type op flags buf_alloc fwd_cnt
HDR_SIZE = HDR.size  # 44
TYPE_STREAM = 1
SHUTDOWN_RCV = 1
SHUTDOWN_SEND = 2

RX, TX, EVENT = 0, 1, 2
VIRTIO_VSOCK_EVENT_TRANSPORT_RESET = 0  # struct virtio_vsock_event's only id (5.10.6.7)
EVENT_SIZE = 4  # struct virtio_vsock_event { le32 id; }
QUEUE_SIZE = 256
BUF_ALLOC = 256 << 10      # our receive buffer per connection, announced to the guest
MAX_PAYLOAD = 64 << 10     # bytes per RW packet we send
FIRST_HOST_PORT = 1 << 30  # host ports for host-initiated connections start here
CONNECT_LINE_MAX = 64
# Per-VM bounds (docs/reliability.md, "Resource limits"): what a guest that never posts receive
# buffers, or opens connections without end, can make the VMM hold.
MAX_CONTROL_PACKETS = 1024  # headers waiting for a receive buffer; past it they are dropped (44 KiB)
MAX_CONNECTIONS = 256       # host sockets per VM; a REQUEST past it is answered RST, a host client closed
MAX_PENDING_CLIENTS = 16    # host clients that have not sent their CONNECT line yet; more are closed
MAX_PACKET = HDR_SIZE + MAX_PAYLOAD  # a guest packet (txq chain) larger than this is dropped unread


class Op(enum.IntEnum):
    INVALID = 0
    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


class ConnState(enum.Enum):
    CONNECTING = "connecting"    # host-initiated: REQUEST sent, waiting for RESPONSE
    ESTABLISHED = "established"
    CLOSING = "closing"          # we sent SHUTDOWN, waiting for the guest's RST


@dataclass(eq=False)
class Connection:
    host_port: int
    guest_port: int
    sock: socket.socket
    state: ConnState
    host_initiated: bool = False
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    tx_cnt: int = 0              # payload bytes sent to the guest
    fwd_cnt: int = 0             # guest payload bytes written to the host socket
    announced_fwd_cnt: int = 0   # the fwd_cnt the guest last heard
    pending_out: bytearray = field(default_factory=bytearray)  # guest data the socket has not taken yet
    readable: bool = False       # the socket may have data and is disarmed
    armed: int = 0               # epoll events the socket is registered for
    shut_write: bool = False     # guest said it sends no more: shut the socket's write side once drained
    pending_in: bytes = b""      # host data read before the connection was established

    @property
    def key(self) -> tuple[int, int]:
        return self.host_port, self.guest_port

    @property
    def peer_credit(self) -> int:
        return max(self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & 0xFFFF_FFFF), 0)


def vhost_vsock_available(path: str | None = None) -> bool:
    """Whether the kernel's vhost-vsock back end exists on this host (at `path`, default /dev/vhost-vsock)."""
    return os.path.exists(path or VHOST_VSOCK_PATH)


def default_uds_path() -> str:
    """Where the userspace back end listens when nobody says: /tmp/kvmpy-<pid>-vsock.sock."""
    return f"/tmp/kvmpy-{os.getpid()}-vsock.sock"


class VirtioVsock(VirtioDevice):
    """What both back ends share: the device type, three queues, the guest CID and configuration space."""

    device_id = DeviceId.VSOCK
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE)
    features = VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC | VIRTIO_F_EVENT_IDX
    backend = ""

    def __init__(self, guest_cid: int = DEFAULT_GUEST_CID) -> None:
        super().__init__()
        if guest_cid <= HOST_CID or guest_cid >= 0xFFFF_FFFF:
            raise ValueError(f"vsock guest CID {guest_cid}: must be above 2 and below 2^32 - 1")
        self.guest_cid = guest_cid
        self.iothread: IoThread | None = None

    def config_space(self) -> bytes:
        return struct.pack("<Q", self.guest_cid)  # struct virtio_vsock_config (5.10.4)


class VsockDevice(VirtioVsock):
    """virtio-vsock with guest CID `guest_cid`, host side at `uds_path` (the userspace back end)."""

    backend = "userspace"

    def __init__(self, uds_path: str | os.PathLike[str], guest_cid: int = DEFAULT_GUEST_CID) -> None:
        super().__init__(guest_cid)
        self.uds_path = os.fspath(uds_path)
        self.conns: dict[tuple[int, int], Connection] = {}
        self.control: collections.deque[bytes] = collections.deque()  # headers of packets without payload
        self._ports = itertools.count(FIRST_HOST_PORT)
        self._pending_clients: dict[int, tuple[socket.socket, bytearray]] = {}
        self.listener: socket.socket | None = None
        self.packets_in = self.packets_out = 0
        self.resets_sent = 0
        self.control_dropped = 0   # control packets dropped at MAX_CONTROL_PACKETS
        self.refused = 0           # connections refused at MAX_CONNECTIONS / MAX_PENDING_CLIENTS or socket() errors

    @property
    def pending_clients(self) -> int:
        """Host clients connected to the socket that have not yet said which guest port they want."""
        return len(self._pending_clients)

    # -- host side: listener and sockets ---------------------------------------

    def start_io(self, iothread: IoThread) -> None:
        self.iothread = iothread
        try:
            os.unlink(self.uds_path)
        except FileNotFoundError:
            pass
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        self.listener.bind(self.uds_path)
        self.listener.listen(16)
        iothread.add(self.listener.fileno(), lambda _e: self._accept())

    def _run(self, fn, *args) -> None:
        if self.transport is not None:
            self.transport.run(fn, *args)

    def _accept(self) -> None:
        assert self.listener is not None
        while True:
            try:
                client, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            client.setblocking(False)
            if self.transport is None or not self.transport.active:
                client.close()  # no driver to connect to
                continue
            if len(self._pending_clients) >= MAX_PENDING_CLIENTS or len(self.conns) >= MAX_CONNECTIONS:
                self.refused += 1
                client.close()  # the host client sees EOF: the VM takes no more connections now
                continue
            fd = client.fileno()
            self._pending_clients[fd] = (client, bytearray())
            assert self.iothread is not None
            self.iothread.add(fd, lambda _e, fd=fd: self._run(self._read_connect_line, fd))

    def _read_connect_line(self, fd: int) -> None:
        client, buf = self._pending_clients[fd]
        try:
            data = client.recv(CONNECT_LINE_MAX)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        buf += data
        if b"\n" not in buf:
            if not data or len(buf) >= CONNECT_LINE_MAX:
                self._drop_client(fd)
            return
        line, rest = bytes(buf).split(b"\n", 1)
        words = line.split()
        if len(words) != 2 or words[0] != b"CONNECT" or not words[1].isdigit() or int(words[1]) >= 1 << 32:
            self._drop_client(fd)
            return
        if len(self.conns) >= MAX_CONNECTIONS:
            self.refused += 1
            self._drop_client(fd)
            return
        assert self.iothread is not None
        self.iothread.remove(fd)
        del self._pending_clients[fd]
        port = self._new_host_port()
        conn = Connection(port, int(words[1]), client, ConnState.CONNECTING, host_initiated=True)
        conn.pending_in = rest  # bytes written after the CONNECT line wait for the guest's RESPONSE
        conn.readable = bool(rest)
        self.conns[conn.key] = conn
        self.iothread.add(fd, lambda ev, c=conn: self._run(self._socket_event, c, ev), 0)
        self._send_control(conn, Op.REQUEST)
        self._fill_rx()

    def _drop_client(self, fd: int) -> None:
        client, _ = self._pending_clients.pop(fd)
        if self.iothread is not None:
            self.iothread.remove(fd)
        client.close()

    def _new_host_port(self) -> int:
        while True:
            port = next(self._ports) & 0xFFFF_FFFF
            if port >= FIRST_HOST_PORT and not any(k[0] == port for k in self.conns):
                return port

    def _arm(self, conn: Connection, events: int) -> None:
        if conn.armed != events and self.iothread is not None:
            conn.armed = events
            self.iothread.modify(conn.sock.fileno(), events)

    def _rearm(self, conn: Connection) -> None:
        events = 0
        if conn.state is ConnState.ESTABLISHED and not conn.readable:
            events |= select.EPOLLIN
        if conn.pending_out:
            events |= select.EPOLLOUT
        self._arm(conn, events)

    def _socket_event(self, conn: Connection, events: int) -> None:
        if self.conns.get(conn.key) is not conn:
            return
        if events & select.EPOLLOUT:
            self._flush_out(conn)
        if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
            conn.readable = True
        self._rearm(conn)
        self._fill_rx()

    def _flush_out(self, conn: Connection) -> None:
        while conn.pending_out:
            try:
                n = conn.sock.send(conn.pending_out)
            except BlockingIOError:
                break
            except OSError:
                self._reset(conn)
                return
            del conn.pending_out[:n]
            conn.fwd_cnt = (conn.fwd_cnt + n) & 0xFFFF_FFFF
        if not conn.pending_out and conn.shut_write:
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        # Tell the guest about freed buffer space once a quarter of it is free again.
        if (conn.fwd_cnt - conn.announced_fwd_cnt) & 0xFFFF_FFFF >= BUF_ALLOC // 4:
            self._send_control(conn, Op.CREDIT_UPDATE)

    def _close(self, conn: Connection) -> None:
        self.conns.pop(conn.key, None)
        if self.iothread is not None:
            self.iothread.remove(conn.sock.fileno())
        conn.sock.close()

    def _reset(self, conn: Connection) -> None:
        """Close our side and tell the guest with RST."""
        self._send_control(conn, Op.RST)
        self.resets_sent += 1
        self._close(conn)

    # -- packets to the guest (rxq) --------------------------------------------

    def _header(self, conn: Connection | None, op: Op, *, length: int = 0, flags: int = 0,
                host_port: int = 0, guest_port: int = 0) -> bytes:
        if conn is not None:
            host_port, guest_port = conn.host_port, conn.guest_port
            conn.announced_fwd_cnt = conn.fwd_cnt
            fwd = conn.fwd_cnt
        else:
            fwd = 0
        return HDR.pack(HOST_CID, self.guest_cid, host_port, guest_port, length, TYPE_STREAM, op, flags,
                        BUF_ALLOC, fwd)

    def _send_control(self, conn: Connection | None, op: Op, *, flags: int = 0,
                      host_port: int = 0, guest_port: int = 0) -> None:
        if len(self.control) >= MAX_CONTROL_PACKETS:
            # The guest takes no packets (no receive buffers): drop this one. A connection that
            # needed it cannot go on correctly, so its host side is closed (the guest's next packet
            # on it is answered RST once it reads again).
            self.control_dropped += 1
            if conn is not None and self.conns.get(conn.key) is conn:
                self._close(conn)
            return
        self.control.append(self._header(conn, op, flags=flags, host_port=host_port, guest_port=guest_port))

    def _fill_rx(self) -> None:
        """Move control packets and host socket data into the guest's receive buffers."""
        if self.transport is None or not self.transport.active:
            return
        q = self.queues[RX]
        used_before = q.next_used_idx
        try:
            while self.control or any(c.readable for c in self.conns.values()):
                chain = next(self.chains(q), None)
                if chain is None:
                    return  # the driver's rxq notify brings us back
                if chain.readable or chain.writable_len < HDR_SIZE:
                    q.add_used(chain.head, 0)
                    continue
                if self.control:
                    hdr = self.control.popleft()
                    chain.write(hdr)
                    q.add_used(chain.head, HDR_SIZE)
                    self.packets_out += 1
                    continue
                if not self._send_data(chain):
                    q.undo_pop()  # nothing sendable (no credit, or the buffer too small for data)
                    return
        finally:
            if q.next_used_idx != used_before:
                self.signal_used(q)

    def _send_data(self, chain) -> bool:
        """Fill `chain` with one RW packet (or the SHUTDOWN for an EOF); False if nothing was sent."""
        q = self.queues[RX]
        for conn in list(self.conns.values()):
            if not conn.readable:
                continue
            if conn.state is ConnState.CONNECTING:
                continue  # early data waits for the guest's RESPONSE
            if conn.state is not ConnState.ESTABLISHED:
                conn.readable = False
                continue
            room = min(conn.peer_credit, chain.writable_len - HDR_SIZE, MAX_PAYLOAD)
            if room <= 0:
                continue  # no credit: waits, disarmed, for the guest's CREDIT_UPDATE
            if conn.pending_in:
                data, conn.pending_in = conn.pending_in[:room], conn.pending_in[room:]
            else:
                try:
                    data = conn.sock.recv(room)
                except BlockingIOError:
                    conn.readable = False
                    self._rearm(conn)
                    continue
                except OSError:
                    data = b""
            if not data:  # EOF: the host side closed; ask the guest to finish
                conn.readable = False
                conn.state = ConnState.CLOSING
                self._rearm(conn)
                hdr = self._header(conn, Op.SHUTDOWN, flags=SHUTDOWN_RCV | SHUTDOWN_SEND)
                chain.write(hdr)
                q.add_used(chain.head, HDR_SIZE)
                self.packets_out += 1
                return True
            hdr = self._header(conn, Op.RW, length=len(data))
            chain.write(hdr)
            chain.write(data, skip=HDR_SIZE)
            conn.tx_cnt = (conn.tx_cnt + len(data)) & 0xFFFF_FFFF
            q.add_used(chain.head, HDR_SIZE + len(data))
            self.packets_out += 1
            return True
        return False

    # -- packets from the guest (txq) --------------------------------------------

    def process_queue(self, index: int) -> None:
        if index == TX:
            q = self.queues[TX]
            for chain in self.chains(q):
                self._packet_from_guest(chain)
                q.add_used(chain.head, 0)
            self.signal_used(q)
            self._fill_rx()
        elif index == RX:
            self._fill_rx()
        elif index == EVENT:  # the driver posts event buffers; one may carry a pending transport reset
            self._send_transport_reset()

    def activate(self) -> None:
        # A guest packet is a header and at most MAX_PAYLOAD bytes (Linux sends 64 KiB at most): a longer
        # chain is failed by the queue before anything is copied out of guest memory.
        self.queues[TX].max_chain_bytes = MAX_PACKET

    def _packet_from_guest(self, chain) -> None:
        self.packets_in += 1
        if chain.readable_len < HDR_SIZE:
            return
        raw = chain.read_all()
        (src_cid, dst_cid, src_port, dst_port, length, type_, op, flags,
         buf_alloc, fwd_cnt) = HDR.unpack_from(raw)
        payload = raw[HDR_SIZE:HDR_SIZE + length]
        if src_cid != self.guest_cid or dst_cid != HOST_CID or length > len(raw) - HDR_SIZE:
            return  # not from this guest, not for the host, or a lying length: drop it
        key = (dst_port, src_port)
        conn = self.conns.get(key)
        if type_ != TYPE_STREAM:
            if op != Op.RST:
                self._send_control(None, Op.RST, host_port=dst_port, guest_port=src_port)
            return
        if conn is not None:
            conn.peer_buf_alloc, conn.peer_fwd_cnt = buf_alloc, fwd_cnt
        match op:
            case Op.REQUEST:
                if conn is not None:
                    self._reset(conn)
                    return
                self._connect_to_host(dst_port, src_port, buf_alloc, fwd_cnt)
            case Op.RESPONSE:
                if conn is None or conn.state is not ConnState.CONNECTING:
                    if conn is not None:
                        self._reset(conn)
                    else:
                        self._send_control(None, Op.RST, host_port=dst_port, guest_port=src_port)
                    return
                conn.state = ConnState.ESTABLISHED
                try:
                    conn.sock.send(f"OK {conn.host_port}\n".encode())
                except OSError:
                    self._reset(conn)
                    return
                self._rearm(conn)
            case Op.RW:
                if conn is None or conn.state is ConnState.CONNECTING:
                    if op != Op.RST:
                        self._send_control(None, Op.RST, host_port=dst_port, guest_port=src_port)
                    if conn is not None:
                        self._close(conn)
                    return
                if len(conn.pending_out) + len(payload) > BUF_ALLOC:
                    log.warning("vsock: guest port %d overran its credit; resetting", src_port)
                    self._reset(conn)
                    return
                conn.pending_out += payload
                self._flush_out(conn)
                if conn.key in self.conns:
                    self._rearm(conn)
            case Op.CREDIT_UPDATE:
                pass  # the credit was taken above; _fill_rx after this packet sends what waited for it
            case Op.CREDIT_REQUEST:
                if conn is not None:
                    self._send_control(conn, Op.CREDIT_UPDATE)
            case Op.SHUTDOWN:
                if conn is None:
                    self._send_control(None, Op.RST, host_port=dst_port, guest_port=src_port)
                    return
                if flags & SHUTDOWN_SEND:
                    conn.shut_write = True
                    self._flush_out(conn)
                if flags & SHUTDOWN_RCV and flags & SHUTDOWN_SEND or conn.state is ConnState.CLOSING:
                    self._reset(conn)  # both directions done: RST ends it (5.10.6.5)
            case Op.RST:
                if conn is not None:
                    self._close(conn)
            case _:
                if conn is not None:
                    self._reset(conn)
                else:
                    self._send_control(None, Op.RST, host_port=dst_port, guest_port=src_port)

    def _connect_to_host(self, host_port: int, guest_port: int, buf_alloc: int, fwd_cnt: int) -> None:
        path = f"{self.uds_path}_{host_port}"
        if len(self.conns) >= MAX_CONNECTIONS:
            self.refused += 1
            self._send_control(None, Op.RST, host_port=host_port, guest_port=guest_port)
            return
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        except OSError as e:  # EMFILE/ENFILE/ENOMEM: the host is out of sockets; the guest's connect fails
            self.refused += 1
            log.warning("vsock: guest port %d -> host port %d: socket(): %s", guest_port, host_port, e)
            self._send_control(None, Op.RST, host_port=host_port, guest_port=guest_port)
            return
        try:
            sock.connect(path)  # AF_UNIX connect completes at once or fails
        except OSError as e:
            sock.close()
            log.info("vsock: guest port %d -> host port %d: %s: %s", guest_port, host_port, path,
                     errno.errorcode.get(e.errno, e.errno))
            self._send_control(None, Op.RST, host_port=host_port, guest_port=guest_port)
            return
        sock.setblocking(False)
        conn = Connection(host_port, guest_port, sock, ConnState.ESTABLISHED,
                          peer_buf_alloc=buf_alloc, peer_fwd_cnt=fwd_cnt)
        self.conns[conn.key] = conn
        assert self.iothread is not None
        self.iothread.add(sock.fileno(), lambda ev, c=conn: self._run(self._socket_event, c, ev), 0)
        self._send_control(conn, Op.RESPONSE)
        self._rearm(conn)

    # -- snapshots -----------------------------------------------------------------

    def snapshot_config(self) -> dict:
        return {"kind": "vsock", "cid": self.guest_cid, "uds_path": self.uds_path}

    _transport_reset_pending = False  # a restored device owes its guest a transport reset
    transport_resets_sent = 0

    def snapshot_state(self) -> dict:
        """Nothing beyond the queues: host sockets cannot be saved, so open connections are not.

        This device's connections go on; the restored (or forked) device tells
        its guest they are gone with a transport reset (`restore_state`).
        """
        return {"connections": len(self.conns)}

    def restore_state(self, state: dict) -> None:
        # The guest's sockets refer to connections this new device never had: end them all
        # (5.10.6.7, as Firecracker does on every restore). Sent once the eventq has a buffer.
        self._transport_reset_pending = True

    def _send_transport_reset(self) -> None:
        """VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event queue, if one is due and a buffer is there."""
        if not self._transport_reset_pending or self.transport is None or not self.transport.active:
            return
        q = self.queues[EVENT]
        for chain in self.chains(q):
            if chain.writable_len < EVENT_SIZE:
                q.add_used(chain.head, 0)
                continue
            chain.write(struct.pack("<I", VIRTIO_VSOCK_EVENT_TRANSPORT_RESET))
            q.add_used(chain.head, EVENT_SIZE)
            self._transport_reset_pending = False
            self.transport_resets_sent += 1
            break
        self.signal_used(q)

    # -- lifetime ------------------------------------------------------------------

    def reset(self) -> None:
        for conn in list(self.conns.values()):
            self._close(conn)
        for fd in list(self._pending_clients):
            self._drop_client(fd)
        self.control.clear()

    def close(self) -> None:
        self.reset()
        if self.listener is not None:
            if self.iothread is not None:
                self.iothread.remove(self.listener.fileno())
            self.listener.close()
            self.listener = None
            try:
                os.unlink(self.uds_path)
            except FileNotFoundError:
                pass
        self.iothread = None


# What the vhost back end offers the driver, of what the kernel's device implements.
# VIRTIO_F_ACCESS_PLATFORM would make vhost expect an IOTLB; VHOST_F_LOG_ALL is for migration.
VHOST_OFFERED = VirtioVsock.features | VIRTIO_VSOCK_F_SEQPACKET


class VhostVsockDevice(VirtioVsock):
    """virtio-vsock served by the host kernel (/dev/vhost-vsock): host programs use AF_VSOCK to (guest_cid, port).

    Made before the VM: /dev/vhost-vsock is opened and the CID claimed
    (VHOST_VSOCK_SET_GUEST_CID) at once, so a missing module, a permission
    problem or a CID another VM holds is an error before anything boots.
    The offered features are kvmpy's less what the kernel lacks.

    On DRIVER_OK (`activate`) rxq and txq go to the kernel: VHOST_SET_OWNER,
    SET_FEATURES (what the driver acked), SET_MEM_TABLE (every RAM region),
    per vring NUM/BASE/ADDR (host addresses of the rings)/KICK/CALL/ERR,
    then VHOST_VSOCK_SET_RUNNING 1. KICK is the queue's KVM ioeventfd,
    claimed from the transport so a guest notify reaches the kernel without
    kvmpy (without ioeventfd, a notify reaching `process_queue` is passed
    on through an eventfd of ours). CALL cannot be an irqfd on virtio-mmio:
    Linux's vm_interrupt handles the vrings only if InterruptStatus has the
    used-buffer bit, so the I/O thread waits on the call eventfds and raises
    the interrupt through the transport. ERR (the guest broke a vring)
    stops the device and sets DEVICE_NEEDS_RESET.

    A device reset stops the kernel device (SET_RUNNING 0), closes the fd
    (the kernel resets host sockets connected to this CID) and opens a fresh
    one holding the CID for the next DRIVER_OK. Snapshots are refused.
    """

    backend = "vhost"

    def __init__(self, guest_cid: int = DEFAULT_GUEST_CID, *, vhost_path: str | None = None) -> None:
        super().__init__(guest_cid)
        self.vhost_path = vhost_path or VHOST_VSOCK_PATH
        self.vhost: VhostVsock | None = self._open_vhost()
        self.features = VHOST_OFFERED & self.vhost.features
        if not self.features & VIRTIO_F_VERSION_1:
            self.vhost.close()
            raise VhostUnavailableError(f"{self.vhost_path}: this kernel's vhost-vsock lacks VIRTIO_F_VERSION_1 "
                                        f"(features {self.vhost.features:#x}); use the userspace back end")
        self._used = False      # this fd has an owner and vrings: a reset needs a fresh one
        self.running = False
        self.vrings = BackendVrings(2)  # rxq and txq's kick/call/err eventfds

    def _open_vhost(self) -> VhostVsock:
        vhost = VhostVsock(self.vhost_path)
        try:
            vhost.set_guest_cid(self.guest_cid)
        except BaseException:
            vhost.close()
            raise
        return vhost

    # -- the I/O thread waits on the kernel's eventfds -----------------------------

    @property
    def calls(self) -> int:
        """Call eventfd wakeups: interrupts the kernel asked for."""
        return self.vrings.calls

    def start_io(self, iothread: IoThread) -> None:
        self.iothread = iothread
        self.vrings.start_io(iothread, lambda: self.transport, self._vring_error)

    def _vring_error(self, index: int) -> None:
        assert self.transport is not None
        self._stop_vhost()  # the driver's reset closes the fd
        self.transport.set_needs_reset(f"{self.name}: vhost-vsock reported an error on vring {index} "
                                       "(a descriptor or ring the guest broke)")

    # -- handing the queues to the kernel -------------------------------------------

    def activate(self) -> None:
        try:
            self._start_vhost()
        except KvmError as e:
            log.error("%s: %s", self.name, e)
            self._stop_vhost()  # the driver's reset closes the fd
            assert self.transport is not None
            self.transport.set_needs_reset(f"{self.name}: {e}")

    def _host_address(self, gpa: int) -> int:
        assert self.transport is not None  # Virtqueue.check() put every ring inside one region
        return self.transport.memory.host_address(gpa)

    def _start_vhost(self) -> None:
        assert self.transport is not None
        if self.vhost is None:
            self.vhost = self._open_vhost()
        vhost = self.vhost
        self._used = True
        vhost.set_owner()
        vhost.set_features(self.negotiated & vhost.features)
        vhost.set_mem_table(memory_table(self.transport.memory))
        for i in (RX, TX):
            q = self.queues[i]
            if not q.ready:
                raise QueueError(f"queue {i}: not ready at DRIVER_OK; vhost-vsock needs rxq and txq")
            vhost.set_vring_num(i, q.size)
            vhost.set_vring_base(i, q.last_avail_idx)
            vhost.set_vring_addr(i, self._host_address(q.desc_table), self._host_address(q.avail_ring),
                                 self._host_address(q.used_ring))
            vhost.set_vring_kick(i, self.vrings.take_kick(self.transport, i))
            vhost.set_vring_call(i, self.vrings.call_fds[i])
            vhost.set_vring_err(i, self.vrings.err_fds[i])
        vhost.set_running(True)
        self.running = True

    def _stop_vhost(self) -> None:
        """SET_RUNNING 0: the kernel stops serving the vrings; the queues' ioeventfds go back to the I/O thread."""
        if self.vhost is not None and self.running:
            try:
                self.vhost.set_running(False)
            except KvmError as e:
                log.warning("%s: %s", self.name, e)  # closing the fd stops it anyway
        self.running = False
        self.vrings.release_kicks()

    def process_queue(self, index: int) -> None:
        # A notify that reached kvmpy (no ioeventfd, or one served at a fast-path switch): pass it on.
        if self.running:
            self.vrings.kick(index)

    # -- snapshots -------------------------------------------------------------------

    def snapshot_config(self) -> dict:
        raise SnapshotRefused(f"{self.name}: the host kernel (vhost-vsock) holds the vrings and the host "
                              "connections, which kvmpy cannot save; snapshot a VM with the userspace vsock "
                              "back end (backend='userspace')")

    # -- lifetime ----------------------------------------------------------------------

    def reset(self) -> None:
        """Stop the kernel device; a used fd is closed (the kernel resets this CID's host
        connections) and a fresh one keeps the CID for the next DRIVER_OK."""
        self._stop_vhost()
        if not self._used:
            return  # never started since it was opened: it is as good as new
        if self.vhost is not None:
            self.vhost.close()
        self.vhost, self._used = None, False
        try:
            self.vhost = self._open_vhost()
        except KvmError as e:
            log.warning("%s: %s (tried again at the next DRIVER_OK)", self.name, e)

    def close(self) -> None:
        self._stop_vhost()
        if self.vhost is not None:
            self.vhost.close()
            self.vhost = None
        self.vrings.close()
        self.iothread = None


def vsock_device(guest_cid: int = DEFAULT_GUEST_CID, *, backend: str = "auto",
                 uds_path: str | os.PathLike[str] | None = None, vhost_path: str | None = None) -> VirtioVsock:
    """A virtio-vsock device on the back end `backend` names.

    "vhost": the kernel's (`VhostVsockDevice`); an error naming the device
    node and the fix if it is missing or unusable. "userspace": AF_UNIX
    sockets at `uds_path` (`VsockDevice`; default `default_uds_path()`).
    "auto": vhost when `vhost_path` (default /dev/vhost-vsock) exists and
    opens, else userspace, with a warning when it exists but cannot be used.
    """
    if backend not in BACKENDS:
        raise ValueError(f"vsock backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    path = vhost_path or VHOST_VSOCK_PATH
    if backend == "vhost" or backend == "auto" and vhost_vsock_available(path):
        try:
            return VhostVsockDevice(guest_cid, vhost_path=path)
        except VhostUnavailableError as e:
            if backend == "vhost":
                raise
            log.warning("vsock: %s; using the userspace back end", e)
    return VsockDevice(uds_path or default_uds_path(), guest_cid)


__all__ = ["BACKENDS", "ConnState", "HDR", "HDR_SIZE", "HOST_CID", "Op", "VhostVsockDevice", "VirtioVsock",
           "VsockDevice", "default_uds_path", "vhost_vsock_available", "vsock_device"]
