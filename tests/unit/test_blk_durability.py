"""Durability of virtio-blk FLUSH, proved by the order of system calls (strace), not by surviving SIGKILL.

Killing the VMM does not drop the host's page cache, so "the data is in
the file after SIGKILL" holds with or without fdatasync and proves
nothing. What a FLUSH must guarantee is an order: the guest's data
reaches the disk (fdatasync) before the guest is told the flush
completed; for qcow2 also data and refcounts before the L2 entries that
point to them, L2 tables before the L1 entry, each separated by an
fdatasync. A child process drives the real device through the transport
like a guest driver, under `strace -f -y`; its used-buffer interrupt is
an eventfd write, so the moment the guest would learn of the completion
is a system call in the same trace. The checker is run on the real
device and on deliberately broken ones (fdatasync removed; qcow2's
ordered flush collapsed into one final fdatasync), and must fail those.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvmpy.storage import create_qcow2, open_image
from kvmpy.storage.qcow2 import L1E_OFFSET_MASK, L2E_OFFSET_MASK, RT_OFFSET_MASK

from storage_helpers import assert_clean, needs_qemu_img

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_SECTOR = 3
PAYLOAD = b"durable!" * 64

pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed (install-deps.sh)")

BREAKAGES = {
    "none": "",
    "no_fdatasync": "os.fdatasync = lambda fd: None",
    # Same writes in the same order, but one fdatasync at the end: nothing orders data before metadata.
    "one_sync": textwrap.dedent("""
        from kvmpy.storage.qcow2 import Qcow2Image
        _orig = Qcow2Image.flush
        def _flush(self):
            real, os.fdatasync = os.fdatasync, lambda fd: None
            try:
                _orig(self)
            finally:
                os.fdatasync = real
            os.fdatasync(self.fd)
        Qcow2Image.flush = _flush
    """),
}


@dataclass
class Event:
    kind: str          # "write" (to the image), "sync" (fdatasync/fsync of the image), "irq" (eventfd write)
    offset: int = 0
    length: int = 0


def run_traced(tmp_path: Path, image: Path, breakage: str, write_through: bool = False) -> list[Event]:
    """OUT of PAYLOAD at DATA_SECTOR, then FLUSH, through the real device in a child under strace; then SIGKILL.

    `write_through`: the driver does not negotiate VIRTIO_BLK_F_FLUSH and sends the OUT only."""
    drop = "VIRTIO_F_EVENT_IDX | (VIRTIO_BLK_F_FLUSH if WT else 0)"
    script = "\n".join([
        "import os, signal, struct, sys",
        f"sys.path[:0] = [{ROOT!r}, {TESTS!r}]",
        BREAKAGES[breakage],
        textwrap.dedent(f"""
            from kvmpy.memory import GuestMemory
            from kvmpy.devices.virtio.blk import BlockDevice, VIRTIO_BLK_F_FLUSH
            WT = {write_through}
            from kvmpy.devices.virtio.mmio import MmioTransport, VIRTIO_F_EVENT_IDX
            from virtio_driver import Driver
            efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            mem = GuestMemory(1 << 20)
            dev = BlockDevice({str(image)!r})
            t = MmioTransport(dev, mem, lambda: os.eventfd_write(efd, 1))
            d = Driver(t, mem)
            d.setup(features=d.device_features() & ~({drop}))  # an interrupt per request
            q = d.queues[0]
            q.add([struct.pack("<IIQ", 1, 0, {DATA_SECTOR}), {PAYLOAD!r}], [1])
            if not WT:
                q.add([struct.pack("<IIQ", 4, 0, 0)], [1])
            assert len(q.used_entries()) == (1 if WT else 2)
            os.kill(os.getpid(), signal.SIGKILL)
        """)])
    trace = tmp_path / f"trace-{breakage}-{write_through}.txt"
    proc = subprocess.run(["strace", "-f", "-qq", "-y", "-s", "0", "-o", str(trace),
                           "-e", "trace=pwrite64,pwritev,pwritev2,write,fdatasync,fsync",
                           sys.executable, "-c", script], capture_output=True, timeout=120)
    if b"ptrace" in proc.stderr and b"Operation not permitted" in proc.stderr:
        pytest.skip(f"strace cannot trace here: {proc.stderr.decode().strip()}")
    assert proc.returncode in (-9, 137), proc.stderr.decode()
    return parse_trace(trace.read_text(), image)


def parse_trace(text: str, image: Path) -> list[Event]:
    name = re.escape(str(image.resolve()))
    events = []
    for line in text.splitlines():
        if m := re.search(rf"\b(fdatasync|fsync)\(\d+<{name}>\) = 0", line):
            events.append(Event("sync"))
        elif m := re.search(rf"\bpwrite64\(\d+<{name}>, .*, (\d+), (\d+)\) = \d+", line):
            events.append(Event("write", int(m[2]), int(m[1])))
        elif m := re.search(rf"\bpwritev2?\(\d+<{name}>, \[(.*)\], \d+, (\d+)(?:, \d+)?\) = (\d+)", line):
            events.append(Event("write", int(m[2]), int(m[3])))
        elif re.search(r"\bwrite\(\d+<anon_inode:\[eventfd\]>", line):
            events.append(Event("irq"))
    return events


def writes_to(events: list[Event], start: int, length: int) -> list[int]:
    return [i for i, e in enumerate(events) if e.kind == "write" and e.offset < start + length
            and start < e.offset + e.length]


def synced_between(events: list[Event], i: int, j: int) -> bool:
    return any(e.kind == "sync" for e in events[i + 1:j])


def flush_irq(events: list[Event]) -> int:
    """The interrupt that tells the guest its data is durable: FLUSH's (or, write-through, the OUT's)."""
    irqs = [i for i, e in enumerate(events) if e.kind == "irq"]
    assert len(irqs) in (1, 2), f"expected an interrupt per request: {events}"
    return irqs[-1]


def check_raw(events: list[Event]) -> None:
    done = flush_irq(events)
    data = writes_to(events, DATA_SECTOR * 512, len(PAYLOAD))
    assert data and data[-1] < done, "the data write must come before the FLUSH completes"
    assert synced_between(events, data[-1], done), "no fdatasync between the data write and FLUSH completion"


def check_qcow2(events: list[Event], image: Path) -> None:
    with open_image(image, readonly=True) as img:
        cs = img.cluster_size
        l2_off = img.l1[0] & L1E_OFFSET_MASK
        host = img.l2_entry(DATA_SECTOR * 512 // cs) & L2E_OFFSET_MASK
        blocks = [e & RT_OFFSET_MASK for e in img.rc_table if e & RT_OFFSET_MASK]
        l1_off, l1_len = img.l1_offset, 8 * len(img.l1)
    done = flush_irq(events)
    data = writes_to(events, host + DATA_SECTOR * 512 % cs, len(PAYLOAD))
    refcounts = [i for b in blocks for i in writes_to(events, b, cs)]
    l2 = writes_to(events, l2_off, cs)
    l1 = writes_to(events, l1_off, l1_len)
    assert data and refcounts and l2 and l1, f"missing writes (data {data}, refcounts {refcounts}, L2 {l2}, L1 {l1})"
    assert max(data) < min(l2) and synced_between(events, max(data), min(l2)), \
        "guest data not synced before the L2 entry pointing to it"
    assert max(refcounts) < min(l2) and synced_between(events, max(refcounts), min(l2)), \
        "refcounts not synced before the L2 entry that uses the cluster"
    assert max(l2) < min(l1) and synced_between(events, max(l2), min(l1)), "L2 table not synced before the L1 entry"
    assert max(l1) < done and synced_between(events, max(l1), done), "metadata not synced before FLUSH completion"


def test_raw_flush_syncs_before_completion(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(64 * 512))
    check_raw(run_traced(tmp_path, img, "none"))
    assert img.read_bytes()[DATA_SECTOR * 512:DATA_SECTOR * 512 + len(PAYLOAD)] == PAYLOAD


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_write_through_without_flush_feature_syncs_each_out(tmp_path, fmt):
    if fmt == "raw":
        img = tmp_path / "d.img"
        img.write_bytes(bytes(64 * 512))
        check_raw(run_traced(tmp_path, img, "none", write_through=True))
        with pytest.raises(AssertionError, match="no fdatasync"):
            check_raw(run_traced(tmp_path, img, "no_fdatasync", write_through=True))
    else:
        img = create_qcow2(tmp_path / "d.qcow2", 1 << 20)
        check_qcow2(run_traced(tmp_path, img, "none", write_through=True), img)


def test_raw_check_fails_without_fdatasync(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(64 * 512))
    events = run_traced(tmp_path, img, "no_fdatasync")
    with pytest.raises(AssertionError, match="no fdatasync"):
        check_raw(events)


@needs_qemu_img
def test_qcow2_flush_orders_data_refcounts_l2_l1(tmp_path):
    img = create_qcow2(tmp_path / "d.qcow2", 1 << 20)
    check_qcow2(run_traced(tmp_path, img, "none"), img)
    assert_clean(img)  # killed right after the FLUSH: the image on disk is consistent
    with open_image(img, readonly=True) as i:
        assert i.read(DATA_SECTOR * 512, len(PAYLOAD)) == PAYLOAD


@pytest.mark.parametrize("breakage", ["no_fdatasync", "one_sync"])
def test_qcow2_check_fails_on_a_broken_flush(tmp_path, breakage):
    img = create_qcow2(tmp_path / "d.qcow2", 1 << 20)
    events = run_traced(tmp_path, img, breakage)
    with pytest.raises(AssertionError, match="not synced"):
        check_qcow2(events, img)
