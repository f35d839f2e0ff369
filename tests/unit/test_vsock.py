"""The userspace vsock device: the packet protocol against real AF_UNIX sockets on the host side.

The test plays the guest's virtio_vsock driver (rx buffers posted, packets
written to txq) through the transport; the host side is real sockets in a
temporary directory, in Firecracker's layout (`<uds>_<port>` listeners, and
`CONNECT <port>` on `<uds>` for host-initiated connections).
"""

from __future__ import annotations

import socket
import time

import pytest

from kvmpy.devices.virtio.iothread import IoThread
from kvmpy.devices.virtio.mmio import MmioTransport
from kvmpy.devices.virtio.vsock import BUF_ALLOC, HDR, HDR_SIZE, HOST_CID, Op, VsockDevice
from kvmpy.memory import GuestMemory
from virtio_driver import Driver

GUEST_CID = 3
GUEST_BUF = 64 << 10


@pytest.fixture
def vsock(tmp_path):
    mem = GuestMemory(16 << 20)
    io = IoThread()
    uds = str(tmp_path / "v.sock")
    dev = VsockDevice(uds, GUEST_CID)
    t = MmioTransport(dev, mem)
    dev.start_io(io)
    io.start()
    drv = Driver(t, mem)
    drv.setup(queue_size=64)
    g = Guest(drv, mem)
    for _ in range(16):
        g.post_rx()
    yield g, dev, t, uds
    with t.lock:
        dev.close()
    io.close()
    mem.close()


class Guest:
    """The guest driver's side of the protocol."""

    def __init__(self, drv: Driver, mem: GuestMemory) -> None:
        self.drv, self.mem = drv, mem
        self.rx, self.tx = drv.queues[0], drv.queues[1]
        self.rx_bufs: dict[int, int] = {}
        self.fwd_cnt = 0

    def post_rx(self) -> None:
        head, (addr,) = self.rx.add(in_lens=[HDR_SIZE + 4096], notify=False)
        self.rx_bufs[head] = addr
        self.rx.kick()

    def send(self, op: Op, src_port: int, dst_port: int, payload: bytes = b"", *, flags: int = 0,
             buf_alloc: int = GUEST_BUF, dst_cid: int = HOST_CID) -> None:
        hdr = HDR.pack(GUEST_CID, dst_cid, src_port, dst_port, len(payload), 1, op, flags, buf_alloc, self.fwd_cnt)
        head, _ = self.tx.add([hdr + payload])
        for h, _ in self.tx.used_entries():
            self.tx.recycle(h)

    def packets(self, n: int = 1, timeout: float = 5.0) -> list[tuple[tuple, bytes]]:
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < n and time.monotonic() < deadline:
            for head, length in self.rx.used_entries():
                raw = self.mem.read(self.rx_bufs.pop(head), length)
                fields = HDR.unpack_from(raw)
                out.append((fields, raw[HDR_SIZE:HDR_SIZE + fields[4]]))
                self.rx.recycle(head)
                self.post_rx()
            if len(out) < n:
                time.sleep(0.01)
        return out


def op_of(packet) -> Op:
    return Op(packet[0][6])


