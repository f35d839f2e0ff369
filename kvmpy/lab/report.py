"""What a lab returns: tables (printed with rich, or as JSON) and the raw series its plots draw.

A lab's `run()` gives a `LabResult`; nothing here measures. `render(result,
console)` prints it, `to_json(result)` is the `--json` form (the same
tables, cells as plain values). Cells are ints, floats, strings or None
("-": not applicable on this path or not reported by this KVM backend).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

Cell = Any  # int | float | str | None


@dataclass
class LabTable:
    """One table of a lab: a title, column names and rows of cells."""

    title: str
    columns: list[str]
    rows: list[list[Cell]] = field(default_factory=list)
    caption: str = ""

    def add(self, *cells: Cell) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"table {self.title!r}: row of {len(cells)} cells for {len(self.columns)} columns")
        self.rows.append(list(cells))

    def column(self, name: str) -> list[Cell]:
        """The cells of column `name`, top to bottom."""
        i = self.columns.index(name)
        return [r[i] for r in self.rows]

    def row(self, first: Cell) -> dict[str, Cell]:
        """The row whose first cell is `first`, as {column: cell}."""
        for r in self.rows:
            if r[0] == first:
                return dict(zip(self.columns, r))
        raise KeyError(f"table {self.title!r} has no row {first!r}")


@dataclass
class LabResult:
    """Everything one run of a lab produced."""

    name: str
    title: str
    backend: str
    quick: bool
    tables: list[LabTable] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    series: dict[str, Any] = field(default_factory=dict)  # raw numbers for the plots and --json

    def table(self, title_start: str) -> LabTable:
        """The table whose title starts with `title_start`."""
        for t in self.tables:
            if t.title.startswith(title_start):
                return t
        raise KeyError(f"lab {self.name} has no table {title_start!r}")


def format_cell(cell: Cell) -> str:
    if cell is None:
        return "-"
    if isinstance(cell, bool):
        return "yes" if cell else "no"
    if isinstance(cell, float):
        if cell == 0:
            return "0"
        return f"{cell:.3g}" if abs(cell) < 100 else f"{cell:,.0f}"
    if isinstance(cell, int):
        return f"{cell:,}" if abs(cell) >= 10000 else str(cell)
    return str(cell)


def render(result: LabResult, console: Any) -> None:
    """Print a lab's tables and notes on a rich `Console`."""
    from rich.table import Table

    console.rule(f"[bold]lab {result.name}[/bold]: {result.title} (backend {result.backend}"
                 f"{', quick' if result.quick else ''})")
    for t in result.tables:
        table = Table(title=t.title, caption=t.caption or None, caption_justify="left")
        for i, c in enumerate(t.columns):
            table.add_column(c, justify="left" if _is_text(t, i) else "right", overflow="fold")
        for r in t.rows:
            table.add_row(*(format_cell(c) for c in r))
        console.print(table)
    for note in result.notes:
        console.print(f"- {note}", highlight=False)


def to_json(results: Sequence[LabResult]) -> list[dict[str, Any]]:
    """The `--json` form of some lab results."""
    return [asdict(r) for r in results]


def _is_text(t: LabTable, i: int) -> bool:
    """Column `i` holds words (left-aligned), not numbers or addresses (right-aligned)."""
    return i == 0 or any(isinstance(r[i], str) and r[i] != "-" and not r[i].startswith("0x") for r in t.rows)


def to_markdown(result: LabResult) -> str:
    """A lab's tables as Markdown (how docs/tutorial/ shows this host's numbers)."""
    out = []
    for t in result.tables:
        out.append(f"**{t.title}**\n")
        out.append("| " + " | ".join(t.columns) + " |")
        out.append("|" + "|".join(" --- " if _is_text(t, i) else " ---: " for i in range(len(t.columns))) + "|")
        for r in t.rows:
            out.append("| " + " | ".join(format_cell(c).replace("|", "\\|") for c in r) + " |")
        out.append("")
    out.extend(f"- {n}" for n in result.notes)
    return "\n".join(out) + "\n"
