"""The soak (scripts/soak.py) for 20 seconds: ~50 VMs at once, created and destroyed, plus TAP/blk device cycles."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent / "scripts"))

import soak  # noqa: E402


def test_fifty_concurrent_vms_for_20_seconds_leave_everything_at_baseline():
    r = soak.soak(seconds=20, workers=50, device_threads=2)
    assert r["errors"] == []
    assert r["peak_concurrent_vms"] >= 40, r["peak_concurrent_vms"]
    assert r["vms"] >= 200 and r["guest_faults"] == r["vms"] // 5
    assert r["device_cycles"] > 0
    assert r["leaks"] == [], r["leaks"]