def listen(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(1)
    s.settimeout(5)
    return s


def test_config_space_is_the_guest_cid(vsock):
    g, dev, t, _ = vsock
    assert g.drv.config(0, 8) == GUEST_CID


def test_guest_connects_to_a_host_listener_and_data_flows_both_ways(vsock):
    g, dev, t, uds = vsock
    server = listen(f"{uds}_5000")
    g.send(Op.REQUEST, 1234, 5000)
    (resp,) = g.packets()
    assert op_of(resp) == Op.RESPONSE
    src_cid, dst_cid, src_port, dst_port = resp[0][:4]
    assert (src_cid, dst_cid, src_port, dst_port) == (HOST_CID, GUEST_CID, 5000, 1234)
    assert resp[0][8] == BUF_ALLOC
    conn, _ = server.accept()
    g.send(Op.RW, 1234, 5000, b"hello host")
    assert conn.recv(100) == b"hello host"
    conn.sendall(b"hello guest")
    (rw,) = g.packets()
    assert op_of(rw) == Op.RW and rw[1] == b"hello guest"
    conn.close()  # host closes: the guest is asked to shut down
    (shut,) = g.packets()
    assert op_of(shut) == Op.SHUTDOWN and shut[0][7] == 3
    g.send(Op.RST, 1234, 5000)
    assert not dev.conns


def test_request_to_a_port_nobody_listens_on_is_reset(vsock):
    g, dev, t, _ = vsock
    g.send(Op.REQUEST, 1234, 5999)
    (p,) = g.packets()
    assert op_of(p) == Op.RST and p[0][2:4] == (5999, 1234)


def test_host_initiated_connection_with_connect_line(vsock):
    g, dev, t, uds = vsock
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(5)
    c.connect(uds)
    c.sendall(b"CONNECT 52\nearly bytes")
    (req,) = g.packets()
    assert op_of(req) == Op.REQUEST
    host_port = req[0][2]
    assert req[0][3] == 52 and host_port >= 1 << 30
    g.send(Op.RESPONSE, 52, host_port)
    assert c.recv(100) == f"OK {host_port}\n".encode()
    (rw,) = g.packets()
    assert op_of(rw) == Op.RW and rw[1] == b"early bytes"
    g.send(Op.RW, 52, host_port, b"from guest")
    assert c.recv(100) == b"from guest"
    g.send(Op.SHUTDOWN, 52, host_port, flags=3)
    (rst,) = g.packets()
    assert op_of(rst) == Op.RST
    assert c.recv(100) == b""  # the host socket sees EOF
    c.close()


def test_bad_connect_line_closes_the_client(vsock):
    g, dev, t, uds = vsock
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(5)
    c.connect(uds)
    c.sendall(b"HELLO\n")
    assert c.recv(100) == b""
    assert not g.packets(timeout=0.2)


def test_host_data_respects_the_guest_credit(vsock):
    g, dev, t, uds = vsock
    server = listen(f"{uds}_6000")
    g.send(Op.REQUEST, 77, 6000, buf_alloc=1000)
    assert op_of(g.packets()[0]) == Op.RESPONSE
    conn, _ = server.accept()
    conn.sendall(b"x" * 3000)
    got = g.packets(n=5, timeout=1.0)
    assert sum(len(p[1]) for p in got) == 1000  # no more than the guest's buffer
    g.fwd_cnt = 1000
    g.send(Op.CREDIT_UPDATE, 77, 6000, buf_alloc=1000)
    got = g.packets(n=5, timeout=1.0)
    assert sum(len(p[1]) for p in got) == 1000


def test_credit_request_is_answered_with_an_update(vsock):
    g, dev, t, uds = vsock
    server = listen(f"{uds}_6001")
    g.send(Op.REQUEST, 78, 6001)
    g.packets()
    conn, _ = server.accept()  # kept open: a closed socket would make the device send SHUTDOWN
    g.send(Op.CREDIT_REQUEST, 78, 6001)
    (upd,) = g.packets()
    assert op_of(upd) == Op.CREDIT_UPDATE and upd[0][8] == BUF_ALLOC


def test_guest_overrunning_its_credit_is_reset(vsock):
    g, dev, t, uds = vsock
    server = listen(f"{uds}_6002")
    g.send(Op.REQUEST, 79, 6002)
    g.packets()
    conn, _ = server.accept()
    # the host socket never reads; the guest keeps sending past our BUF_ALLOC
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    chunk = b"y" * 4000
    for _ in range(BUF_ALLOC // len(chunk) + 200):
        g.send(Op.RW, 79, 6002, chunk)
        if not dev.conns:
            break
    assert not dev.conns
    assert any(op_of(p) == Op.RST for p in g.packets(n=1))


def test_packets_not_from_the_guest_cid_are_dropped(vsock):
    g, dev, t, uds = vsock
    hdr = HDR.pack(99, HOST_CID, 1, 2, 0, 1, Op.REQUEST, 0, 0, 0)
    g.tx.add([hdr])
    assert not g.packets(timeout=0.2) and not dev.conns and not t.needs_reset


def test_truncated_header_is_ignored(vsock):
    g, dev, t, uds = vsock
    g.tx.add([b"\0" * 20])
    assert not g.packets(timeout=0.2) and not t.needs_reset


def test_reset_closes_every_connection(vsock):
    g, dev, t, uds = vsock
    server = listen(f"{uds}_6003")
    g.send(Op.REQUEST, 80, 6003)
    g.packets()
    conn, _ = server.accept()
    t.reset()
    conn.settimeout(5)
    assert conn.recv(10) == b"" and not dev.conns
