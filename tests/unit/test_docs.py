"""The documentation reads the same on every machine: no one machine's paths, no references to absent files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])

# A checkout, home or scratch directory of one machine (a guest's `/root` directory alone is fine, and so
# is a process's root, `/proc/<pid>/root/`).
MACHINE_PATH = re.compile(r"(?<![\w.~>-])(/work/|/root/|/home/[^/\s`]+/|/Users/[^/\s`]+/|/tmp/pytest-)")
# A path to a markdown file (with a directory: a bare `table.md` is an example argument).
MD_REFERENCE = re.compile(r"(?<![\w/.:-])([\w.-]*/[\w./-]*[\w-]\.md)\b")


def test_the_docs_are_found():
    assert len(DOCS) > 10 and all(d.is_file() for d in DOCS)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_docs_name_no_machine_specific_absolute_paths(doc):
    hits = [f"{doc.name}:{n}: {line.strip()}" for n, line in enumerate(doc.read_text().splitlines(), 1)
            if MACHINE_PATH.search(line)]
    assert not hits, "write paths a reader can follow on their own machine:\n" + "\n".join(hits)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_docs_refer_only_to_markdown_files_in_the_repository(doc):
    missing = []
    for n, line in enumerate(doc.read_text().splitlines(), 1):
        for ref in MD_REFERENCE.findall(line):
            if "://" in line and ref in line.split("://", 1)[1].split()[0]:
                continue  # part of a URL
            if not any((base / ref).is_file() for base in (doc.parent, ROOT, ROOT / "docs")):
                missing.append(f"{doc.name}:{n}: {ref}")
    assert not missing, "referenced but not in the repository:\n" + "\n".join(missing)
