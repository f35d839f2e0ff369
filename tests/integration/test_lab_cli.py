"""`kvmpy lab`: the command prints tables, JSON, and writes plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvmpy.cli import main


def test_lab_json_is_the_labs_tables(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "devices", "--quick", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["name"] for d in data] == ["devices"]
    assert data[0]["tables"][0]["columns"][0] == "path"
    assert data[0]["quick"] is True


def test_lab_prints_its_table_and_writes_its_plot(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    assert main(["lab", "isolation", "--quick", "--plot", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "store to a read-only slot" in out and "docs/tutorial/05-isolation.md" in out
    assert (tmp_path / "isolation.png").read_bytes()[:4] == b"\x89PNG"


def test_a_lab_guest_that_never_finishes_is_stopped_with_a_clear_error(kvm) -> None:
    from kvmpy.lab.common import LabError, cpl_guest, program, run_until_done, wire_done

    with cpl_guest(kvm, program("", "2: jmp 2b", 0, 0), 0) as g:
        done = wire_done(g)
        g.make_loop()
        with pytest.raises(LabError, match=r"did not reach its done write: 0.3 s passed, at rip 0x1"):
            run_until_done(g, done, timeout=0.3)


def test_an_unplanned_guest_exception_is_reported_by_vector(kvm) -> None:
    from kvmpy.lab.common import LabError, cpl_guest, program, run_until_done, wire_done

    with cpl_guest(kvm, program("", "ud2", 0, 0), 0) as g:
        done = wire_done(g)
        g.make_loop()
        with pytest.raises(LabError, match="unexpected exception vector 6"):
            run_until_done(g, done)


def test_a_plot_directory_that_cannot_be_made_is_a_one_line_error(capsys: pytest.CaptureFixture[str],
                                                                   tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["lab", "isolation", "--quick", "--json", "--plot", str(blocker / "plots")]) == 1
    err = capsys.readouterr().err
    assert f"kvmpy: --plot {blocker / 'plots'}: Not a directory" in err
