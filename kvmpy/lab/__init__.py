"""`kvmpy lab`: the processes of CPU virtualization, run and measured on this host.

Each lab is a module with tiny guests of its own and a `run(kvm, quick)`
returning a `LabResult` (tables and raw series), and a `plot(result,
directory)` drawing its PNGs. `LABS` is the registry, in tutorial order;
docs/tutorial/ has a chapter per lab.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .report import LabResult, LabTable


@dataclass(frozen=True)
class Lab:
    name: str
    module: str
    title: str
    chapter: str  # docs/tutorial/<chapter>

    def _mod(self) -> Any:
        return importlib.import_module(f"{__name__}.{self.module}")

    def run(self, kvm: Any, quick: bool = False) -> LabResult:
        return self._mod().run(kvm, quick)

    def plot(self, result: LabResult, directory: Path) -> list[Path]:
        directory.mkdir(parents=True, exist_ok=True)
        return self._mod().plot(result, directory)


LABS: dict[str, Lab] = {lab.name: lab for lab in (
    Lab("privilege", "privilege", "privilege levels and trap-and-emulate", "01-privilege.md"),
    Lab("memory", "paging", "memory virtualization: page tables, the MMU, dirty logging", "02-memory.md"),
    Lab("interrupts", "interrupts", "interrupt virtualization and injection", "03-interrupts.md"),
    Lab("devices", "devices", "device emulation paths", "04-devices.md"),
    Lab("isolation", "isolation", "isolation: what a guest can and cannot reach", "05-isolation.md"),
)}

__all__ = ["LABS", "Lab", "LabResult", "LabTable"]
