"""The package's layers import downward only (docs/architecture.md). No /dev/kvm needed.

Every import in kvmpy/, at module level or inside a function, is checked
against the layer table below: a module may import its own layer or lower
ones. A new module must be placed in the table (the test says so).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "kvmpy"

# Bottom up. A top-level module or subpackage of kvmpy -> its layer.
LAYERS: dict[str, int] = {
    # the bindings and what every layer shares
    "_kvm": 0, "_ioctl": 0, "errors": 0, "blobs": 0, "cache": 0, "platform": 0, "arch": 0,
    "_build_kvm": 0,
    # one class per file descriptor, guest memory, exits, the bus and the exit loop
    "kvm": 1, "vm": 1, "vcpu": 1, "memory": 1, "exits": 1, "bus": 1, "runloop": 1,
    "dirty": 1, "warm": 1, "cow": 1,
    # the pieces of a machine
    "x86": 2, "boot": 2, "devices": 2, "stats": 2, "assists": 2, "net": 2, "disk": 2, "guest": 2,
    "tiny": 2, "virtiofsd": 2, "storage": 2,
    # the assembly layer
    "machine": 3,
    # what is built on assembled machines (or on the fd layer directly)
    "microvm": 4, "snapshot": 4, "snapshot_chain": 4, "lazy": 4, "sandbox": 4, "pool": 4, "kut": 4, "lab": 4,
    "jail": 4,
    # the command line
    "cli": 5,
}
# Modules that sit lower than their package: x86/arch.py only re-exports kvmpy/arch.py.
SUBMODULE_LAYERS = {"x86.arch": 0}
FD_LAYER = {name for name, rank in LAYERS.items() if rank <= 1}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "sandbox_guest" not in p.parts)


def _top(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _layer_of_path(path: Path) -> int:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return SUBMODULE_LAYERS.get(".".join(rel.parts), LAYERS[_top(path)])


def _layer(name: str) -> int:
    """The layer of an imported kvmpy module given as "x86.arch" or "x86" (its first two parts)."""
    return SUBMODULE_LAYERS.get(name, LAYERS.get(name.split(".")[0], -1))


def _imported_tops(path: Path) -> set[str]:
    """The kvmpy top-level names a module imports (absolute `kvmpy.x` or relative)."""
    tree = ast.parse(path.read_text(), str(path))
    depth = len(path.relative_to(PACKAGE).parts) - 1  # how many package levels below kvmpy/
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "kvmpy" and len(parts) > 1:
                    found.add(".".join(parts[1:3]))
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] == "kvmpy":
                    found.update([".".join(parts[1:3])] if len(parts) > 1 else [a.name for a in node.names])
            elif node.level == depth + 1:  # relative to kvmpy/ itself
                if node.module:
                    found.add(".".join(node.module.split(".")[:2]))
                else:
                    found.update(a.name for a in node.names)
    return {t for t in found if t != "__version__"}


def test_every_module_has_a_layer():
    missing = sorted({_top(p) for p in _modules()} - set(LAYERS) - {"__init__"})
    assert not missing, f"add these kvmpy modules to LAYERS in {__file__}: {missing}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_downward_only(path):
    top = _top(path)
    if top == "__init__":
        return  # the package's front door re-exports from every layer (lazily above the fd layer)
    rank = _layer_of_path(path)
    upward = sorted(t for t in _imported_tops(path) if _layer(t) > rank)
    assert not upward, f"{path.relative_to(PACKAGE)} (layer {rank}) imports from higher layers: {upward}"


def test_the_fd_layer_bus_and_exit_loop_import_no_machine_parts():
    for path in _modules():
        if _top(path) in FD_LAYER:
            bad = {t for t in _imported_tops(path) if t.split(".")[0] in
                   {"x86", "devices", "stats", "machine", "assists", "boot"} and _layer(t) > 0}
            assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(bad)}"


def test_import_kvmpy_loads_no_disassembler_or_emulator():
    import subprocess
    import sys

    code = ("import sys, kvmpy; bad = [m for m in sys.modules if m.split('.')[0] in ('capstone', 'unicorn')]; "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
