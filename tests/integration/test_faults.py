"""SIGKILL at random points: what a guest saw flushed is on disk; no TAP, socket or lock outlives the VMM.

The processes killed are tests/fault_worker.py: real devices (BlockDevice on
a raw image; NetDevice on a real TAP with its I/O thread, a userspace vsock
listener, a `kvmpy stat` control socket) driven through MmioTransport by the
host-side virtio driver, as a guest driver would drive them.
"""

from __future__ import annotations

import os
import random

import pytest

from fault_worker import (
    SECTOR,
    SECTORS,
    blk_kill_trial,
    expected_after,
    net_kill_trials,
    round_on_disk,
    rounds,
    sector_data,
)

KILLS = 12  # per test here; scripts/faults.py runs hundreds for docs/reliability.md


def test_sigkill_during_a_write_burst_loses_no_flushed_write(tmp_path):
    rng = random.Random(15)
    for kill in range(KILLS):
        flushed, problems = blk_kill_trial(tmp_path / "burst.img", rng.randrange(1 << 30), rng.uniform(0.4, 1.5))
        assert flushed > 0, "the worker flushed nothing before it was killed: kill later"
        assert problems == [], (kill, problems[:5])


needs_tap = pytest.mark.skipif(not os.access("/dev/net/tun", os.R_OK | os.W_OK) or os.geteuid() != 0,
                               reason="needs /dev/net/tun and CAP_NET_ADMIN (root)")


@needs_tap
def test_sigkill_during_a_tap_transfer_leaves_nothing_for_the_next_start(tmp_path):
    stats = net_kill_trials(KILLS // 2, random.Random(7), tmp_path)
    assert stats["problems"] == []
    assert stats["kills"] == KILLS // 2 and stats["starts"] == KILLS // 2 + 1 and stats["datagrams"] > 0


def test_the_checker_notices_a_lost_flushed_write(tmp_path):
    """The invariant the kill test relies on fails when a flushed write is missing from the image."""
    seed, flushed = 99, 5
    data = bytearray(SECTORS * SECTOR)
    for r, writes in rounds(seed):
        if r > flushed:
            break
        for first, count in writes:
            for s in range(first, first + count):
                data[s * SECTOR:(s + 1) * SECTOR] = sector_data(r, s)
    expected = expected_after(seed, flushed)
    assert all(round_on_disk(bytes(data[s * SECTOR:(s + 1) * SECTOR]), s) == r for s, r in expected.items())
    lost = min(expected)
    data[lost * SECTOR:(lost + 1) * SECTOR] = sector_data(expected[lost] - 1, lost) if expected[lost] > 1 \
        else bytes(SECTOR)
    assert round_on_disk(bytes(data[lost * SECTOR:(lost + 1) * SECTOR]), lost) < expected[lost]
