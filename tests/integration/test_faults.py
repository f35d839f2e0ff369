"""SIGKILL at random points: what a guest saw flushed is on disk; no TAP, socket or lock outlives the VMM.

The processes killed are tests/fault_worker.py: real devices (BlockDevice on
a raw image; NetDevice on a real TAP with its I/O thread, a userspace vsock
listener, a `kvmpy stat` control socket) driven through MmioTransport by the
host-side virtio driver, as a guest driver would drive them.
"""

from __future__ import annotations

import os
import random
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fault_worker import SECTOR, SECTORS, rounds, sector_data
from kvmpy.net.tap import link_exists
from kvmpy.stats.control import list_sockets, query

WORKER = Path(__file__).resolve().parent.parent / "fault_worker.py"
KILLS = 12  # per test; the figures in docs/reliability.md come from scripts/soak.py --faults


def _spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _lines_until_killed(proc: subprocess.Popen, delay: float) -> list[str]:
    """Read the worker's lines for `delay` seconds, SIGKILL it, and return every line it printed."""
    out = b""
    deadline = time.monotonic() + delay
    while time.monotonic() < deadline and proc.poll() is None:
        if select.select([proc.stdout], [], [], 0.05)[0]:
            out += os.read(proc.stdout.fileno(), 65536)
    assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out += proc.stdout.read()
    return out.decode().splitlines()


def expected_after(seed: int, flushed: int) -> dict[int, int]:
    """sector -> the last round <= `flushed` that wrote it."""
    last: dict[int, int] = {}
    for r, writes in rounds(seed):
        if r > flushed:
            return last
        for first, count in writes:
            for s in range(first, first + count):
                last[s] = r


def round_on_disk(data: bytes, sector: int) -> int:
    """Which round's data `sector` holds (0: never written); raises if it is no round's (torn, wrong place)."""
    if data == bytes(SECTOR):
        return 0
    r, s = int.from_bytes(data[:4], "little"), int.from_bytes(data[4:8], "little")
    assert s == sector and data == sector_data(r, sector), f"sector {sector} holds neither zeros nor a round's data"
    return r


def test_sigkill_during_a_write_burst_loses_no_flushed_write(tmp_path):
    rng = random.Random(15)
    image = tmp_path / "burst.img"
    checked = 0
    for kill in range(KILLS):
        image.write_bytes(bytes(SECTORS * SECTOR))
        seed = rng.randrange(1 << 30)
        lines = _lines_until_killed(_spawn("blk", str(image), str(seed)), rng.uniform(0.4, 1.5))
        flushed = max((int(line.split()[1]) for line in lines if line.startswith("flushed ")), default=0)
        assert flushed > 0, "the worker flushed nothing before it was killed: kill later"
        expected = expected_after(seed, flushed)
        data = image.read_bytes()
        for sector in range(SECTORS):
            got = round_on_disk(data[sector * SECTOR:(sector + 1) * SECTOR], sector)
            # a later round may have landed (written, not yet flushed); an earlier one means a lost write
            assert got >= expected.get(sector, 0), (kill, sector, got, expected.get(sector))
            checked += 1
    assert checked == KILLS * SECTORS


needs_tap = pytest.mark.skipif(not os.access("/dev/net/tun", os.R_OK | os.W_OK) or os.geteuid() != 0,
                               reason="needs /dev/net/tun and CAP_NET_ADMIN (root)")


@needs_tap
def test_sigkill_during_a_tap_transfer_leaves_nothing_for_the_next_start(tmp_path):
    rng = random.Random(7)
    tap = f"kvmpyf{os.getpid() % 100000}"
    host = f"172.31.{200 + os.getpid() % 50}.1/24"
    uds = str(tmp_path / "vsock.sock")
    control_dir = tmp_path / "control"
    control_dir.mkdir(mode=0o700)
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("0.0.0.0", 0))
    receiver.setblocking(False)
    port = receiver.getsockname()[1]
    received = 0
    try:
        for kill in range(KILLS // 2 + 1):
            proc = _spawn("net", tap, host, str(port), uds, str(control_dir))
            ready = proc.stdout.readline().decode()
            assert ready.startswith("ready "), proc.stderr.read().decode()  # a TAP or socket left would fail here
            control = ready.split()[1]
            assert query(control)["fault-worker"] is True and link_exists(tap)
            if kill == KILLS // 2:  # the last start only proves the previous kill left nothing in its way
                proc.kill()
                proc.wait()
                break
            before = received
            deadline = time.monotonic() + rng.uniform(0.3, 1.2)
            while time.monotonic() < deadline:
                select.select([receiver], [], [], 0.05)
                try:
                    while True:
                        assert receiver.recv(2048).startswith(b"seq ")
                        received += 1
                except BlockingIOError:
                    pass
            assert received > before, "no datagram reached the host over the TAP"
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            deadline = time.monotonic() + 5  # the kernel deletes a TAP when its last fd closes
            while link_exists(tap) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not link_exists(tap), f"TAP {tap} outlived the killed VMM"
            assert list_sockets(control_dir) == []  # the dead VMM's control socket is not listed...
            assert os.listdir(control_dir) == []  # ...and list_sockets removed its file
    finally:
        receiver.close()
    assert received > 0
