"""virtio-fs against a real virtiofsd, driven from the host by the test driver (tests/virtio_driver.py).

The driver plays the guest's virtio_fs: it brings the device up through
the transport's registers (DRIVER_OK hands the queues to virtiofsd over
vhost-user) and puts FUSE requests on the request queue; virtiofsd reads
them from the memfd-backed guest memory, answers in place, and its call
eventfd comes back as an interrupt through the I/O thread. Nothing on the
daemon's side is simulated.
"""

from __future__ import annotations

import errno
import os
import signal
import time

import pytest

import fuse_client as fc
from kvmpy.devices.virtio.fs import VirtioFsDevice
from kvmpy.devices.virtio.iothread import IoThread
from kvmpy.devices.virtio.mmio import DeviceStatus, MmioTransport, SnapshotRefused
from kvmpy.memory import GuestMemory
from kvmpy.virtiofsd import ShareConfig, VirtiofsdError, find_virtiofsd
from virtio_driver import Driver

try:
    find_virtiofsd()
    _NO_DAEMON = ""
except VirtiofsdError as e:
    _NO_DAEMON = str(e)
pytestmark = pytest.mark.skipif(bool(_NO_DAEMON), reason=_NO_DAEMON or "virtiofsd present")

FUSE_CREATE = 35
CREATE_IN = "<IIII"  # flags mode umask open_flags
REPLY = fc.OUT_HEADER.size + 256


class Session:
    def __init__(self, share: ShareConfig, *, memfd: bool = True) -> None:
        self.mem = GuestMemory(16 << 20, memfd=memfd)
        self.io = IoThread()
        self.dev = VirtioFsDevice(share)
        self.t = MmioTransport(self.dev, self.mem)
        self.dev.start_io(self.io)
        self.io.start()
        self.drv = Driver(self.t, self.mem)
        self.unique = 0

    def up(self) -> None:
        self.drv.setup()
        self.requests = self.drv.queues[1]

    def call(self, raw: bytes, reply_len: int = REPLY, timeout: float = 10.0) -> bytes:
        head, (addr,) = self.requests.add([raw], [reply_len])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for got_head, length in self.requests.used_entries():
                assert got_head == head
                self.requests.recycle(head, 2)
                return self.mem.read(addr, length)
            time.sleep(0.005)
        raise AssertionError("virtiofsd did not answer")

    def next_unique(self) -> int:
        self.unique += 1
        return self.unique

    def init(self) -> tuple[int, int]:
        reply = self.call(fc.init_request(self.next_unique()), fc.OUT_HEADER.size + fc.INIT_OUT.size)
        length, error, _unique = fc.OUT_HEADER.unpack_from(reply)
        assert error == 0, os.strerror(-error)
        return fc.INIT_OUT.unpack_from(reply, fc.OUT_HEADER.size)[:2]

    def create(self, name: str) -> int:
        """FUSE_CREATE in the root directory; the reply's error (0 or a negative errno)."""
        import struct
        args = struct.pack(CREATE_IN, os.O_WRONLY | os.O_CREAT, 0o644, 0o022, 0) + name.encode() + b"\0"
        reply = self.call(fc.request(FUSE_CREATE, self.next_unique(), fc.FUSE_ROOT_ID, args))
        return fc.OUT_HEADER.unpack_from(reply)[1]

    def close(self) -> None:
        self.t.reset()
        self.dev.close()
        self.io.close()
        self.mem.close()


@pytest.fixture
def share_dir(tmp_path):
    d = tmp_path / "share"
    d.mkdir()
    (d / "hello.txt").write_text("hello from the host\n")
    return d


@pytest.fixture
def session(share_dir):
    s = Session(ShareConfig(share_dir, "t"))
    yield s
    s.close()


def test_fuse_init_round_trip_through_virtiofsd(session):
    session.up()
    assert session.t.status & DeviceStatus.DRIVER_OK and not session.t.needs_reset, session.t.last_error
    major, minor = session.init()
    assert major == fc.FUSE_KERNEL_VERSION and minor >= 31  # virtio-fs needs FUSE 7.31+
    # The answer comes as an interrupt: the daemon's call eventfd, through the I/O thread
    # (which may still be on its way there when the used ring is already visible).
    deadline = time.monotonic() + 5
    while session.t.interrupts == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert session.dev.vrings.calls >= 1 and session.t.interrupts >= 1
    assert session.t.interrupt_status & 1  # the used-buffer bit Linux's vm_interrupt looks for


