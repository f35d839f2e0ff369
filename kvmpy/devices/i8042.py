"""The part of a PC's i8042 keyboard controller a Linux micro-VM touches.

There is no keyboard and no mouse behind it. Linux uses the controller to
reboot (``reboot=k``: command 0xFE pulses the CPU reset line), and if the
guest kernel has the i8042 driver built in, its probe runs the controller
self-test and reads and writes the command byte. Everything else is ignored.

Registration: one device for ports 0x60..0x64 (``PORT_BASE``,
``PORT_COUNT``): offset 0 is the data port, offset 4 the status (read) and
command (write) port. Offsets 1..3 read 0xFF and ignore writes; in practice
0x61 (the PIT's speaker/NMI-status port) is claimed inside the kernel by
KVM_CREATE_PIT2 and never reaches userspace.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from enum import IntEnum, IntFlag

from ..bus import ByteRegisters

PORT_BASE = 0x60
"""The data port; the status/command port is PORT_BASE + Port.COMMAND."""

PORT_COUNT = 5
"""Ports the machine registers from PORT_BASE (0x60..0x64)."""


class Port(IntEnum):
    """Offsets from PORT_BASE."""

    DATA = 0  # 0x60: command responses (read), command parameters (write)
    STATUS = 4  # 0x64 read
    COMMAND = 4  # 0x64 write


class Status(IntFlag):
    """Status register bits (port 0x64 read)."""

    OUTPUT_FULL = 0x01  # a byte waits on the data port for the CPU
    INPUT_FULL = 0x02  # the controller has not taken the last write (never)


class Command(IntEnum):
    """The controller commands this model answers (port 0x64 write)."""

    READ_COMMAND_BYTE = 0x20
    WRITE_COMMAND_BYTE = 0x60  # the new value follows on the data port
    SELF_TEST = 0xAA
    PULSE_RESET = 0xFE  # pulse output port bit 0: the CPU reset line


class CommandByte(IntFlag):
    """The controller's command byte ("CTR" in Linux's driver)."""

    KBD_INTERRUPT = 0x01
    AUX_INTERRUPT = 0x02
    SYSTEM_FLAG = 0x04
    IGNORE_KEYLOCK = 0x08
    KBD_DISABLE = 0x10
    AUX_DISABLE = 0x20
    XLATE = 0x40  # translate scan code set 2 to set 1


DEFAULT_COMMAND_BYTE = CommandByte.KBD_INTERRUPT | CommandByte.SYSTEM_FLAG | CommandByte.XLATE
"""The command byte as firmware leaves it after POST: keyboard interrupt on,
POST passed, scan codes translated."""

SELF_TEST_PASSED = 0x55


class I8042(ByteRegisters):
    """A keyboard controller that answers a few commands and resets the VM.

    ``on_reset`` is called (outside the device lock, on the vCPU thread that
    wrote the command) each time the guest pulses the reset line; Linux
    writes the command up to ten times, so repeats before the machine stops
    its vCPUs are the same reset.
    """

    def __init__(self, on_reset: Callable[[], None]) -> None:
        self._on_reset = on_reset
        self._lock = threading.Lock()
        self._command_byte = int(DEFAULT_COMMAND_BYTE)
        self._output: int | None = None  # the byte waiting on the data port
        self._awaiting_command_byte = False  # a 0x60 command wants its value

    def _read_byte(self, offset: int) -> int:
        with self._lock:
            if offset == Port.DATA:
                value, self._output = self._output, None
                return 0 if value is None else value
            if offset == Port.STATUS:
                return int(Status.OUTPUT_FULL) if self._output is not None else 0
            return 0xFF

    def _write_byte(self, offset: int, value: int) -> None:
        reset = False
        with self._lock:
            if offset == Port.DATA:
                if self._awaiting_command_byte:
                    self._command_byte = value
                    self._awaiting_command_byte = False
                # Otherwise the byte is for the keyboard, and there is none.
            elif offset == Port.COMMAND:
                reset = self._command(value)
        if reset:
            self._on_reset()

    def _command(self, command: int) -> bool:
        """Run a controller command; return True if it pulses reset."""
        self._awaiting_command_byte = False
        if command == Command.READ_COMMAND_BYTE:
            self._output = self._command_byte
        elif command == Command.WRITE_COMMAND_BYTE:
            self._awaiting_command_byte = True
        elif command == Command.SELF_TEST:
            self._output = SELF_TEST_PASSED
        elif command == Command.PULSE_RESET:
            return True
        return False

    # -- snapshots (kvmpy/snapshot.py) ---------------------------------------

    def snapshot_state(self) -> dict:
        """The controller's state as JSON-able values."""
        with self._lock:
            return {"command_byte": self._command_byte, "output": self._output,
                    "awaiting_command_byte": self._awaiting_command_byte}

    def restore_state(self, state: dict) -> None:
        """Load what `snapshot_state` returned."""
        with self._lock:
            self._command_byte = state["command_byte"]
            self._output = state["output"]
            self._awaiting_command_byte = bool(state["awaiting_command_byte"])
