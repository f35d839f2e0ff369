"""Processes tests/integration/test_faults.py kills with SIGKILL at random points.

    python tests/fault_worker.py blk IMAGE SEED
        A host-side virtio driver (tests/virtio_driver.py) writes rounds of
        sectors through a real BlockDevice and MmioTransport, FLUSHes after
        each round and prints "flushed R" once the device returned the flush.
    python tests/fault_worker.py net TAP HOST_ADDR PORT UDS CONTROL_DIR
        A virtio-net device on a real TAP (with an I/O thread), a userspace
        vsock device listening on UDS and a `kvmpy stat` control socket, as
        a VMM has them; the driver sends numbered UDP datagrams to
        HOST_ADDR:PORT through the TX queue, printing "sent N" now and then.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kvmpy.devices.virtio.blk import BlkStatus, BlockDevice, RequestType  # noqa: E402
from kvmpy.devices.virtio.iothread import IoThread  # noqa: E402
from kvmpy.devices.virtio.mmio import MmioTransport  # noqa: E402
from kvmpy.memory import GuestMemory  # noqa: E402

from virtio_driver import Driver  # noqa: E402

SECTOR = 512
SECTORS = 256  # the image blk_burst() writes over
PER_ROUND = 8  # requests per round, each 1-4 sectors


def sector_data(round_: int, sector: int) -> bytes:
    """What round `round_` writes to `sector`: a tag the checker can read back, then filler."""
    tag = struct.pack("<II", round_, sector)
    return (tag + hashlib.sha256(tag).digest()[:24]) * (SECTOR // 32)


def rounds(seed: int):
    """Round r's writes: (first sector, count) pairs, the same for the worker and the checker."""
    rng = random.Random(seed)
    r = 0
    while True:
        r += 1
        yield r, [(s, min(rng.randint(1, 4), SECTORS - s)) for s in
                  (rng.randrange(SECTORS) for _ in range(PER_ROUND))]


def _request(q, mark, rtype: int, sector: int = 0, data: bytes = b"") -> int:
    header = struct.pack("<IIQ", rtype, 0, sector)
    ids = q.free[:3 if data else 2]  # the descriptors add() takes
    head, addrs = q.add([header] + ([data] if data else []), [1])
    used = []
    while not used:
        used = q.used_entries()
    status = q.memory.read_u8(addrs[-1])
    q.free.extend(ids)
    q.alloc.next = mark  # the buffers are free again
    return status


def blk(image: str, seed: int) -> None:
    with GuestMemory(4 << 20) as mem:
        dev = BlockDevice(image)
        drv = Driver(MmioTransport(dev, mem), mem)
        drv.setup(queue_size=64)
        q = drv.queues[0]
        mark = q.alloc.next
        for r, writes in rounds(seed):
            for first, count in writes:
                data = b"".join(sector_data(r, s) for s in range(first, first + count))
                assert _request(q, mark, RequestType.OUT, first, data) == BlkStatus.OK
            assert _request(q, mark, RequestType.FLUSH) == BlkStatus.OK
            os.write(1, f"flushed {r}\n".encode())


