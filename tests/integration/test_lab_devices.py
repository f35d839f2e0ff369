"""`kvmpy lab devices`: N guest writes per path -> exactly N exits, or none, and the device saw them."""

from __future__ import annotations

import pytest

from kvmpy.lab import LABS
from kvmpy.lab.devices import PATHS, TMICT_VALUE
from kvmpy.lab.report import LabResult


@pytest.fixture(scope="module")
def result(kvm) -> LabResult:
    return LABS["devices"].run(kvm, quick=True)


def test_table_has_a_row_per_path(result: LabResult) -> None:
    t = result.tables[0]
    assert t.column("path") == [p.name for p in PATHS]
    assert len(t.columns) == len(t.rows[0]) == 9


@pytest.mark.parametrize("name, exits, reason", [
    ("port -> kvmpy device", 1, "IO"),
    ("MMIO -> kvmpy device", 1, "MMIO"),
    ("MMIO -> kvmpy device, from CPL3", 1, "MMIO"),
    ("port -> ioeventfd", 0, None),
    ("MMIO -> ioeventfd", 0, None),
    ("MMIO -> ioeventfd, from CPL3", 0, None),
    ("port -> in-kernel PIT", 0, None),
    ("MMIO -> in-kernel LAPIC timer", 0, None),
])
def test_exits_per_write(result: LabResult, name: str, exits: int, reason: str | None) -> None:
    count = result.series["count"]
    path = result.series["paths"][name]
    assert path["exits"] == ({reason: count} if reason else {})
    assert result.tables[0].row(name)["exits to kvmpy"] == exits * count


@pytest.mark.parametrize("name", ["port -> kvmpy device", "MMIO -> kvmpy device", "port -> ioeventfd",
                                  "MMIO -> ioeventfd", "MMIO -> kvmpy device, from CPL3",
                                  "MMIO -> ioeventfd, from CPL3"])
def test_the_device_saw_every_write(result: LabResult, name: str) -> None:
    assert result.series["paths"][name]["device_writes"] == result.series["count"]


def test_in_kernel_devices_took_the_writes(result: LabResult) -> None:
    t = result.tables[0]
    assert t.row("port -> in-kernel PIT")["device saw"] == "PIT channel 0 mode 2, rw_mode 3"
    assert t.row("MMIO -> in-kernel LAPIC timer")["device saw"] == f"LAPIC TMICT {TMICT_VALUE:#x}"


def test_plot_writes_the_labs_pngs(result: LabResult, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    paths = LABS["devices"].plot(result, tmp_path)
    assert paths and all(p.parent == tmp_path and p.read_bytes()[:4] == b"\x89PNG" for p in paths)
