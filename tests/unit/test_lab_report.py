"""The labs' result records, registry, page walk and plots, without /dev/kvm."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvmpy.lab import LABS
from kvmpy.lab import cli as lab_cli
from kvmpy.lab.paging import USER_VA, walk_steps
from kvmpy.lab.plots import bar_chart, histograms, line_chart
from kvmpy.lab.report import LabResult, LabTable, format_cell, to_json
from kvmpy.memory import GuestMemory

ROOT = Path(__file__).resolve().parents[2]


def test_a_row_must_fill_every_column() -> None:
    t = LabTable("t", ["a", "b"])
    t.add(1, 2)
    with pytest.raises(ValueError, match="row of 3 cells for 2 columns"):
        t.add(1, 2, 3)
    assert t.row(1) == {"a": 1, "b": 2}
    assert t.column("b") == [2]


def test_cells_print_as_a_reader_expects() -> None:
    assert format_cell(None) == "-"
    assert format_cell(True) == "yes"
    assert format_cell(12345) == "12,345"
    assert format_cell(1.23456) == "1.23"
    assert format_cell(1234.5) == "1,234"


def test_json_form_keeps_tables_and_series() -> None:
    r = LabResult("x", "title", "pvm", True, [LabTable("t", ["a"], [[1]])], ["note"], {"k": [1, 2]})
    data = json.loads(json.dumps(to_json([r])))
    assert data[0]["tables"][0] == {"title": "t", "columns": ["a"], "rows": [[1]], "caption": ""}
    assert data[0]["series"] == {"k": [1, 2]}


def test_every_lab_has_its_tutorial_chapter() -> None:
    assert list(LABS) == ["privilege", "memory", "interrupts", "devices", "isolation"]
    for lab in LABS.values():
        chapter = ROOT / "docs" / "tutorial" / lab.chapter
        assert chapter.is_file(), chapter
        assert f"kvmpy lab {lab.name}" in chapter.read_text()


def test_an_unknown_lab_is_refused_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="kvmpy")
    lab_cli.add_parser(p.add_subparsers(dest="command"))
    with pytest.raises(SystemExit):
        p.parse_args(["lab", "nosuch"])
    assert "invalid choice: 'nosuch'" in capsys.readouterr().err


def test_walk_steps_reads_one_entry_per_level() -> None:
    with GuestMemory(0) as mem:
        mem.add_region(0, 0x40_0000)
        pml4, pdpt, pd, pt = 0x1000, 0x2000, 0x3000, 0x4000
        mem.write_u64(pml4 + 1 * 8, pdpt | 7)
        mem.write_u64(pdpt, pd | 7)
        mem.write_u64(pd, pt | 7)
        mem.write_u64(pt + 5 * 8, 0x123000 | 7)
        gva = USER_VA + 5 * 4096 + 0x45
        steps, gpa = walk_steps(mem, gva, pml4)
        assert [(s.level, s.table, s.index) for s in steps] == [
            ("PML4", pml4, 1), ("PDPT", pdpt, 0), ("PD", pd, 0), ("PT", pt, 5)]
        assert gpa == 0x123045 == mem.translate(gva, pml4)
        assert steps[-1].flags == "P RW US"
        with pytest.raises(ValueError, match="PT entry 6 not present"):
            walk_steps(mem, gva + 4096, pml4)


def test_plots_write_pngs(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    paths = [
        bar_chart(tmp_path / "b.png", ["x", "y"], {"s": [1.0, 10.0]}, ylabel="u", title="t", log=True),
        line_chart(tmp_path / "l.png", [16, 64], {"K=1": [2.0, 1.0]}, xlabel="n", ylabel="u", title="t", logx=True),
        histograms(tmp_path / "h.png", {"a": [1.0, 2.0, 3.0, 1000.0], "b": [2.0, 2.5]}, xlabel="us", title="t"),
    ]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_form_is_a_table_per_lab_table() -> None:
    from kvmpy.lab.report import to_markdown

    r = LabResult("x", "title", "pvm", True, [LabTable("t", ["a", "b"], [["x|y", 12345]])], ["n"])
    assert to_markdown(r) == "**t**\n\n| a | b |\n| --- | ---: |\n| x\\|y | 12,345 |\n\n- n\n"


@pytest.mark.parametrize("backend, module, param, value, expected", [
    ("VMX", "kvm_intel", "ept", "Y", "EPT"),
    ("VMX", "kvm_intel", "ept", "N", "shadow paging"),
    ("SVM", "kvm_amd", "npt", "1", "NPT"),
    ("SVM", "kvm_amd", "npt", "0", "shadow paging"),
    ("PVM", "kvm_pvm", "x", "", "shadow paging"),
])
def test_host_mmu_reads_the_vendor_module_parameter(tmp_path: Path, backend: str, module: str, param: str,
                                                    value: str, expected: str) -> None:
    from kvmpy.lab.paging import host_mmu
    from kvmpy.platform import Backend

    (tmp_path / module / "parameters").mkdir(parents=True)
    (tmp_path / module / "parameters" / param).write_text(value + "\n")
    assert host_mmu(Backend[backend], str(tmp_path)) == expected


def test_latency_summary_percentiles() -> None:
    from kvmpy.lab.common import Summary

    s = Summary.of([float(x) for x in range(1, 101)])
    assert (s.count, s.p50, s.p90, s.p99, s.max) == (100, 51.0, 91.0, 100.0, 100.0)
    assert Summary.of([]).count == 0
