"""virtio-net against a SOCK_SEQPACKET socketpair standing in for the TAP (same packet semantics).

The socket end the device holds behaves like a TAP opened with IFF_VNET_HDR
and a 12-byte header: each read or write is one 12-byte virtio_net_hdr plus
one Ethernet frame. The test holds the other end, as the host's network would.
"""

from __future__ import annotations

import select
import socket
import struct

import pytest

from kvmpy.devices.virtio.iothread import IoThread
from kvmpy.devices.virtio.mmio import MmioTransport
from kvmpy.devices.virtio.net import (NET_HDR_SIZE, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, NetDevice, parse_mac)
from kvmpy.memory import GuestMemory
from virtio_driver import Driver

HDR = bytes(NET_HDR_SIZE)
FRAME = bytes.fromhex("ffffffffffff525400123456 0806".replace(" ", "")) + b"arp-ish payload"


@pytest.fixture
def mem():
    with GuestMemory(4 << 20) as m:
        yield m


@pytest.fixture
def net(mem):
    host, dev_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    dev_end.setblocking(False)
    io = IoThread()
    dev = NetDevice(dev_end.fileno(), "52:54:00:12:34:56")
    t = MmioTransport(dev, mem)
    dev.start_io(io)
    io.start()
    drv = Driver(t, mem)
    drv.setup()
    yield dev, t, drv, host
    dev.close()
    io.close()
    host.close()
    dev_end.close()


def wait_used(q, n=1, timeout=5.0):
    import time
    deadline = time.monotonic() + timeout
    got = []
    while len(got) < n and time.monotonic() < deadline:
        got += q.used_entries()
        time.sleep(0.005)
    return got


def test_config_space_has_mac_and_link_up(net):
    dev, t, drv, _ = net
    assert drv.device_features() & (VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS) == VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS
    assert bytes(drv.config(i, 1) for i in range(6)) == bytes.fromhex("525400123456")
    assert drv.config(6, 2) == 1  # VIRTIO_NET_S_LINK_UP


def test_transmit_writes_header_and_frame_to_the_tap(net):
    dev, t, drv, host = net
    tx = drv.queues[1]
    head, _ = tx.add([HDR, FRAME])  # header and frame in two descriptors, as Linux may
    assert tx.used_entries() == [(head, 0)]
    assert host.recv(2048) == HDR + FRAME
    assert dev.tx_packets == 1


def test_receive_fills_a_posted_buffer_and_sets_num_buffers(net, mem):
    dev, t, drv, host = net
    rx = drv.queues[0]
    head, (buf,) = rx.add(in_lens=[NET_HDR_SIZE + 1514])
    host.send(bytes(10) + b"\xEE\xEE" + FRAME)  # the TAP leaves num_buffers as it found it
    used = wait_used(rx)
    assert used == [(head, NET_HDR_SIZE + len(FRAME))]
    data = mem.read(buf, NET_HDR_SIZE + len(FRAME))
    assert struct.unpack_from("<H", data, 10)[0] == 1
    assert data[NET_HDR_SIZE:] == FRAME


def test_frames_wait_until_the_guest_posts_buffers(net, mem):
    dev, t, drv, host = net
    rx = drv.queues[0]
    host.send(HDR + FRAME)
    host.send(HDR + FRAME[::-1])
    import time
    time.sleep(0.1)
    assert not dev._rx_polling  # no buffers: the TAP is out of the poll set, not spinning
    rx.add(in_lens=[2048])
    rx.add(in_lens=[2048])
    used = wait_used(rx, 2)
    assert len(used) == 2 and dev.rx_packets == 2


def test_buffer_too_small_for_the_header_is_returned_empty(net):
    dev, t, drv, host = net
    rx = drv.queues[0]
    head, _ = rx.add(in_lens=[4])
    host.send(HDR + FRAME)
    used = wait_used(rx)
    assert used[0] == (head, 0) and dev.rx_short == 1 and not t.needs_reset


def test_transmit_without_a_frame_is_dropped(net):
    dev, t, drv, host = net
    tx = drv.queues[1]
    head, _ = tx.add([HDR])
    assert tx.used_entries() == [(head, 0)]
    assert dev.tx_errors == 1
    assert not select.select([host], [], [], 0.05)[0]


def test_mac_parsing():
    assert parse_mac("02:00:00:aa:bb:cc") == bytes.fromhex("020000aabbcc")
    with pytest.raises(ValueError, match="six hex pairs"):
        parse_mac("02:00:00")
    with pytest.raises(ValueError, match="multicast"):
        parse_mac("01:00:5e:00:00:01")


def test_net_argument_parsing():
    from kvmpy.machine import ConfigError, NetConfig
    assert NetConfig.parse("tap") == NetConfig()
    assert NetConfig.parse("tap=vm0,ip=172.31.0.1/24,mac=52:54:00:00:00:01") == NetConfig(
        tap="vm0", host_address="172.31.0.1/24", mac="52:54:00:00:00:01")
    with pytest.raises(ConfigError, match="only TAP"):
        NetConfig.parse("user")
    with pytest.raises(ConfigError, match="unknown option"):
        NetConfig.parse("tap,speed=10")


def test_transmit_offloads_are_offered_and_can_be_turned_off(mem):
    from kvmpy.devices.virtio.net import TX_OFFLOADS, VIRTIO_NET_F_CSUM
    assert NetDevice(-1).features & TX_OFFLOADS == TX_OFFLOADS
    assert not NetDevice(-1, tx_offloads=False).features & VIRTIO_NET_F_CSUM


def test_gso_frame_goes_to_the_tap_with_its_header_unchanged(net):
    dev, t, drv, host = net
    # NEEDS_CSUM, GSO_TCPV4, hdr_len 54, gso_size 1448, csum_start 34, csum_offset 16, num_buffers 0
    hdr = struct.pack("<BBHHHHH", 1, 1, 54, 1448, 34, 16, 0)
    frame = FRAME + bytes(4000)
    tx = drv.queues[1]
    head, _ = tx.add([hdr, frame[:1000], frame[1000:]])
    assert tx.used_entries() == [(head, 0)]
    assert host.recv(8192) == hdr + frame
