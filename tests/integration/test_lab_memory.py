"""`kvmpy lab memory`: page tables built by the guest, MMU counters, one translation, dirty logging."""

from __future__ import annotations

import pytest

from kvmpy.lab import LABS
from kvmpy.lab.paging import PHASES, ROUNDS
from kvmpy.lab.report import LabResult


@pytest.fixture(scope="module")
def result(kvm) -> LabResult:
    return LABS["memory"].run(kvm, quick=True)


def test_counter_table_has_three_phases_per_configuration(result: LabResult) -> None:
    t = result.tables[0]
    configs = [(s["pages"], s["spaces"]) for s in result.series["sweeps"]]
    assert [(r[0], r[1], r[2]) for r in t.rows] == [(n, k, p) for n, k in configs for p in PHASES]
    for n, k, phase, touches in zip(t.column("N pages"), t.column("K spaces"), t.column("phase"),
                                    t.column("touches")):
        assert touches == {"build tables": 0, "first touch": n * k, "touch again": n * k * (ROUNDS - 1)}[phase]


def test_each_first_touch_of_a_page_is_a_fixed_fault(result: LabResult) -> None:
    for s in result.series["sweeps"]:
        first = s["phases"]["first touch"]["counters"]
        assert first["pf_fixed"] >= s["pages"] * s["spaces"]


def test_touching_mapped_pages_again_needs_no_fault(result: LabResult) -> None:
    for s in result.series["sweeps"]:
        if s["spaces"] == 1:
            assert s["phases"]["touch again"]["counters"]["pf_fixed"] == 0


def test_dirty_log_names_exactly_the_pages_written(result: LabResult) -> None:
    t = result.table("dirty-page logging")
    for written, dirty, again in zip(t.column("pages written"), t.column("dirty after the run"),
                                     t.column("dirty on the next call")):
        assert dirty == written
        assert again == 0  # KVM_GET_DIRTY_LOG clears what it reported


def test_kvmpy_walk_and_kvm_translate_agree(result: LabResult) -> None:
    t = result.table("GVA ")
    steps = t.column("step")
    assert steps[:4] == ["PML4 (GVA bits 47..39)", "PDPT (GVA bits 38..30)", "PD (GVA bits 29..21)",
                         "PT (GVA bits 20..12)"]
    walk, kvm = t.row("+ offset (GVA bits 11..0)")["gives"], t.row("KVM_TRANSLATE")["gives"]
    assert walk == kvm and walk.startswith("GPA 0x")
    assert t.row("host byte at the page's HVA")["gives"] == 1  # the byte the guest wrote, read at the HVA


def test_plot_writes_the_labs_pngs(result: LabResult, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    paths = LABS["memory"].plot(result, tmp_path)
    assert paths and all(p.parent == tmp_path and p.read_bytes()[:4] == b"\x89PNG" for p in paths)