def test_lookup_sees_the_host_file(session, share_dir):
    session.up()
    session.init()
    reply = session.call(fc.lookup_request("hello.txt", session.next_unique()))
    assert fc.OUT_HEADER.unpack_from(reply)[1] == 0
    assert fc.entry_size(reply) == (share_dir / "hello.txt").stat().st_size


def test_create_in_a_writable_share_reaches_the_host(session, share_dir):
    session.up()
    session.init()
    assert session.create("made-by-guest") == 0
    assert (share_dir / "made-by-guest").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="read-only shares need root (a read-only bind mount)")
def test_read_only_share_refuses_create_on_the_host_side(share_dir):
    s = Session(ShareConfig(share_dir, "ro", read_only=True))
    try:
        s.up()
        s.init()
        assert s.create("nope") == -errno.EROFS
        assert not (share_dir / "nope").exists()
        reply = s.call(fc.lookup_request("hello.txt", s.next_unique()))
        assert fc.OUT_HEADER.unpack_from(reply)[1] == 0  # reading still works
    finally:
        s.close()
    (share_dir / "still-writable-for-the-host").write_text("x")  # the ro bind mount stayed in the daemon's namespace


def test_ring_state_survives_a_driver_reset(session):
    session.up()
    session.init()
    session.t.reset()  # GET_VRING_BASE: the daemon stops the rings
    assert not session.dev.running
    session.up()       # a second DRIVER_OK: the same daemon serves fresh rings
    assert session.init()[0] == fc.FUSE_KERNEL_VERSION


def test_daemon_death_is_a_clear_error_and_nothing_hangs(session):
    session.up()
    session.init()
    os.kill(session.dev.daemon.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not session.t.needs_reset and time.monotonic() < deadline:
        time.sleep(0.01)
    assert session.t.needs_reset
    assert "virtiofsd (pid" in session.dev.failure and "killed by SIGKILL" in session.dev.failure
    assert session.dev.share.tag in session.t.last_error
    started = time.monotonic()
    session.t.reset()           # no GET_VRING_BASE to a dead daemon: returns at once
    session.drv.setup()         # a new DRIVER_OK cannot revive it: the device refuses, it does not hang
    assert session.t.needs_reset and "killed by SIGKILL" in session.t.last_error
    assert time.monotonic() - started < 5


def test_private_memory_is_refused_at_driver_ok(share_dir):
    s = Session(ShareConfig(share_dir, "t"), memfd=False)
    try:
        s.drv.setup()
        assert s.t.needs_reset and "not memfd-backed" in s.t.last_error
    finally:
        s.close()


def test_close_ends_the_daemon_and_removes_its_socket(share_dir):
    s = Session(ShareConfig(share_dir, "t"))
    s.up()
    s.init()
    daemon = s.dev.daemon
    assert not os.path.exists(daemon.dir)  # gone once connected: nothing is left behind if kvmpy is killed
    s.close()
    assert daemon.exited() is not None


def test_snapshot_is_refused_with_the_reason(session):
    with pytest.raises(SnapshotRefused, match="virtiofsd holds"):
        session.dev.snapshot_config()


def test_daemon_does_not_outlive_a_killed_vmm(share_dir):
    """SIGKILL of the process holding the device: the kernel closes its socket and virtiofsd exits."""
    import subprocess
    import sys
    code = ("import sys; from pathlib import Path; from kvmpy.devices.virtio.fs import VirtioFsDevice; "
            "from kvmpy.virtiofsd import ShareConfig; d = VirtioFsDevice(ShareConfig(Path(sys.argv[1]), 't')); "
            "print(d.daemon.pid, d.daemon.dir, flush=True); sys.stdin.read()")
    vmm = subprocess.Popen([sys.executable, "-c", code, str(share_dir)], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    try:
        pid_text, directory = vmm.stdout.readline().split()
        pid = int(pid_text)
        os.kill(pid, 0)  # running
        vmm.kill()
        vmm.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            # The daemon is the killed process's child: once it exits it is a zombie of init, or gone.
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().split(")")[-1].split()[0] == "Z":
                        break
            except FileNotFoundError:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"virtiofsd {pid} still running 10 s after its VMM was killed")
        assert not os.path.exists(directory)
    finally:
        if vmm.poll() is None:
            vmm.kill()
