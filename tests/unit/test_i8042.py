"""Unit tests of the minimal i8042 keyboard controller (no /dev/kvm needed)."""

from __future__ import annotations

import pytest

from kvmpy.devices.i8042 import (
    DEFAULT_COMMAND_BYTE,
    I8042,
    SELF_TEST_PASSED,
    Command,
    Port,
    Status,
)


class Controller:
    def __init__(self) -> None:
        self.resets = 0
        self.dev = I8042(self._reset)

    def _reset(self) -> None:
        self.resets += 1

    def command(self, command: int) -> None:
        self.dev.write(Port.COMMAND, 1, int(command))

    def status(self) -> int:
        return self.dev.read(Port.STATUS, 1)

    def data(self) -> int:
        return self.dev.read(Port.DATA, 1)


@pytest.fixture
def kbc() -> Controller:
    return Controller()


def test_status_reads_zero_when_idle(kbc: Controller) -> None:
    # Linux's kb_wait() and i8042_flush() poll this; 0 lets both finish at once.
    assert kbc.status() == 0


def test_reset_command_calls_on_reset(kbc: Controller) -> None:
    kbc.command(Command.PULSE_RESET)
    assert kbc.resets == 1


def test_self_test_answers_0x55(kbc: Controller) -> None:
    kbc.command(Command.SELF_TEST)
    assert kbc.status() & Status.OUTPUT_FULL
    assert kbc.data() == SELF_TEST_PASSED
    assert kbc.status() == 0


def test_read_command_byte_returns_default(kbc: Controller) -> None:
    kbc.command(Command.READ_COMMAND_BYTE)
    assert kbc.data() == DEFAULT_COMMAND_BYTE


def test_write_command_byte_is_read_back(kbc: Controller) -> None:
    kbc.command(Command.WRITE_COMMAND_BYTE)
    kbc.dev.write(Port.DATA, 1, 0x30)
    kbc.command(Command.READ_COMMAND_BYTE)
    assert kbc.data() == 0x30


def test_data_write_without_command_is_ignored(kbc: Controller) -> None:
    kbc.dev.write(Port.DATA, 1, 0xFF)  # a keyboard reset, with no keyboard
    assert kbc.status() == 0
    kbc.command(Command.READ_COMMAND_BYTE)
    assert kbc.data() == DEFAULT_COMMAND_BYTE


def test_unknown_command_is_ignored(kbc: Controller) -> None:
    kbc.command(0xAD)  # disable keyboard interface
    assert kbc.status() == 0
    assert kbc.resets == 0


def test_data_read_with_nothing_pending_returns_zero(kbc: Controller) -> None:
    assert kbc.data() == 0


def test_ports_between_data_and_status_read_ff(kbc: Controller) -> None:
    assert [kbc.dev.read(offset, 1) for offset in (1, 2, 3)] == [0xFF] * 3
