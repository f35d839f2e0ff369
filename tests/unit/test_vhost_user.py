"""The vhost-user front end: message layouts as the spec draws them, and the socket exchange.

The byte layouts are written out field by field from QEMU's "Vhost-user
Protocol" document (header: u32 request, u32 flags, u32 size; vring state:
u32 index, u32 num; vring address: u32 index, u32 flags, u64 descriptor,
u64 used, u64 available, u64 log; memory region: four u64s), so a swapped
field or a wrong request number fails here. The exchange tests put a
protocol peer on the other end of a socketpair: it checks what arrives,
including the SCM_RIGHTS fds, and answers as a back end would.
"""

from __future__ import annotations

import array
import os
import socket
import struct
import threading

import pytest

from kvmpy.devices.virtio.vhost_user import (
    FRONTEND_PROTOCOL_FEATURES, VHOST_USER_F_PROTOCOL_FEATURES, ProtocolFeature, Request, VhostUserError,
    VhostUserFrontend, VhostUserMemoryRegion, encode_header, encode_mem_table, encode_vring_addr,
    encode_vring_file, encode_vring_state)


def test_request_numbers_are_the_specs():
    assert (Request.GET_FEATURES, Request.SET_OWNER, Request.SET_MEM_TABLE, Request.SET_VRING_NUM,
            Request.SET_VRING_ADDR, Request.GET_VRING_BASE, Request.SET_VRING_KICK, Request.SET_VRING_ERR,
            Request.GET_PROTOCOL_FEATURES, Request.SET_VRING_ENABLE) == (1, 3, 5, 8, 9, 11, 12, 14, 15, 18)
    assert VHOST_USER_F_PROTOCOL_FEATURES == 1 << 30
    assert ProtocolFeature.REPLY_ACK == 1 << 3 and ProtocolFeature.MQ == 1


def test_header_is_request_flags_size_with_version_1():
    assert encode_header(Request.SET_FEATURES, 8) == bytes([2, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0])
    # NEED_REPLY is flag bit 3
    assert encode_header(Request.SET_OWNER, 0, need_reply=True)[4:8] == (0x1 | 0x8).to_bytes(4, "little")


def test_vring_state_is_index_then_num():
    assert encode_vring_state(1, 128) == (1).to_bytes(4, "little") + (128).to_bytes(4, "little")


def test_vring_addr_orders_descriptor_used_available_log():
    raw = encode_vring_addr(2, descriptor=0x1000, used=0x3000, available=0x2000)
    assert len(raw) == 40
    assert struct.unpack("<IIQQQQ", raw) == (2, 0, 0x1000, 0x3000, 0x2000, 0)


def test_vring_file_sets_the_no_fd_bit_8_only_without_fd():
    assert encode_vring_file(3, True) == (3).to_bytes(8, "little")
    assert encode_vring_file(3, False) == (3 | 0x100).to_bytes(8, "little")
    with pytest.raises(VhostUserError, match="8 bits"):
        encode_vring_file(256, True)


def test_mem_table_is_count_padding_then_four_u64_per_region():
    regions = [VhostUserMemoryRegion(0, 0x10000, 0x7F00_0000_0000, 0, 5),
               VhostUserMemoryRegion(1 << 32, 0x2000, 0x7F00_1000_0000, 0x1000, 6)]
    raw = encode_mem_table(regions)
    assert raw[:8] == struct.pack("<II", 2, 0)
    assert struct.unpack_from("<4Q", raw, 8) == (0, 0x10000, 0x7F00_0000_0000, 0)
    assert struct.unpack_from("<4Q", raw, 40) == (1 << 32, 0x2000, 0x7F00_1000_0000, 0x1000)
    assert len(raw) == 8 + 2 * 32


def test_mem_table_refuses_more_regions_than_one_message_carries():
    with pytest.raises(VhostUserError, match="1 to 8"):
        encode_mem_table([VhostUserMemoryRegion(i << 20, 1 << 20, 0, 0, 3) for i in range(9)])


