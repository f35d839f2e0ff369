"""QEMU's test devices, as kvm-unit-tests expects them: isa-debug-exit and pc-testdev.

Both are off in kvmpy's micro-VM and switched on by whoever assembles a
machine for test kernels (`kvmpy.kut`). Behaviour follows QEMU's
`hw/misc/debugexit.c` and `hw/misc/pc-testdev.c`:

- `DebugExit` (isa-debug-exit, I/O 0xf4, 4 ports): a write of `code` ends
  the VM; QEMU then exits with status `(code << 1) | 1`, so a guest can never
  produce status 0. Reads give 0.
- `PcTestDev`:
  - 0xe0-0xe3: a 32-bit scratch register; an access of `size` bytes at
    offset `o` reads or replaces byte lanes o..o+size-1 (`in`/`out` of any
    width, and `rep insb`, read back what was written);
  - 0xe4: "flush page": QEMU remaps the host page behind a written GPA so
    KVM drops its mapping; here it is accepted and counted (a no-op keeps
    the tests that use it working, they just test less);
  - 0xe8-0xeb: the same register through byte-wide ports;
  - 0x2000 + n (n < 24): a write of v raises (v != 0) or lowers ISA IRQ n,
    through `irq_line(n, level)` (KVM_IRQ_LINE);
  - MMIO 0xff000000 - 0xff00ffff: a 64 KiB byte buffer that reads back what
    was written, at any access size.
"""

from __future__ import annotations

from typing import Callable

DEBUG_EXIT_PORT = 0xF4
DEBUG_EXIT_SIZE = 4

TESTDEV_IOPORT = 0xE0
TESTDEV_FLUSH_PORT = 0xE4
TESTDEV_IOPORT_BYTE = 0xE8
TESTDEV_IRQ_PORT = 0x2000
TESTDEV_IRQ_LINES = 24
TESTDEV_IOMEM = 0xFF00_0000
TESTDEV_IOMEM_SIZE = 0x1_0000


def debug_exit_status(code: int) -> int:
    """The process exit status QEMU gives for a write of `code` to isa-debug-exit."""
    return ((code << 1) | 1) & 0xFF


class DebugExit:
    """isa-debug-exit: `on_exit(code)` is called with the value the guest wrote."""

    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self.on_exit = on_exit
        self.code: int | None = None

    @property
    def status(self) -> int | None:
        """`(code << 1) | 1` once the guest wrote, else None."""
        return None if self.code is None else debug_exit_status(self.code)

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if self.code is None:
            self.code = value
        self.on_exit(value)


class _Scratch:
    """The 32-bit pc-testdev I/O register; `byte_wide` splits wider accesses into bytes."""

    def __init__(self, owner: "PcTestDev", byte_wide: bool) -> None:
        self.owner = owner
        self.byte_wide = byte_wide

    def read(self, offset: int, size: int) -> int:
        data = self.owner.ioport_data
        if self.byte_wide:
            return sum(((data >> (8 * ((offset + i) & 3))) & 0xFF) << (8 * i) for i in range(size))
        return (data >> (8 * (offset & 3))) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            shift = 8 * ((offset + i) & 3)
            byte = (value >> (8 * i)) & 0xFF
            self.owner.ioport_data = (self.owner.ioport_data & ~(0xFF << shift)) | (byte << shift)


class _Flush:
    def __init__(self, owner: "PcTestDev") -> None:
        self.owner = owner

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.owner.flushed.append(value)


class _IrqLines:
    def __init__(self, owner: "PcTestDev") -> None:
        self.owner = owner

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if self.owner.irq_line is not None:
            self.owner.irq_line(offset, 1 if value & 0xFF else 0)


class _IoMem:
    def __init__(self, owner: "PcTestDev") -> None:
        self.owner = owner

    def read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.owner.iomem[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        n = min(size, TESTDEV_IOMEM_SIZE - offset)
        self.owner.iomem[offset:offset + n] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")[:n]


class PcTestDev:
    """pc-testdev: scratch ports, flush port, IRQ-line ports and the iomem buffer."""

    def __init__(self, irq_line: Callable[[int, int], None] | None = None) -> None:
        self.irq_line = irq_line
        self.ioport_data = 0
        self.flushed: list[int] = []
        self.iomem = bytearray(TESTDEV_IOMEM_SIZE)
        self.scratch = _Scratch(self, byte_wide=False)
        self.scratch_bytes = _Scratch(self, byte_wide=True)
        self.flush = _Flush(self)
        self.irqs = _IrqLines(self)
        self.mem = _IoMem(self)

    def register(self, pio: object, mmio: object) -> None:
        """Claim the device's ports on `pio` and its buffer on `mmio` (kvmpy.bus.Bus)."""
        pio.register(TESTDEV_IOPORT, 4, self.scratch, "pc-testdev ioport")  # type: ignore[attr-defined]
        pio.register(TESTDEV_FLUSH_PORT, 4, self.flush, "pc-testdev flush")  # type: ignore[attr-defined]
        pio.register(TESTDEV_IOPORT_BYTE, 4, self.scratch_bytes, "pc-testdev ioport-byte")  # type: ignore[attr-defined]
        pio.register(TESTDEV_IRQ_PORT, TESTDEV_IRQ_LINES, self.irqs, "pc-testdev irq")  # type: ignore[attr-defined]
        mmio.register(TESTDEV_IOMEM, TESTDEV_IOMEM_SIZE, self.mem, "pc-testdev iomem")  # type: ignore[attr-defined]
