"""Writing one benchmark's section of docs/performance.md, leaving the others alone.

Each benchmark owns the section under its own `## ...` heading: the section
is replaced in place when present, appended otherwise.
"""

from __future__ import annotations

from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "performance.md"


def update_section(heading: str, section: str, doc: Path = DOC) -> None:
    """Replace (or append) the section that starts with `heading` by `section`."""
    if not section.startswith(heading):
        raise ValueError(f"section must start with its heading {heading!r}")
    text = doc.read_text() if doc.exists() else "# Performance\n"
    if heading in text:
        start = text.index(heading)
        nxt = text.find("\n## ", start + len(heading))
        text = text[:start] + section.rstrip("\n") + "\n" + (text[nxt:] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
