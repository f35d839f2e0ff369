"""The guest's console output as the VMM keeps it: searchable while it runs, bounded in size.

A guest that prints without end must not grow the VMM's memory without
bound: `ConsoleLog` keeps the last `CONSOLE_LOG_MAX` bytes (trimming a
quarter at a time, so appends stay O(1) amortised). Offsets are absolute
(bytes printed since boot): `end` is the offset after the last byte, `base`
the offset of the oldest byte kept, and `since(offset)` / `wait_for`
take and return absolute offsets, so a cursor stays valid when old output
is dropped; output older than `base` is gone (`dropped` counts it).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

CONSOLE_LOG_MAX = 8 << 20  # bytes of console output kept per VM (docs/reliability.md)


@dataclass
class ConsoleLog:
    """Everything the guest printed on COM1 (the last `limit` bytes of it), searchable while it runs."""

    data: bytearray = field(default_factory=bytearray)
    cond: threading.Condition = field(default_factory=threading.Condition)
    limit: int = CONSOLE_LOG_MAX
    base: int = 0  # absolute offset of data[0]: bytes dropped from the front so far

    @property
    def end(self) -> int:
        """Absolute offset just past the last byte printed."""
        return self.base + len(self.data)

    @property
    def dropped(self) -> int:
        return self.base

    def append(self, b: bytes) -> None:
        with self.cond:
            self.data += b
            if len(self.data) > self.limit:
                cut = len(self.data) - self.limit * 3 // 4
                del self.data[:cut]
                self.base += cut
            self.cond.notify_all()

    def since(self, offset: int) -> bytes:
        """What was printed from absolute `offset` on (from `base` if that is older than what is kept)."""
        with self.cond:
            return bytes(self.data[max(offset - self.base, 0):])

    def wait_for(self, text: bytes, timeout: float | None, start: int = 0) -> int:
        """Absolute offset just past `text` once printed at or after `start`; -1 on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while True:
                i = self.data.find(text, max(start - self.base, 0))
                if i >= 0:
                    return self.base + i + len(text)
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return -1
                self.cond.wait(remaining if remaining is not None else 1.0)

    def text(self) -> str:
        with self.cond:
            return self.data.decode(errors="replace")


__all__ = ["CONSOLE_LOG_MAX", "ConsoleLog"]
