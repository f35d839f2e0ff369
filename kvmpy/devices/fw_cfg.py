"""QEMU's firmware configuration device (fw_cfg), legacy I/O interface only.

Ports (QEMU docs/specs/fw_cfg.rst, x86): 0x510 selector (16-bit write: the
key; resets the data offset), 0x511 data (reads return the selected item's
bytes in order, then 0). Numeric items are little-endian; the file
directory is big-endian. Writes to data and the DMA interface are not
provided (the ID item says so), which is what kvm-unit-tests expects: it
reads FW_CFG_NB_CPUS (0x05) in every test, FW_CFG_RAM_SIZE (0x03) in a few,
and key 0x11 (its "MAX_RAM"; 0 = no limit). Absent keys read as zeros.
"""

from __future__ import annotations

import struct

FW_CFG_PORT_SEL = 0x510
FW_CFG_PORT_DATA = 0x511
FW_CFG_PORTS = 2

FW_CFG_SIGNATURE = 0x00
FW_CFG_ID = 0x01
FW_CFG_UUID = 0x02
FW_CFG_RAM_SIZE = 0x03
FW_CFG_NOGRAPHIC = 0x04
FW_CFG_NB_CPUS = 0x05
FW_CFG_MACHINE_ID = 0x06
FW_CFG_NUMA = 0x0D
FW_CFG_BOOT_MENU = 0x0E
FW_CFG_MAX_CPUS = 0x0F
FW_CFG_MAX_RAM = 0x11  # kvm-unit-tests' name; QEMU's FW_CFG_KERNEL_DATA
FW_CFG_FILE_DIR = 0x19

FW_CFG_VERSION = 1  # ID bit 0: the traditional interface; bit 1 (DMA) clear


class FwCfg:
    """fw_cfg with the items a test kernel reads; `items[key] = bytes` adds more."""

    def __init__(self, *, ram_size: int, nb_cpus: int, max_cpus: int | None = None) -> None:
        self.items: dict[int, bytes] = {
            FW_CFG_SIGNATURE: b"QEMU",
            FW_CFG_ID: struct.pack("<I", FW_CFG_VERSION),
            FW_CFG_UUID: bytes(16),
            FW_CFG_RAM_SIZE: struct.pack("<Q", ram_size),
            FW_CFG_NOGRAPHIC: struct.pack("<H", 1),
            FW_CFG_NB_CPUS: struct.pack("<H", nb_cpus),
            FW_CFG_MACHINE_ID: struct.pack("<I", 0),
            FW_CFG_NUMA: struct.pack("<Q", 0),
            FW_CFG_BOOT_MENU: struct.pack("<H", 0),
            FW_CFG_MAX_CPUS: struct.pack("<H", max_cpus or nb_cpus),
            FW_CFG_FILE_DIR: struct.pack(">I", 0),
        }
        self.selected = 0
        self.offset = 0

    def read(self, offset: int, size: int) -> int:
        if offset != FW_CFG_PORT_DATA - FW_CFG_PORT_SEL:
            return 0
        data = self.items.get(self.selected, b"")
        chunk = data[self.offset:self.offset + size].ljust(size, b"\0")
        self.offset += size
        return int.from_bytes(chunk, "little")

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self.selected = value & 0xFFFF
            self.offset = 0
