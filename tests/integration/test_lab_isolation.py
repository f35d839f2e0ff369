"""`kvmpy lab isolation`: every access outside the guest's memory is an exit the VMM sees, counted exactly."""

from __future__ import annotations

import pytest

from kvmpy.lab import LABS
from kvmpy.lab.isolation import BEYOND, NO_SLOT, PROBES, ROM, UNCLAIMED_PORT
from kvmpy.lab.report import LabResult


@pytest.fixture(scope="module")
def result(kvm) -> LabResult:
    return LABS["isolation"].run(kvm, quick=True)


def test_table_has_a_row_per_probe(result: LabResult) -> None:
    assert result.tables[0].column("probe") == [p.name for p in PROBES]


@pytest.mark.parametrize("name, reason, at", [
    ("load from a GPA with no slot", "MMIO", NO_SLOT),
    ("store to a GPA with no slot", "MMIO", NO_SLOT),
    ("store to a GPA with no slot, from CPL3", "MMIO", NO_SLOT),
    ("store 2 GiB beyond RAM", "MMIO", BEYOND),
    ("store to a read-only slot", "MMIO", ROM),
    ("store to a read-only slot, from CPL3", "MMIO", ROM),
    ("out to a port no device claims", "IO", UNCLAIMED_PORT),
])
def test_each_access_outside_ram_is_one_exit_at_its_address(result: LabResult, name: str, reason: str, at: int) -> None:
    count = result.series["count"]
    row = result.tables[0].row(name)
    assert result.series["probes"][name]["exits"] == {reason: count}
    assert row["VMM bus saw"] == count
    assert row["at"] == f"{at:#x}"


def test_a_read_only_slot_reads_without_exits_and_keeps_its_content(result: LabResult) -> None:
    t = result.tables[0]
    load = t.row("load from a read-only slot")
    assert load["exits to kvmpy"] == 0
    assert load["guest side"] == "read 0x5a5a5a5a5a5a5a5a; slot unchanged (0x5a bytes)"
    for name in ("store to a read-only slot", "store to a read-only slot, from CPL3"):
        assert t.row(name)["guest side"] == "slot unchanged (0x5a bytes)"


def test_the_guest_reads_what_the_vmm_answers(result: LabResult) -> None:
    assert result.tables[0].row("load from a GPA with no slot")["guest side"] == "read 0x0 (the VMM's answer)"


def test_fatal_guests_end_with_an_exit_the_vmm_survives(result: LabResult) -> None:
    assert result.series["fatal"] == {"execute code from a GPA with no slot": "INTERNAL_ERROR",
                                      "triple fault (empty IDT, then ud2)": "SHUTDOWN"}
    assert result.table("guests that end themselves").row("execute code from a GPA with no slot")[
        "guest RIP at the exit"] == f"{NO_SLOT:#x}"
