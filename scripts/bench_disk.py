#!/usr/bin/env python3
"""virtio-blk on raw vs qcow2 vs a qcow2 overlay, and kvmpy's qcow2 vs QEMU's, in one run.

Part 1 drives the real `BlockDevice` through its virtio-mmio transport
from the host side, as a guest driver would (rings in a `GuestMemory`,
QueueNotify register writes, used-buffer interrupts counted): batches of
requests are published, one notify per batch, the used ring drained.
The same disk size and request pattern on each format; ratios are to raw:

    seq write 64k   sequential OUT of 64 KiB over the whole disk (qcow2: allocating); a FLUSH
                    follows, outside the timing (the host disk's sync dominates and is noise)
    seq read 64k    sequential IN of 64 KiB
    rand read 4k    IN of 4 KiB at random sectors (4 KiB aligned)
    rand write 4k   OUT of 4 KiB at random places (overwrites: allocated by then), FLUSH untimed

"notifies/req" and "irqs/req" are what a guest would pay in exits and
interrupts per request: they depend on the virtio transport, not the image
format, so equal numbers across formats mean qcow2 costs host CPU only.
The overlay's base is a raw file of the same size with data in it.

Part 2 is the reference: kvmpy's `Qcow2Image` (no device) against
`qemu-img bench` (QEMU's block layer, writeback cache, queue depth 1)
doing the same I/O on the same kind of fresh image: sequential 64 KiB
writes over the whole disk ending with one flush, then sequential 64 KiB
reads (from the page cache, for both). qemu-img is a
test/benchmark tool here only; kvmpy does not use it.

    .venv/bin/python scripts/bench_disk.py [--mib 64] [--repeat 3] [--write-docs]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from kvmpy.devices.virtio.blk import BlockDevice  # noqa: E402
from kvmpy.devices.virtio.mmio import VIRTIO_F_EVENT_IDX, MmioTransport  # noqa: E402
from kvmpy.memory import GuestMemory  # noqa: E402
from kvmpy.storage import create_overlay, create_qcow2, open_image  # noqa: E402

from virtio_driver import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, Driver  # noqa: E402

SECTION = "## Disk formats (scripts/bench_disk.py)"
BATCH = 64          # requests per notify: 3 descriptors each in a 256-entry queue
MEM = 16 << 20
BUF_BASE = 4 << 20  # data buffers from here; rings below


class HostDriver:
    """Fixed descriptors and buffers reused batch after batch (tests/virtio_driver.py's driver does not free)."""

    def __init__(self, dev: BlockDevice, mem: GuestMemory) -> None:
        self.irqs = 0
        self.notifies = 0
        self.t = MmioTransport(dev, mem, self._irq)
        d = Driver(self.t, mem)
        d.setup(features=d.device_features() & ~VIRTIO_F_EVENT_IDX, queue_size=256)  # an irq per used batch
        self.q = d.queues[0]
        self.mem = mem
        self.requests = 0

    def _irq(self) -> None:
        self.irqs += 1

    def batch(self, reqs: list[tuple[int, int, int]]) -> None:
        """reqs: (type, sector, length); one notify for the whole batch, then the used ring drained."""
        q, mem = self.q, self.mem
        for k, (rtype, sector, length) in enumerate(reqs):
            hdr = 0x8000 + 32 * k
            status = 0xC000 + k
            buf = BUF_BASE + k * (64 << 10)
            mem.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
            i = 3 * k
            if length:
                q.write_desc(q.desc, i, hdr, 16, VIRTQ_DESC_F_NEXT, i + 1)
                q.write_desc(q.desc, i + 1, buf, length, VIRTQ_DESC_F_NEXT | (VIRTQ_DESC_F_WRITE if rtype == 0 else 0),
                             i + 2)
            else:
                q.write_desc(q.desc, i, hdr, 16, VIRTQ_DESC_F_NEXT, i + 2)
            q.write_desc(q.desc, i + 2, status, 1, VIRTQ_DESC_F_WRITE, 0)
            q.publish(i)
        q.kick()
        self.notifies += 1
        used = q.used_entries()
        assert len(used) == len(reqs), (len(used), len(reqs))
        for k in range(len(reqs)):
            assert mem.read_u8(0xC000 + k) == 0, f"request {k} failed"
        self.requests += len(reqs)


def run_pattern(dev: BlockDevice, mem: GuestMemory, pattern: str, size: int,
                rng: random.Random) -> tuple[float, float, float]:
    """(MiB/s, notifies per request, interrupts per request) for one pattern."""
    drv = HostDriver(dev, mem)
    mem.write(BUF_BASE, os.urandom(BATCH * (64 << 10)))
    if pattern.startswith("seq"):
        length = 64 << 10
        offsets = list(range(0, size, length))
    else:
        length = 4096
        offsets = [rng.randrange(size // 4096) * 4096 for _ in range(min(4096, size // 4096))]
    rtype = 1 if "write" in pattern else 0
    t0 = time.perf_counter()
    for i in range(0, len(offsets), BATCH):
        drv.batch([(rtype, off // 512, length) for off in offsets[i:i + BATCH]])
    dt = time.perf_counter() - t0
    if rtype == 1:
        drv.batch([(4, 0, 0)])  # outside the timing: the host disk's sync time is noise shared by all formats
    nreq = drv.requests
    return len(offsets) * length / dt / (1 << 20), drv.notifies / nreq, drv.irqs / nreq


PATTERNS = ("seq write 64k", "seq read 64k", "rand read 4k", "rand write 4k")


def device_part(size: int, repeat: int) -> dict[tuple[str, str], list[tuple[float, float, float]]]:
    results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    with GuestMemory(MEM) as mem:
        for r in range(repeat):
            with tempfile.TemporaryDirectory(prefix="kvmpy-bench-disk-") as d:
                d = Path(d)
                raw = d / "disk.raw"
                with open(raw, "wb") as f:
                    f.truncate(size)
                base = d / "base.raw"
                base.write_bytes(os.urandom(size))
                create_qcow2(d / "disk.qcow2", size)
                # each device is made when its turn comes; the paths are bound now (B023)
                makers = {"raw": partial(BlockDevice, raw), "qcow2": partial(BlockDevice, d / "disk.qcow2"),
                          "overlay": lambda base=base, d=d: BlockDevice(create_overlay(base, d / "ov.qcow2"))}
                order = list(makers)
                if r % 2:
                    order.reverse()  # alternate, so a shared host's drift hits all alike
                for fmt in order:
                    dev = makers[fmt]()
                    try:
                        rng = random.Random(7)
                        for p in PATTERNS:
                            results.setdefault((fmt, p), []).append(run_pattern(dev, mem, p, size, rng))
                    finally:
                        dev.close()
    return results


def qemu_bench(path: Path, write: bool, count: int) -> float:
    cmd = ["qemu-img", "bench", "-f", "qcow2", "-t", "writeback", "-d", "1", "-s", "65536", "-c", str(count)]
    if write:
        cmd += ["-w", "--pattern=0x5a", f"--flush-interval={count}"]  # one flush at the end, as kvmpy's timing has
    out = subprocess.run(cmd + [str(path)], capture_output=True, text=True, timeout=600, check=True).stdout
    m = re.search(r"Run completed in ([0-9.]+) seconds", out)
    assert m, out
    return float(m[1])


def kvmpy_bench(path: Path, write: bool, count: int) -> float:
    buf = bytearray(b"\x5a" * 65536)
    with open_image(path, readonly=not write) as img:
        t0 = time.perf_counter()
        for i in range(count):
            if write:
                img.write(i * 65536, buf)
            else:
                img.readv(i * 65536, [memoryview(buf)])
        if write:
            img.flush()
        return time.perf_counter() - t0


def reference_part(size: int, repeat: int) -> dict[tuple[str, str], list[float]]:
    count = size // 65536
    out: dict[tuple[str, str], list[float]] = {}
    for r in range(repeat):
        with tempfile.TemporaryDirectory(prefix="kvmpy-bench-disk-") as d:
            for who, bench in ((("kvmpy", kvmpy_bench), ("qemu-img bench", qemu_bench)) if r % 2 == 0
                               else (("qemu-img bench", qemu_bench), ("kvmpy", kvmpy_bench))):
                p = Path(d) / f"{who.split()[0]}.qcow2"
                create_qcow2(p, size)
                for write in (True, False):
                    secs = bench(p, write, count)
                    key = (who, "seq write 64k" if write else "seq read 64k")
                    out.setdefault(key, []).append(size / secs / (1 << 20))
    return out


def render(size: int, repeat: int, dev: dict, ref: dict) -> str:
    med = statistics.median
    lines = [SECTION, "",
             f"Measured {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC on {platform.node()} "
             f"({os.cpu_count()} CPUs, shared), {size >> 20} MiB disk, median of {repeat} runs, "
             f"`scripts/bench_disk.py --mib {size >> 20} --repeat {repeat}`.", "",
             "virtio-blk driven from the host through the real device and transport (batches of "
             f"{BATCH} requests per notify, no EVENT_IDX; FLUSH not timed); ratio = format / raw:", "",
             "| pattern | raw MiB/s | qcow2 MiB/s | qcow2/raw | overlay MiB/s | overlay/raw | notifies/req (all) "
             "| irqs/req raw, qcow2, overlay |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for p in PATTERNS:
        raw = med(x[0] for x in dev[("raw", p)])
        q = med(x[0] for x in dev[("qcow2", p)])
        o = med(x[0] for x in dev[("overlay", p)])
        notif = med(x[1] for x in dev[("raw", p)])
        irqs = ", ".join(f"{med(x[2] for x in dev[(f, p)]):.3f}" for f in ("raw", "qcow2", "overlay"))
        lines.append(f"| {p} | {raw:.0f} | {q:.0f} | {q / raw:.2f} | {o:.0f} | {o / raw:.2f} | {notif:.3f} | {irqs} |")
    lines += ["", "kvmpy's qcow2 (`Qcow2Image`, no device) vs QEMU's (`qemu-img bench -t writeback -d 1 -s 64k`), "
              "the same sequential I/O on a fresh image (writes end with one flush); ratio = kvmpy / QEMU:", "",
              "| pattern | kvmpy MiB/s | qemu-img bench MiB/s | kvmpy/QEMU |", "| --- | ---: | ---: | ---: |"]
    for p in ("seq write 64k", "seq read 64k"):
        k, q = med(ref[("kvmpy", p)]), med(ref[("qemu-img bench", p)])
        lines.append(f"| {p} | {k:.0f} | {q:.0f} | {k / q:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    if shutil.which("qemu-img") is None:
        print("qemu-img not found: install qemu-utils (scripts/install-deps.sh) for the reference", file=sys.stderr)
        return 1
    size = args.mib << 20
    dev = device_part(size, args.repeat)
    ref = reference_part(size, args.repeat)
    text = render(size, args.repeat, dev, ref)
    print(text)
    if args.write_docs:
        from perfdoc import update_section
        update_section(SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
