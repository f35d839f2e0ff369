"""`kvmpy lab interrupts`: every injection reaches its handler; exits and EOIs per interrupt, counted exactly."""

from __future__ import annotations

import pytest

from kvmpy.lab import LABS
from kvmpy.lab.report import LabResult

IRQCHIP = ["IOAPIC pin (KVM_IRQ_LINE)", "MSI (KVM_SIGNAL_MSI)", "irqfd (eventfd write)", "NMI (KVM_NMI)"]
USERSPACE = "KVM_INTERRUPT at the interrupt window (no irqchip)"


@pytest.fixture(scope="module")
def result(kvm) -> LabResult:
    return LABS["interrupts"].run(kvm, quick=True)


def test_table_has_a_row_per_injection_kind(result: LabResult) -> None:
    t = result.tables[0]
    assert t.column("injection") == IRQCHIP + [USERSPACE]
    assert len(t.columns) == 11


@pytest.mark.parametrize("name", IRQCHIP + [USERSPACE])
def test_every_injection_ran_its_handler_once(result: LabResult, name: str) -> None:
    count = result.series["count"]
    row = result.tables[0].row(name)
    assert row["injected"] == row["handler runs"] == count
    assert len(result.series["methods"][name]["latencies_ns"]) == count
    assert not any(n.startswith("unexpected vectors") for n in result.notes)


@pytest.mark.parametrize("name", IRQCHIP)
def test_in_kernel_irqchip_costs_one_exit_per_interrupt_the_handlers_report(result: LabResult, name: str) -> None:
    assert result.series["methods"][name]["exits"] == result.series["count"]


def test_userspace_irqchip_costs_window_report_and_eoi_exits(result: LabResult) -> None:
    assert result.series["methods"][USERSPACE]["exits"] == 3 * result.series["count"]


def test_eoi_reaches_kvmpy_only_without_an_in_kernel_lapic(result: LabResult) -> None:
    assert result.series["eois"] == {"irqchip": 0, "userspace": result.series["count"]}


def test_plot_writes_the_labs_pngs(result: LabResult, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    paths = LABS["interrupts"].plot(result, tmp_path)
    assert paths and all(p.parent == tmp_path and p.read_bytes()[:4] == b"\x89PNG" for p in paths)
