"""End to end: the real guest kernel with virtio-blk, virtio-net over a real TAP, virtio-rng and vsock.

The machine is kvmpy's `Machine` with `MachineConfig.devices`. One boot serves every test here (a boot costs minutes on the software KVM
backend). The machine has no initramfs: its root file system is an ext4
image made by `make_ext4_image` from a directory holding busybox, kvmpy's
/init and a small static vsock client, and the kernel mounts it read-write
from virtio-blk (`root=/dev/vda rw`). The kernel configures eth0 itself
(`ip=` on the command line); the host pings it over the TAP as soon as the
console says "IP-Config: Complete". Then the test types into the guest's
shell: write a file, read the entropy device, list the virtio devices,
connect to a host AF_UNIX listener over vsock and accept a host-initiated
vsock connection, then remount the root read-only (ext4 checkpoints its
journal) and power off. The host reads the written file back from the image
with debugfs and checks the superblock's mount count.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kvmpy.boot.initramfs import INIT_MARKER
from kvmpy.disk import ext4_mount_count, make_ext4_image, populate_busybox_root, read_file_from_image
from kvmpy.machine import DEFAULT_CMDLINE, MachineConfig, build
from vsock_client import build_vsock_client, serve_one

pytestmark = [pytest.mark.e2e, pytest.mark.kvm]

BOOT_TIMEOUT = 600  # seconds to the shell; ~60-90 s on an idle PVM host, several minutes when it is shared
HOST_IP, GUEST_IP = "172.31.200.1", "172.31.200.2"
GUEST_MAC = "52:54:00:c0:ff:ee"
GUEST_CID = 3
GUEST_TO_HOST_PORT = 5000
HOST_TO_GUEST_PORT = 6000
FILE_TEXT = "written-by-the-guest-42"


@dataclass
class Session:
    console: str
    outcome: object
    image: Path
    mount_count_before: int
    ping_replies: int
    host_got: bytes
    host_initiated: list[bytes]
    devices: dict = field(default_factory=dict)  # name -> (device, transport) counters after the run
    vsock_built: bool = False


def _root_directory(root: Path, vsock_client: Path | None) -> None:
    """kvmpy's busybox tree (as in its initramfs) plus a file to read and the vsock client."""
    populate_busybox_root(root)
    (root / "hello.txt").write_text("hello from the host image\n")
    if vsock_client is not None:
        shutil.copy(vsock_client, root / "bin" / "vsockt")


def _icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def ping(address: str, count: int = 5, timeout: float = 20.0) -> int:
    """ICMP echo from the host (raw socket; no ping binary needed); returns the replies received."""
    replies = 0
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        ident = os.getpid() & 0xFFFF
        for seq in range(count):
            body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"kvmpy-ping"
            pkt = body[:2] + struct.pack("!H", _icmp_checksum(body)) + body[4:]
            s.sendto(pkt, (address, 0))
            deadline = time.monotonic() + timeout / count
            while time.monotonic() < deadline:
                if not select.select([s], [], [], max(deadline - time.monotonic(), 0))[0]:
                    break
                data, (src, _) = s.recvfrom(2048)
                ihl = (data[0] & 0xF) * 4
                typ, _, _, rid, rseq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
                if src == address and typ == 0 and rid == ident and rseq == seq:
                    replies += 1
                    break
    return replies


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> Session:
    import kvmpy
    reason = kvmpy.kvm_available()
    if reason is not None:
        pytest.skip(f"needs a usable /dev/kvm: {reason}")
    if os.geteuid() != 0 or not os.access("/dev/net/tun", os.W_OK):
        pytest.skip("needs root and /dev/net/tun for the TAP")
    from kvmpy.devices.virtio.blk import BlockDevice
    from kvmpy.devices.virtio.net import NetDevice
    from kvmpy.devices.virtio.rng import EntropyDevice
    from kvmpy.devices.virtio.vsock import VsockDevice
    from kvmpy.guest.build import build_kernel
    from kvmpy.net.tap import Tap

    work = tmp_path_factory.mktemp("virtio-e2e")
    client = build_vsock_client(work)
    root = work / "root"
    root.mkdir()
    _root_directory(root, client)
    image = make_ext4_image(work / "root.img", root, "48M")
    mount_count_before = ext4_mount_count(image)

    uds = str(work / "vsock.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{uds}_{GUEST_TO_HOST_PORT}")
    listener.listen(1)
    host_got: list[bytes] = []

    serve_one(listener, BOOT_TIMEOUT + 300, host_got)

    kernel = build_kernel(progress=False).vmlinux
    tap = Tap(host_address=f"{HOST_IP}/24")
    blk = BlockDevice(image)
    net = NetDevice(tap.fd, GUEST_MAC, owner=tap)
    rng = EntropyDevice()
    vsock = VsockDevice(uds, GUEST_CID)
    cmdline = (f"{DEFAULT_CMDLINE} root=/dev/vda rw rootfstype=ext4 init=/init "
               f"ip={GUEST_IP}::{HOST_IP}:255.255.255.0::eth0:off")
    config = MachineConfig(kernel=kernel, initrd=None, cmdline=cmdline, memory="256M", vcpus=1,
                           )
    machine = build(config, devices=[blk, net, rng, vsock])
    replies = 0
    host_initiated: list[bytes] = []
    try:
        machine.start()
        con = machine.console
        if con.wait_for(b"IP-Config: Complete", BOOT_TIMEOUT) >= 0:
            deadline = time.monotonic() + 120
            while replies == 0 and time.monotonic() < deadline:
                replies = ping(GUEST_IP, count=3, timeout=15)
        at = con.wait_for(INIT_MARKER.encode(), BOOT_TIMEOUT)
        if at >= 0:
            con.wait_for(b"# ", 60, at)
            machine.send_input(
                f"echo {FILE_TEXT} > /f; sync; cat /hello.txt; head -c 64 /dev/hwrng | wc -c; "
                "cat /sys/devices/virtual/misc/hw_random/rng_current; "
                "for d in /sys/bus/virtio/devices/*; do echo $d $(cat $d/device) F$(cat $d/features); done; "
                "echo MARK-$((20+1))\n".encode())
            con.wait_for(b"MARK-21", 180, at)
            if client is not None:
                machine.send_input(f"vsockt connect 2 {GUEST_TO_HOST_PORT} hi-host; "
                                   f"(vsockt listen {HOST_TO_GUEST_PORT} &); echo MARK-$((21+1))\n".encode())
                if con.wait_for(b"VSOCK-LISTENING", 180, at) >= 0:
                    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    c.settimeout(120)
                    c.connect(uds)
                    c.sendall(f"CONNECT {HOST_TO_GUEST_PORT}\n".encode())
                    buf = b""
                    while not buf.endswith(b"\n"):
                        chunk = c.recv(64)
                        if not chunk:
                            break
                        buf += chunk
                    host_initiated.append(buf)
                    c.sendall(b"hi-guest")
                    reply = b""
                    while chunk := c.recv(64):  # the guest writes "pong:" and the echo, then closes
                        reply += chunk
                    host_initiated.append(reply)
                    c.close()
                    con.wait_for(b"VSOCK-SERVED", 120, at)
            machine.send_input(b"mount -o remount,ro /; echo MARK-$((22+1))\n")
            con.wait_for(b"MARK-23", 120, at)
            machine.send_input(b"poweroff -f\n")
        outcome = machine.wait(180)
        devices = {
            "blk": dict(requests=blk.requests, read=blk.bytes_read, written=blk.bytes_written, flushes=blk.flushes),
            "net": dict(rx=net.rx_packets, tx=net.tx_packets),
            "rng": dict(bytes=rng.bytes_served),
            "vsock": dict(packets_in=vsock.packets_in, packets_out=vsock.packets_out),
            "errors": [s.transport.last_error for s in machine.virtio.slots if s.transport.last_error],
        }
    finally:
        machine.stop()
        machine.close()  # closes the devices (and the TAP with the net device)
        listener.close()
    return Session(machine.console.text(), outcome, image, mount_count_before, replies,
                   host_got[0] if host_got else b"", host_initiated, devices, client is not None)


