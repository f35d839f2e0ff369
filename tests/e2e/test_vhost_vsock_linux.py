"""End to end: kvmpy's Linux guest with a vhost-vsock device, reached from the host with AF_VSOCK.

One boot serves the module: kvmpy's kernel and busybox initramfs (plus the
static `vsockt` client when gcc can build it) with one virtio-vsock device
on the host kernel's vhost-vsock back end, at a CID no other VM holds.

- The guest's virtio_vsock driver binds the device (its sysfs driver
  directory lists it).
- The host connects to (guest CID, a port nobody listens on): the guest
  kernel answers RST, so connect fails at once with ECONNRESET (or
  ECONNREFUSED) instead of timing out. That is the whole datapath: the
  REQUEST went through the kernel's rxq and our used-buffer interrupt, the
  RST came back through txq and the ioeventfd the kernel polls.
- With `vsockt`: the host connects into a guest listener and the guest
  connects to a host AF_VSOCK listener, data both ways.

Skipped where /dev/vhost-vsock does not exist (`modprobe vhost_vsock`).
"""

from __future__ import annotations

import errno
import os
import re
import socket
import time
from dataclasses import dataclass, field

import pytest

from kvmpy.boot.initramfs import INIT_MARKER, busybox_initramfs
from kvmpy.devices.virtio.vsock import VhostVsockDevice, vhost_vsock_available
from kvmpy.machine import DEFAULT_CMDLINE, MachineConfig, build
from vsock_client import build_vsock_client, serve_one, set_connect_timeout, vhost_device_on_a_free_cid

pytestmark = [
    pytest.mark.e2e, pytest.mark.kvm,
    pytest.mark.skipif(not vhost_vsock_available(), reason="no /dev/vhost-vsock on this host (modprobe vhost_vsock)"),
]

BOOT_TIMEOUT = 600  # seconds to the shell on a busy software-KVM host; seconds on hardware
CLOSED_PORT = 7777
GUEST_PORT = 6000
HOST_PORT = 20000 + os.getpid() % 10000
CONNECT_TIMEOUT = 60  # the kernel's default is 2 s; a slow guest still answers well within this
DRIVER_DIR = "/sys/bus/virtio/drivers/vmw_vsock_virtio_transport"  # virtio_transport.c's KBUILD_MODNAME


@dataclass
class Session:
    console: str
    outcome: object
    cid: int
    driver_listing: str = ""
    refused: dict = field(default_factory=dict)  # errno and seconds of the connect to CLOSED_PORT
    host_to_guest: bytes = b""
    guest_to_host: bytes = b""
    client_built: bool = False
    calls: int = 0
    errors: list = field(default_factory=list)


def vsock_socket() -> socket.socket:
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    set_connect_timeout(s, CONNECT_TIMEOUT)
    return s


def connect_to_closed_port(cid: int) -> dict:
    s = vsock_socket()
    start = time.monotonic()
    try:
        s.connect((cid, CLOSED_PORT))
        return {"errno": None, "seconds": time.monotonic() - start}
    except OSError as e:
        return {"errno": e.errno, "seconds": time.monotonic() - start}
    finally:
        s.close()


@pytest.fixture(scope="module")
def session(guest_artifacts, tmp_path_factory) -> Session:
    vmlinux, _ = guest_artifacts
    work = tmp_path_factory.mktemp("vhost-vsock-e2e")
    client = build_vsock_client(work)
    image = busybox_initramfs()
    if client is not None:
        image.add_file("/bin/vsockt", client, mode=0o755)
    initrd = work / "initramfs.cpio"
    initrd.write_bytes(image.to_bytes())

    listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)  # for the guest's connect to CID 2
    listener.bind((socket.VMADDR_CID_ANY, HOST_PORT))
    listener.listen(1)
    got: list[bytes] = []

    serve_one(listener, BOOT_TIMEOUT + 300, got)

    dev = vhost_device_on_a_free_cid(0x2000_0000)
    s = Session("", None, dev.guest_cid, client_built=client is not None)
    try:
        machine = build(MachineConfig(kernel=vmlinux, initrd=initrd, cmdline=DEFAULT_CMDLINE, memory="128M",
                                        vcpus=1), devices=[dev])
    except BaseException:
        dev.close()
        listener.close()
        raise
    try:
        machine.start()
        con = machine.console
        at = con.wait_for(INIT_MARKER.encode(), BOOT_TIMEOUT)
        if at >= 0:
            con.wait_for(b"# ", 60, at)
            machine.send_input(f"ls {DRIVER_DIR}; echo MARK-$((40+1))\n".encode())
            end = con.wait_for(b"MARK-41", 180, at)
            s.driver_listing = con.text()[at:end] if end >= 0 else ""
            s.refused = connect_to_closed_port(dev.guest_cid)
            if client is not None:
                machine.send_input(f"(vsockt listen {GUEST_PORT} &); echo MARK-$((41+1))\n".encode())
                if con.wait_for(b"VSOCK-LISTENING", 180, at) >= 0:
                    c = vsock_socket()
                    c.settimeout(120)
                    try:
                        c.connect((dev.guest_cid, GUEST_PORT))
                        c.sendall(b"hi-guest")
                        reply = b""
                        while chunk := c.recv(64):  # "pong:" and the echo, then the guest closes
                            reply += chunk
                        s.host_to_guest = reply
                    finally:
                        c.close()
                    con.wait_for(b"VSOCK-SERVED", 120, at)
                machine.send_input(f"vsockt connect 2 {HOST_PORT} hi-host; echo MARK-$((42+1))\n".encode())
                con.wait_for(b"MARK-43", 180, at)
                s.guest_to_host = got[0] if got else b""
            machine.send_input(b"poweroff -f\n")
        s.outcome = machine.wait(180)
        s.calls = dev.calls
        s.errors = [slot.transport.last_error for slot in machine.virtio.slots if slot.transport.last_error]
    finally:
        machine.stop()
        machine.close()  # closes the device: the CID is free again
        listener.close()
    s.console = machine.console.text()
    return s


def test_guest_virtio_vsock_driver_binds_the_vhost_device(session):
    # The transport kept the config space: the driver read the CID and probed.
    assert re.search(r"\bvirtio\d+\b", session.driver_listing), session.console[-3000:]


def test_host_connect_to_a_closed_guest_port_fails_fast_with_a_reset(session):
    assert session.refused.get("errno") in (errno.ECONNRESET, errno.ECONNREFUSED), (session.refused,
                                                                                    session.console[-2000:])
    assert session.refused["seconds"] < CONNECT_TIMEOUT  # the guest answered; nothing timed out
    assert session.calls >= 1  # the REQUEST's used buffer came back as an interrupt through the I/O thread


def test_host_connects_into_a_guest_listener(session):
    if not session.client_built:
        pytest.skip("no gcc/static libc to build the guest's vsock client")
    assert session.host_to_guest == b"pong:hi-guest"
    assert "VSOCK-SERVED:hi-guest" in session.console


def test_guest_connects_to_a_host_af_vsock_listener(session):
    if not session.client_built:
        pytest.skip("no gcc/static libc to build the guest's vsock client")
    assert session.guest_to_host == b"hi-host"
    assert "VSOCK-REPLY:host-says:hi-host" in session.console


def test_no_device_needed_a_reset_and_the_guest_powered_off(session):
    assert not session.errors, session.errors
    assert session.outcome is not None and session.outcome.status.value == "poweroff", session.outcome


def test_the_cid_is_released_when_the_machine_closes(session):
    VhostVsockDevice(session.cid).close()  # would raise VsockCidInUseError if the fd were still open
