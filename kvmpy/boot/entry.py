"""The result of every loader: where and how the boot vCPU starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .layout import E820Entry

BootMode = Literal["linux64", "pvh", "multiboot"]


@dataclass
class BootEntry:
    """Where and how the boot vCPU starts, and what was loaded where.

    mode "linux64": 64-bit long mode, identity-mapped, RSI = boot_params.
    mode "pvh" / "multiboot": flat 32-bit protected mode, paging off,
    EBX = start info / multiboot info, EAX = the protocol's magic.
    """

    mode: BootMode
    rip: int
    rsi: int = 0
    rbx: int = 0
    rax: int = 0
    kernel_range: tuple[int, int] = (0, 0)  # (gpa, size)
    initrd_range: tuple[int, int] | None = None  # (gpa, size)
    e820: list[E820Entry] = field(default_factory=list)
    cmdline_addr: int = 0
