"""Property-based fuzzing of every virtio device through its MMIO transport (tests/virtio_fuzz.py).

The suite runs a short profile; `make fuzz` runs the long one (at least
10,000 programs per device): the hypothesis profile is chosen by
KVMPY_FUZZ_PROFILE ("suite", default, or "fuzz"); KVMPY_FUZZ_MIN_OPS sets
the shortest program (default 1), KVMPY_FUZZ_EXAMPLES the long run's
programs per device (default 10,000). Each example is one
hostile program against a fresh device; the invariants are checked after
every operation and the device must recover after a reset.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings

from virtio_fuzz import KINDS, Rig, Setup, programs

settings.register_profile("suite", max_examples=100, deadline=None, derandomize=False,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("fuzz", max_examples=int(os.environ.get("KVMPY_FUZZ_EXAMPLES", "10000")), deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = os.environ.get("KVMPY_FUZZ_PROFILE", "suite")
CASES: dict[str, int] = {}
OPERATIONS: dict[str, int] = {}


@pytest.mark.parametrize("kind", KINDS)
def test_hostile_driver_cannot_crash_or_escape_the_device(kind, tmp_path_factory):
    @settings(settings.get_profile(PROFILE))
    @given(programs(kind))
    def run(program):
        start_ok, ops = program
        rig = Rig(kind, str(tmp_path_factory.mktemp(kind)))
        try:
            if start_ok:
                rig.apply(Setup(features=rig.t.device_features))
            for op in ops:
                rig.apply(op)
            rig.recover()
        finally:
            rig.close()
        CASES[kind] = CASES.get(kind, 0) + 1
        OPERATIONS[kind] = OPERATIONS.get(kind, 0) + len(ops)

    run()
    report = os.environ.get("KVMPY_FUZZ_REPORT")
    if report:
        with open(report, "a") as f:
            f.write(f"{kind}: {CASES[kind]} programs, {OPERATIONS[kind]} operations\n")
    assert CASES[kind] >= settings.get_profile(PROFILE).max_examples // 2
