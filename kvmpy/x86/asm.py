"""Assemble tiny guest programs with the system's GNU `as`.

`assemble(source, mode="64", origin=0x1000)` returns the flat machine code,
cached by content, so tests and examples write guests as readable assembly
(AT&T syntax, or `.intel_syntax noprefix`) instead of hand-made bytes.
Needs binutils (`as`, `ld`, `objcopy`).
"""

from __future__ import annotations

import functools
import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..cache import cache_root, store
from ..errors import KvmError

_DIRECTIVE = {"16": ".code16", "32": ".code32", "64": ".code64"}


class AssemblerError(KvmError):
    """The guest program did not assemble; the message carries `as`'s diagnostics."""


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise AssemblerError(f"{name} not found: install binutils (apt-get install binutils)")
    return path


@functools.lru_cache(maxsize=256)
def assemble(source: str, mode: str = "64", origin: int = 0x1000) -> bytes:
    """Machine code for `source` assembled at address `origin` in 16/32/64-bit mode."""
    if mode not in _DIRECTIVE:
        raise ValueError(f"mode must be '16', '32' or '64', not {mode!r}")
    text = f"{_DIRECTIVE[mode]}\n.text\n.globl _start\n_start:\n{source}\n"
    key = hashlib.sha256(f"{mode}:{origin:#x}:{text}".encode()).hexdigest()[:24]
    cached = cache_root() / "asm" / f"{key}.bin"
    if cached.exists():
        return cached.read_bytes()
    with tempfile.TemporaryDirectory(prefix="kvmpy-asm-") as tmp:
        src, obj, elf, out = (Path(tmp) / n for n in ("g.s", "g.o", "g.elf", "g.bin"))
        src.write_text(text)
        _run([_tool("as"), "--64", "-o", str(obj), str(src)], source)
        _run([_tool("ld"), "-m", "elf_x86_64", "-Ttext", hex(origin), "-e", "_start",
              "--oformat", "elf64-x86-64", "-o", str(elf), str(obj)], source)
        _run([_tool("objcopy"), "-O", "binary", "-j", ".text", str(elf), str(out)], source)
        code = out.read_bytes()
    store(cached, code)
    return code


def _run(cmd: list[str], source: str) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        numbered = "\n".join(f"{i + 5:4} {line}" for i, line in enumerate(source.splitlines()))
        raise AssemblerError(f"{Path(cmd[0]).name} failed:\n{p.stderr.strip()}\n--- source ---\n{numbered}")