class Peer:
    """The back end's side of a socketpair: reads one message (and its fds), answers as told."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def recv(self) -> tuple[int, int, bytes, list[int]]:
        fds = array.array("i")
        data, anc, _, _ = self.sock.recvmsg(12, socket.CMSG_SPACE(8 * 4))
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) % 4])
        request, flags, size = struct.unpack("<III", data)
        body = b""
        while len(body) < size:
            body += self.sock.recv(size - len(body))
        return request, flags, body, list(fds)

    def reply(self, request: int, payload: bytes) -> None:
        self.sock.sendall(struct.pack("<III", request, 0x1 | 0x4, len(payload)) + payload)


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fe = VhostUserFrontend.from_socket(a, name="test", timeout=2.0)
    yield fe, Peer(b)
    fe.close()
    b.close()


def serve(peer: Peer, handler) -> threading.Thread:
    t = threading.Thread(target=handler, args=(peer,), daemon=True)
    t.start()
    return t


def test_get_features_reads_the_u64_reply(pair):
    fe, peer = pair

    def backend(p: Peer) -> None:
        request, flags, body, _ = p.recv()
        assert (request, flags, body) == (Request.GET_FEATURES, 1, b"")
        p.reply(request, struct.pack("<Q", (1 << 32) | (1 << 30)))
    t = serve(peer, backend)
    assert fe.get_features() == (1 << 32) | (1 << 30)
    t.join(2)


def test_set_mem_table_sends_each_region_fd_as_scm_rights(pair):
    fe, peer = pair
    memfd = os.memfd_create("t")
    os.ftruncate(memfd, 4096)
    os.pwrite(memfd, b"shared", 0)
    got = {}

    def backend(p: Peer) -> None:
        request, _, body, fds = p.recv()
        got["request"], got["body"], got["fds"] = request, body, fds
    t = serve(peer, backend)
    fe.set_mem_table([VhostUserMemoryRegion(0, 4096, 0x1000, 0, memfd)])
    t.join(2)
    assert got["request"] == Request.SET_MEM_TABLE and struct.unpack_from("<I", got["body"])[0] == 1
    assert len(got["fds"]) == 1
    assert os.pread(got["fds"][0], 6, 0) == b"shared"  # the peer's fd is the same memfd
    os.close(got["fds"][0])
    os.close(memfd)


def test_reply_ack_sets_need_reply_and_a_nonzero_status_raises(pair):
    fe, peer = pair

    def backend(p: Peer) -> None:
        request, _, _, _ = p.recv()                 # SET_PROTOCOL_FEATURES: before REPLY_ACK applies
        assert request == Request.SET_PROTOCOL_FEATURES
        request, flags, _, _ = p.recv()             # SET_OWNER, now with NEED_REPLY
        assert flags & 0x8
        p.reply(request, struct.pack("<Q", 0))
        request, flags, _, _ = p.recv()
        p.reply(request, struct.pack("<Q", 1))      # refused
    t = serve(peer, backend)
    fe.set_protocol_features(FRONTEND_PROTOCOL_FEATURES)
    assert fe.reply_ack
    fe.set_owner()
    with pytest.raises(VhostUserError, match="SET_VRING_NUM.*refused"):
        fe.set_vring_num(0, 128)
    t.join(2)


def test_a_closed_socket_is_an_error_naming_the_message(pair):
    fe, peer = pair
    peer.sock.close()
    with pytest.raises(VhostUserError, match="GET_FEATURES on test: .*closed the socket"):
        fe.get_features()


def test_a_silent_back_end_times_out_instead_of_hanging(pair):
    fe, _peer = pair
    fe.sock.settimeout(0.2)
    fe.timeout = 0.2
    with pytest.raises(VhostUserError, match="GET_VRING_BASE on test: no reply within 0.2 s"):
        fe.get_vring_base(0)


def test_a_reply_for_another_request_is_refused(pair):
    fe, peer = pair

    def backend(p: Peer) -> None:
        p.recv()
        p.reply(Request.GET_FEATURES, struct.pack("<II", 0, 5))
    t = serve(peer, backend)
    with pytest.raises(VhostUserError, match="unexpected reply header"):
        fe.get_vring_base(0)
    t.join(2)


def test_connecting_to_no_socket_names_the_path(tmp_path):
    with pytest.raises(VhostUserError, match="cannot connect"):
        VhostUserFrontend(tmp_path / "absent.sock")