def _checksum(data: bytes) -> int:
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def udp_frame(src_mac: bytes, src: str, dst: str, port: int, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", 40000, port, 8 + len(payload), 0) + payload  # checksum 0: none (IPv4)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return b"\xff" * 6 + src_mac + b"\x08\x00" + ip + udp


def net(tap_name: str, host_address: str, port: int, uds: str, control_dir: str) -> None:
    from kvmpy.devices.virtio.net import NET_HDR_SIZE, NetDevice
    from kvmpy.devices.virtio.vsock import VsockDevice
    from kvmpy.net.tap import Tap
    from kvmpy.stats.control import ControlServer

    class Source:
        def stats_snapshot(self) -> dict:
            return {"fault-worker": True}

    mac = bytes.fromhex("525400fa0001")
    host_ip = host_address.split("/")[0]
    guest_ip = host_ip.rsplit(".", 1)[0] + ".2"
    with GuestMemory(8 << 20) as mem:
        io = IoThread()
        tap = Tap(tap_name, host_address=host_address)
        dev = NetDevice(tap.fd, mac.hex(":"), owner=tap)
        drv = Driver(MmioTransport(dev, mem), mem)
        dev.start_io(io)
        vsock = VsockDevice(uds, 3)
        vsock_mem = GuestMemory(1 << 20)
        MmioTransport(vsock, vsock_mem)
        vsock.start_io(io)
        io.start()
        control = ControlServer(Source(), name="faultnet", directory=control_dir)
        drv.setup(queue_size=64)
        tx = drv.queues[1]
        mark = tx.alloc.next
        os.write(1, f"ready {control.path}\n".encode())
        n = 0
        while True:
            n += 1
            frame = udp_frame(mac, guest_ip, host_ip, port, f"seq {n}".encode().ljust(1024, b"."))
            ids = tx.free[:2]
            tx.add([bytes(NET_HDR_SIZE), frame])
            while not tx.used_entries():
                time.sleep(0.0005)
            tx.free.extend(ids)
            tx.alloc.next = mark
            if n % 50 == 0:
                os.write(1, f"sent {n}\n".encode())


# -- the killing side (tests/integration/test_faults.py, scripts/faults.py) ----------------------

WORKER = Path(__file__).resolve()


def spawn(*args: str):
    import subprocess

    return subprocess.Popen([sys.executable, str(WORKER), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def lines_until_killed(proc, delay: float) -> list[str]:
    """Read the worker's lines for `delay` seconds, SIGKILL it, and return every line it printed."""
    import select
    import signal

    out = b""
    deadline = time.monotonic() + delay
    while time.monotonic() < deadline and proc.poll() is None:
        if select.select([proc.stdout], [], [], 0.05)[0]:
            out += os.read(proc.stdout.fileno(), 65536)
    if proc.poll() is not None:
        raise RuntimeError(f"the worker died by itself: {proc.stderr.read().decode()}")
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
    return last


def round_on_disk(data: bytes, sector: int) -> int:
    """Which round's data `sector` holds (0: never written); -1 if it is no round's (torn, misplaced)."""
    if data == bytes(SECTOR):
        return 0
    r, s = struct.unpack("<II", data[:8])
    return r if s == sector and data == sector_data(r, sector) else -1


def blk_kill_trial(image: Path, seed: int, delay: float) -> tuple[int, list[str]]:
    """Zero `image`, run the blk worker, SIGKILL it after `delay` s; (rounds flushed, problems found)."""
    image.write_bytes(bytes(SECTORS * SECTOR))
    lines = lines_until_killed(spawn("blk", str(image), str(seed)), delay)
    flushed = max((int(line.split()[1]) for line in lines if line.startswith("flushed ")), default=0)
    expected = expected_after(seed, flushed)
    data = image.read_bytes()
    problems = []
    for sector in range(SECTORS):
        got = round_on_disk(data[sector * SECTOR:(sector + 1) * SECTOR], sector)
        # a later round may have landed (written, not yet flushed); an earlier one is a lost write
        if got < expected.get(sector, 0):
            problems.append(f"sector {sector}: round {got} on disk, round {expected.get(sector)} was flushed")
    return flushed, problems


def net_kill_trials(kills: int, rng: random.Random, tmp: Path) -> dict:
    """Start the net worker, let it send for a random while, SIGKILL it; `kills` times, then start it once more.

    Each start must succeed with the same TAP name, vsock socket path and
    control directory: a TAP, socket or lock left by the killed one would
    be in its way. After each kill: the TAP is gone within 5 s, and the
    dead worker's control socket is neither listed nor left on disk.
    """
    import select
    import signal

    from kvmpy.net.tap import link_exists
    from kvmpy.stats.control import list_sockets, query

    tap = f"kvmpyf{os.getpid() % 100000}"
    host = f"172.31.{200 + os.getpid() % 50}.1/24"
    uds = str(tmp / "vsock.sock")
    control_dir = tmp / "control"
    control_dir.mkdir(mode=0o700, exist_ok=True)
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("0.0.0.0", 0))
    receiver.setblocking(False)
    port = receiver.getsockname()[1]
    stats = {"kills": 0, "starts": 0, "datagrams": 0, "problems": []}
    try:
        for kill in range(kills + 1):
            proc = spawn("net", tap, host, str(port), uds, str(control_dir))
            ready = proc.stdout.readline().decode()
            if not ready.startswith("ready "):
                stats["problems"].append(f"start {kill}: {proc.stderr.read().decode().strip()[-300:]}")
                proc.kill()
                proc.wait()
                break
            stats["starts"] += 1
            if query(ready.split()[1]).get("fault-worker") is not True or not link_exists(tap):
                stats["problems"].append(f"start {kill}: no control socket answer or no TAP")
            if kill == kills:  # the last start only proves the previous kill left nothing in its way
                proc.kill()
                proc.wait()
                break
            before = stats["datagrams"]
            deadline = time.monotonic() + rng.uniform(0.3, 1.2)
            while time.monotonic() < deadline:
                select.select([receiver], [], [], 0.05)
                try:
                    while True:
                        if receiver.recv(2048).startswith(b"seq "):
                            stats["datagrams"] += 1
                except BlockingIOError:
                    pass
            if stats["datagrams"] == before:
                stats["problems"].append(f"kill {kill}: no datagram reached the host over the TAP")
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            stats["kills"] += 1
            deadline = time.monotonic() + 5  # the kernel deletes a TAP when its last fd closes
            while link_exists(tap) and time.monotonic() < deadline:
                time.sleep(0.05)
            if link_exists(tap):
                stats["problems"].append(f"kill {kill}: TAP {tap} outlived the killed VMM")
            if list_sockets(control_dir) != [] or os.listdir(control_dir) != []:
                stats["problems"].append(f"kill {kill}: the dead VMM's control socket is still there")
    finally:
        receiver.close()
    return stats


if __name__ == "__main__":
    if sys.argv[1] == "blk":
        blk(sys.argv[2], int(sys.argv[3]))
    else:
        net(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6])
