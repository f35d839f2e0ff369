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