def test_kernel_mounts_the_ext4_root_from_virtio_blk(session):
    assert "EXT4-fs (vda): mounted filesystem" in session.console, session.console[-3000:]
    assert "VFS: Mounted root (ext4 filesystem)" in session.console
    assert "virtio_blk virtio0: [vda]" in session.console


def test_read_write_mount_changed_the_superblock(session):
    assert ext4_mount_count(session.image) == session.mount_count_before + 1


def test_file_written_in_the_guest_is_in_the_image(session):
    assert read_file_from_image(session.image, "/f") == f"{FILE_TEXT}\n".encode(), session.console[-2000:]


def test_guest_answers_ping_over_the_tap(session):
    assert "IP-Config: Complete" in session.console and f"ipaddr={GUEST_IP}" in session.console
    assert session.ping_replies >= 1, (session.devices, session.console[-2000:])


def test_entropy_device_is_probed_and_serves_bytes(session):
    assert "virtio_rng" in session.console  # rng_current
    assert session.devices["rng"]["bytes"] >= 64


def test_all_four_virtio_devices_appear_in_sysfs(session):
    for device_id in ("0x0002", "0x0001", "0x0004", "0x0013"):  # blk, net, entropy, vsock
        assert device_id in session.console, session.console[-2000:]


def test_guest_connects_to_a_host_unix_socket_over_vsock(session):
    if not session.vsock_built:
        pytest.skip("no gcc/static libc to build the guest's vsock client")
    assert session.host_got == b"hi-host"
    assert "VSOCK-REPLY:host-says:hi-host" in session.console


def test_host_connects_into_the_guest_over_vsock(session):
    if not session.vsock_built:
        pytest.skip("no gcc/static libc to build the guest's vsock client")
    assert session.host_initiated[0].startswith(b"OK ")
    assert session.host_initiated[1] == b"pong:hi-guest"
    assert "VSOCK-SERVED:hi-guest" in session.console


def test_no_device_needed_a_reset_and_the_guest_powered_off(session):
    assert not session.devices["errors"], session.devices
    assert session.outcome is not None and session.outcome.status.value == "poweroff", session.outcome


def test_net_device_negotiated_version_1_and_transmit_offloads(session):
    import re
    # /sys/bus/virtio/devices/virtio1 is the net device (the second attached); its
    # `features` file is the negotiated bits as a string of 0/1, bit 0 first.
    m = re.search(r"virtio1 0x0001 F([01]+)", session.console)
    assert m, session.console[-2000:]
    bits = m.group(1)
    assert bits[32] == "1"                  # VIRTIO_F_VERSION_1
    assert bits[0] == "1" and bits[11] == "1"  # VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4
    assert bits[5] == "1"                   # VIRTIO_NET_F_MAC
