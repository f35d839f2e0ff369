"""qemu-img / qemu-io as the independent reference for kvmpy's qcow2 (Debian's qemu-utils)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
                                    reason="qemu-utils not installed (scripts/install-deps.sh installs it)")


def qemu_img(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True, timeout=120, check=check)


def qemu_check(path: str | Path) -> subprocess.CompletedProcess:
    """`qemu-img check`; exit 0 means no errors and no leaked clusters."""
    return qemu_img("check", path, check=False)


def assert_clean(path: str | Path) -> None:
    r = qemu_check(path)
    assert r.returncode == 0 and "No errors were found" in r.stdout, r.stdout + r.stderr


def qemu_io_writes(path: str | Path, writes: list[tuple[int, int, int]], fmt: str = "qcow2") -> None:
    """The same writes done by QEMU: `write -P BYTE OFFSET LENGTH` each."""
    cmds: list[str] = []
    for off, length, byte in writes:
        cmds += ["-c", f"write -P {byte} {off} {length}"]
    for i in range(0, len(cmds), 400):  # keep command lines short
        r = subprocess.run(["qemu-io", "-f", fmt, *cmds[i:i + 400], str(path)], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout + r.stderr


def assert_same_content(a: str | Path, b: str | Path) -> None:
    r = qemu_img("compare", a, b, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
