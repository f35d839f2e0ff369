"""`kvmpy lab privilege`: which instructions exit at CPL0 and CPL3, counted exactly (timings not checked)."""

from __future__ import annotations

import pytest

from kvmpy.lab import LABS
from kvmpy.lab.privilege import PROBES
from kvmpy.lab.report import LabResult


@pytest.fixture(scope="module")
def result(kvm) -> LabResult:
    return LABS["privilege"].run(kvm, quick=True)


def _row(result: LabResult, name: str, cpl: int) -> dict:
    t = result.tables[0]
    for r in t.rows:
        if r[0] == name and r[1] == cpl:
            return dict(zip(t.columns, r))
    raise KeyError((name, cpl))


def test_table_has_a_row_per_instruction_and_cpl(result: LabResult) -> None:
    t = result.tables[0]
    assert [(r[0], r[1]) for r in t.rows] == [(p.name, cpl) for p in PROBES for cpl in (0, 3)]
    assert t.columns[:6] == ["instruction", "CPL", "executed", "exits to kvmpy", "KVM exits", "guest #GP"]
    count = result.series["count"]
    assert set(t.column("executed")) == {count}


@pytest.mark.parametrize("name", ["hlt", "out (port 0x80)", "in (port 0x80)", "wrmsr (filtered MSR)"])
def test_at_cpl0_each_execution_is_one_exit_to_kvmpy(result: LabResult, name: str) -> None:
    row = _row(result, name, 0)
    assert row["exits to kvmpy"] == result.series["count"]
    assert row["guest #GP"] == 0
    assert row["KVM exits"] >= row["exits to kvmpy"]  # every userspace exit is a KVM exit first


@pytest.mark.parametrize("name", ["hlt", "out (port 0x80)", "in (port 0x80)", "rdmsr IA32_APIC_BASE",
                                  "wrmsr (filtered MSR)", "mov to cr3", "invlpg", "cli"])
def test_at_cpl3_privileged_instructions_fault_to_the_guest_kernel_not_the_vmm(result: LabResult, name: str) -> None:
    row = _row(result, name, 3)
    assert row["guest #GP"] == result.series["count"]
    assert row["exits to kvmpy"] == 0
    assert row["what happened"] == "#GP to the guest kernel"


@pytest.mark.parametrize("name", ["loop only (baseline)", "cpuid", "rdtsc", "pause", "rdmsr IA32_APIC_BASE",
                                  "mov to cr3", "invlpg", "cli"])
def test_instructions_kvm_handles_never_reach_kvmpy_at_cpl0(result: LabResult, name: str) -> None:
    row = _row(result, name, 0)
    assert row["exits to kvmpy"] == 0 and row["guest #GP"] == 0


@pytest.mark.parametrize("name", ["cpuid", "rdtsc", "pause"])
def test_unprivileged_instructions_run_at_cpl3_without_a_fault(result: LabResult, name: str) -> None:
    row = _row(result, name, 3)
    assert row["guest #GP"] == 0 and row["exits to kvmpy"] == 0


def test_userspace_exits_are_of_the_instructions_kind(result: LabResult) -> None:
    probes = result.series["probes"]
    assert probes["hlt"]["0"]["userspace_exits"] == {"HLT": result.series["count"]}
    assert probes["out (port 0x80)"]["0"]["userspace_exits"] == {"IO": result.series["count"]}
    assert probes["wrmsr (filtered MSR)"]["0"]["userspace_exits"] == {"X86_WRMSR": result.series["count"]}


def test_compute_loop_runs_at_both_levels(result: LabResult) -> None:
    t = result.table("the same compute loop")
    assert t.column("where") == ["guest user mode (CPL3)", "guest kernel (CPL0)"]
    assert all(s > 0 for s in t.column("ns/iteration"))
    assert any(n.startswith("backend: ") for n in result.notes)


def test_plot_writes_the_labs_pngs(result: LabResult, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    paths = LABS["privilege"].plot(result, tmp_path)
    assert paths and all(p.parent == tmp_path and p.read_bytes()[:4] == b"\x89PNG" for p in paths)
