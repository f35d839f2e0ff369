"""Unit tests of the 16550A UART model (no /dev/kvm needed)."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpy.devices.serial import (
    RX_BACKLOG_SIZE,
    RX_FIFO_SIZE,
    Fcr,
    Ier,
    InterruptId,
    Lcr,
    Lsr,
    Mcr,
    Msr,
    Register,
    Serial16550,
)


class Uart:
    """A Serial16550 with its output and irq line recorded, and byte helpers."""

    def __init__(self) -> None:
        self.output: list[bytes] = []
        self.irq_calls: list[bool] = []
        self.dev = Serial16550(self.output.append, self.irq_calls.append)

    def rd(self, reg: int) -> int:
        return self.dev.read(reg, 1)

    def wr(self, reg: int, value: int) -> None:
        self.dev.write(reg, 1, int(value))

    @property
    def line(self) -> bool:
        return self.irq_calls[-1] if self.irq_calls else False

    def iir_id(self) -> int:
        return self.rd(Register.IIR) & 0x0F


@pytest.fixture
def uart() -> Uart:
    return Uart()


@pytest.fixture
def driven(uart: Uart) -> Uart:
    """A UART as Linux runs it: OUT2 set, FIFOs on."""
    uart.wr(Register.MCR, Mcr.OUT2 | Mcr.RTS | Mcr.DTR)
    uart.wr(Register.FCR, Fcr.FIFO_ENABLE)
    return uart


# -- registers -----------------------------------------------------------------


def test_scratch_register_round_trip(uart: Uart) -> None:
    for value in (0x00, 0x55, 0xAA, 0xFF):
        uart.wr(Register.SCR, value)
        assert uart.rd(Register.SCR) == value


def test_divisor_latch_is_readable_and_writable_behind_dlab(uart: Uart) -> None:
    uart.wr(Register.IER, Ier.ERBFI)
    uart.wr(Register.LCR, Lcr.DLAB | Lcr.WLS0 | Lcr.WLS1)
    uart.wr(Register.DLL, 0x01)
    uart.wr(Register.DLM, 0x02)
    assert (uart.rd(Register.DLL), uart.rd(Register.DLM)) == (0x01, 0x02)
    uart.wr(Register.LCR, Lcr.WLS0 | Lcr.WLS1)
    assert uart.rd(Register.IER) == Ier.ERBFI  # IER untouched by the DLM write
    assert uart.output == []  # the DLL write was not a THR write
    uart.wr(Register.LCR, Lcr.DLAB)
    assert (uart.rd(Register.DLL), uart.rd(Register.DLM)) == (0x01, 0x02)


def test_lcr_reads_back_what_was_written(uart: Uart) -> None:
    uart.wr(Register.LCR, 0x5B)
    assert uart.rd(Register.LCR) == 0x5B


def test_ier_upper_bits_read_zero(uart: Uart) -> None:
    # Linux's probe writes 0x0F and expects exactly that back (and the XScale
    # test expects bit 6 to stay clear).
    uart.wr(Register.IER, 0xFF)
    assert uart.rd(Register.IER) == 0x0F


def test_mcr_upper_bits_read_zero(uart: Uart) -> None:
    uart.wr(Register.MCR, 0xFF)
    assert uart.rd(Register.MCR) == 0x1F


def test_thr_write_calls_output_with_the_byte(uart: Uart) -> None:
    uart.wr(Register.THR, ord("h"))
    uart.wr(Register.THR, ord("i"))
    assert uart.output == [b"h", b"i"]


def test_offset_past_scr_reads_ff_and_ignores_writes(uart: Uart) -> None:
    uart.wr(8, 0x12)
    assert uart.rd(8) == 0xFF


def test_wide_access_touches_consecutive_registers(uart: Uart) -> None:
    uart.dev.write(Register.MSR, 2, 0xA500)  # MSR ignores 0x00, SCR takes 0xA5
    assert uart.rd(Register.SCR) == 0xA5
    assert uart.dev.read(Register.MSR, 2) == 0xA500 | int(Msr.CTS | Msr.DSR | Msr.DCD)


# -- loopback and modem status ----------------------------------------------------


def test_loopback_sends_transmitted_byte_to_receiver(uart: Uart) -> None:
    uart.wr(Register.MCR, Mcr.LOOP)
    uart.wr(Register.THR, 0x42)
    assert uart.output == []
    assert uart.rd(Register.LSR) & Lsr.DR
    assert uart.rd(Register.RBR) == 0x42


@pytest.mark.parametrize(
    ("mcr", "msr"),
    [
        (Mcr.DTR, Msr.DSR),
        (Mcr.RTS, Msr.CTS),
        (Mcr.OUT1, Msr.RI),
        (Mcr.OUT2, Msr.DCD),
        (0, 0),
    ],
)
def test_loopback_maps_mcr_outputs_to_msr_lines(uart: Uart, mcr: int, msr: int) -> None:
    uart.wr(Register.MCR, Mcr.LOOP | mcr)
    assert uart.rd(Register.MSR) & 0xF0 == msr


def test_loopback_probe_pattern_reads_dcd_and_cts(uart: Uart) -> None:
    # Linux's autoconfig: MCR = LOOP | 0x0A must give MSR & 0xF0 == 0x90.
    uart.wr(Register.MCR, Mcr.LOOP | 0x0A)
    assert uart.rd(Register.MSR) & 0xF0 == 0x90


def test_modem_lines_asserted_outside_loopback(uart: Uart) -> None:
    assert uart.rd(Register.MSR) == Msr.CTS | Msr.DSR | Msr.DCD


def test_msr_delta_bits_set_on_line_change_and_cleared_by_read(uart: Uart) -> None:
    uart.wr(Register.MCR, Mcr.LOOP | Mcr.OUT1)  # CTS, DSR, DCD fall; RI rises
    assert uart.rd(Register.MSR) == Msr.RI | Msr.DCTS | Msr.DDSR | Msr.DDCD
    assert uart.rd(Register.MSR) == Msr.RI
    uart.wr(Register.MCR, Mcr.LOOP)  # RI falls: trailing edge
    assert uart.rd(Register.MSR) == Msr.TERI


def test_loopback_holds_host_input_until_loopback_ends(uart: Uart) -> None:
    uart.wr(Register.MCR, Mcr.LOOP)
    uart.dev.receive(b"x")
    assert not uart.rd(Register.LSR) & Lsr.DR
    uart.wr(Register.MCR, 0)
    assert uart.rd(Register.RBR) == ord("x")


# -- FIFO -------------------------------------------------------------------------


def test_fifo_enable_is_reflected_in_iir(uart: Uart) -> None:
    assert uart.rd(Register.IIR) == InterruptId.NONE
    uart.wr(Register.FCR, Fcr.FIFO_ENABLE)
    assert uart.rd(Register.IIR) == 0xC0 | InterruptId.NONE
    uart.wr(Register.FCR, 0)
    assert uart.rd(Register.IIR) == InterruptId.NONE


def test_rx_fifo_holds_sixteen_bytes_when_enabled(driven: Uart) -> None:
    driven.dev.receive(bytes(range(20)))
    assert driven.dev.rx_fifo_level == RX_FIFO_SIZE


def test_rx_holds_one_byte_without_fifo(uart: Uart) -> None:
    uart.dev.receive(b"abc")
    assert uart.dev.rx_fifo_level == 1
    assert [uart.rd(Register.RBR) for _ in range(3)] == [ord("a"), ord("b"), ord("c")]


def test_rx_fifo_reset_empties_fifo(driven: Uart) -> None:
    driven.dev.receive(b"abc")
    driven.wr(Register.FCR, Fcr.FIFO_ENABLE | Fcr.RCVR_FIFO_RESET)
    assert driven.dev.rx_fifo_level == 0
    assert not driven.rd(Register.LSR) & Lsr.DR


# -- interrupts ---------------------------------------------------------------------


def test_rx_interrupt_raised_on_receive(driven: Uart) -> None:
    driven.wr(Register.IER, Ier.ERBFI)
    assert not driven.line
    driven.dev.receive(b"a")
    assert driven.line
    assert driven.iir_id() in (InterruptId.RX_DATA, InterruptId.CHAR_TIMEOUT)


def test_rx_interrupt_cleared_when_fifo_drains(driven: Uart) -> None:
    driven.wr(Register.IER, Ier.ERBFI)
    driven.dev.receive(b"ab")
    driven.rd(Register.RBR)
    assert driven.line
    driven.rd(Register.RBR)
    assert not driven.line
    assert driven.iir_id() == InterruptId.NONE


@pytest.mark.parametrize(("trigger_bits", "level"), [(0x00, 1), (0x40, 4), (0x80, 8), (0xC0, 14)])
def test_rx_trigger_level_separates_data_available_from_timeout(
    driven: Uart, trigger_bits: int, level: int
) -> None:
    driven.wr(Register.FCR, Fcr.FIFO_ENABLE | trigger_bits)
    driven.wr(Register.IER, Ier.ERBFI)
    driven.dev.receive(bytes(level - 1))
    expected_below = InterruptId.CHAR_TIMEOUT if level > 1 else InterruptId.NONE
    assert driven.iir_id() == expected_below
    driven.dev.receive(b"\x00")
    assert driven.iir_id() == InterruptId.RX_DATA


def test_rx_data_without_fifo_is_data_available(uart: Uart) -> None:
    uart.wr(Register.IER, Ier.ERBFI)
    uart.dev.receive(b"a")
    assert uart.iir_id() == InterruptId.RX_DATA


def test_thre_interrupt_raised_when_etbei_enabled(driven: Uart) -> None:
    driven.wr(Register.IER, Ier.ETBEI)
    assert driven.line
    assert driven.iir_id() == InterruptId.THR_EMPTY


def test_thre_interrupt_reasserted_on_each_etbei_rising_edge(driven: Uart) -> None:
    # Linux's startup test: IER=THRI, read IIR, IER=0, IER=THRI, read IIR;
    # a UART that does not reassert THRE gets the slow UART_BUG_THRE timer.
    driven.wr(Register.IER, Ier.ETBEI)
    assert driven.iir_id() == InterruptId.THR_EMPTY
    driven.wr(Register.IER, 0)
    driven.wr(Register.IER, Ier.ETBEI)
    assert driven.iir_id() == InterruptId.THR_EMPTY


def test_reading_iir_clears_thre_interrupt(driven: Uart) -> None:
    driven.wr(Register.IER, Ier.ETBEI)
    driven.rd(Register.IIR)
    assert not driven.line
    assert driven.iir_id() == InterruptId.NONE


def test_rewriting_ier_without_rising_etbei_does_not_rearm_thre(driven: Uart) -> None:
    driven.wr(Register.IER, Ier.ETBEI)
    driven.rd(Register.IIR)
    driven.wr(Register.IER, Ier.ETBEI | Ier.ERBFI)
    assert driven.iir_id() == InterruptId.NONE


def test_thre_interrupt_raised_after_thr_write(driven: Uart) -> None:
    driven.wr(Register.IER, Ier.ETBEI)
    driven.rd(Register.IIR)
    driven.wr(Register.THR, ord("x"))
    assert driven.line
    assert driven.iir_id() == InterruptId.THR_EMPTY


def test_reading_iir_keeps_thre_when_it_is_not_the_reason(driven: Uart) -> None:
    driven.wr(Register.IER, Ier.ETBEI | Ier.ERBFI)
    driven.dev.receive(b"a")
    assert driven.iir_id() == InterruptId.RX_DATA  # RX outranks THRE (trigger 1)
    driven.rd(Register.RBR)
    assert driven.iir_id() == InterruptId.THR_EMPTY


def test_iir_priority_line_status_rx_thre_modem(uart: Uart) -> None:
    uart.wr(Register.FCR, Fcr.FIFO_ENABLE)
    uart.wr(Register.IER, Ier.ERBFI | Ier.ETBEI | Ier.ELSI | Ier.EDSSI)
    uart.wr(Register.MCR, Mcr.LOOP | Mcr.OUT2)  # lines change: modem status
    for _ in range(RX_FIFO_SIZE + 1):  # the 17th byte overruns: line status
        uart.wr(Register.THR, 0x41)
    uart.wr(Register.FCR, Fcr.FIFO_ENABLE | Fcr.RCVR_TRIGGER_MSB | Fcr.RCVR_TRIGGER_LSB)
    assert uart.iir_id() == InterruptId.LINE_STATUS
    uart.rd(Register.LSR)
    assert uart.iir_id() == InterruptId.RX_DATA
    for _ in range(RX_FIFO_SIZE):
        uart.rd(Register.RBR)
    assert uart.iir_id() == InterruptId.THR_EMPTY  # this read clears it
    assert uart.iir_id() == InterruptId.MODEM_STATUS
    uart.rd(Register.MSR)
    assert uart.iir_id() == InterruptId.NONE


def test_modem_status_interrupt_needs_edssi(uart: Uart) -> None:
    uart.wr(Register.MCR, Mcr.LOOP | Mcr.OUT2)
    assert uart.iir_id() == InterruptId.NONE
    uart.wr(Register.IER, Ier.EDSSI)
    assert uart.iir_id() == InterruptId.MODEM_STATUS


def test_out2_gates_irq_line(uart: Uart) -> None:
    uart.wr(Register.IER, Ier.ETBEI)
    assert uart.dev.pending_interrupt == InterruptId.THR_EMPTY
    assert uart.irq_calls == []  # pending, but OUT2 is clear
    uart.wr(Register.MCR, Mcr.OUT2)
    assert uart.irq_calls == [True]
    uart.wr(Register.MCR, 0)
    assert uart.irq_calls == [True, False]


def test_irq_callback_called_only_on_level_changes(driven: Uart) -> None:
    driven.wr(Register.IER, Ier.ERBFI | Ier.ETBEI)
    driven.dev.receive(b"abc")
    driven.dev.receive(b"def")
    driven.wr(Register.THR, ord("x"))
    driven.rd(Register.LSR)
    driven.rd(Register.SCR)
    assert driven.irq_calls == [True]
    driven.wr(Register.IER, 0)
    driven.wr(Register.IER, 0)
    assert driven.irq_calls == [True, False]


def test_irq_line_falls_and_rises_again_for_a_new_interrupt(driven: Uart) -> None:
    # The ISA IRQ is edge triggered in the guest: a new interrupt after the
    # handler saw "none pending" must produce a new rising edge.
    driven.wr(Register.IER, Ier.ERBFI)
    driven.dev.receive(b"a")
    driven.rd(Register.RBR)
    driven.dev.receive(b"b")
    assert driven.irq_calls == [True, False, True]


# -- line status ---------------------------------------------------------------------


def test_lsr_idle_reports_transmitter_empty(uart: Uart) -> None:
    assert uart.rd(Register.LSR) == Lsr.THRE | Lsr.TEMT


def test_lsr_data_ready_follows_rx_fifo(driven: Uart) -> None:
    driven.dev.receive(b"a")
    assert driven.rd(Register.LSR) & Lsr.DR
    driven.rd(Register.RBR)
    assert not driven.rd(Register.LSR) & Lsr.DR


def test_lsr_overrun_set_by_loopback_overflow_and_cleared_by_read(driven: Uart) -> None:
    driven.wr(Register.MCR, Mcr.LOOP)
    for value in range(RX_FIFO_SIZE + 1):
        driven.wr(Register.THR, value)
    assert driven.dev.overruns == 1
    assert driven.rd(Register.LSR) & Lsr.OE
    assert not driven.rd(Register.LSR) & Lsr.OE
    assert [driven.rd(Register.RBR) for _ in range(RX_FIFO_SIZE)] == list(range(RX_FIFO_SIZE))


def test_line_status_interrupt_on_overrun_cleared_by_reading_lsr(driven: Uart) -> None:
    driven.wr(Register.IER, Ier.ELSI)
    driven.dev.receive(bytes(RX_FIFO_SIZE + RX_BACKLOG_SIZE + 1))
    assert driven.iir_id() == InterruptId.LINE_STATUS
    driven.rd(Register.LSR)
    assert driven.iir_id() == InterruptId.NONE


def test_receive_beyond_backlog_counts_overruns(driven: Uart) -> None:
    taken = driven.dev.receive(bytes(RX_FIFO_SIZE + RX_BACKLOG_SIZE + 10))
    assert taken == RX_FIFO_SIZE + RX_BACKLOG_SIZE
    assert driven.dev.overruns == 10
    assert driven.dev.rx_space() == 0


def test_break_reads_as_zero_with_break_interrupt(driven: Uart) -> None:
    driven.dev.receive(b"a")
    driven.dev.receive_break()
    assert driven.rd(Register.LSR) & (Lsr.BI | Lsr.RCVR_FIFO_ERROR) == Lsr.RCVR_FIFO_ERROR
    assert driven.rd(Register.RBR) == ord("a")
    lsr = driven.rd(Register.LSR)
    assert lsr & Lsr.BI and lsr & Lsr.DR
    assert driven.rd(Register.RBR) == 0
    assert driven.rd(Register.LSR) == Lsr.THRE | Lsr.TEMT


# -- host input: backlog and back-pressure ---------------------------------------------


def test_backlog_refills_fifo_as_guest_reads(driven: Uart) -> None:
    data = bytes(i & 0xFF for i in range(1000))
    assert driven.dev.receive(data) == len(data)
    received = bytearray()
    while driven.rd(Register.LSR) & Lsr.DR:
        assert driven.dev.rx_fifo_level <= RX_FIFO_SIZE
        received.append(driven.rd(Register.RBR))
    assert bytes(received) == data
    assert driven.dev.overruns == 0


def test_rx_space_counts_fifo_and_backlog_room(driven: Uart) -> None:
    assert driven.dev.rx_space() == RX_FIFO_SIZE + RX_BACKLOG_SIZE
    driven.dev.receive(bytes(100))
    assert driven.dev.rx_space() == RX_FIFO_SIZE + RX_BACKLOG_SIZE - 100
    driven.rd(Register.RBR)
    assert driven.dev.rx_space() == RX_FIFO_SIZE + RX_BACKLOG_SIZE - 99


def test_wait_for_rx_space_returns_when_guest_reads(driven: Uart) -> None:
    driven.dev.receive(bytes(RX_FIFO_SIZE + RX_BACKLOG_SIZE))
    assert driven.dev.wait_for_rx_space(timeout=0.01) == 0
    reader = threading.Timer(0.05, driven.rd, args=(Register.RBR,))
    reader.start()
    try:
        assert driven.dev.wait_for_rx_space(timeout=10) == 1
    finally:
        reader.join()


# -- Linux's 8250 probe, end to end -------------------------------------------------------


def test_linux_autoconfig_identifies_a_16550a(uart: Uart) -> None:
    """The register dance of autoconfig() in drivers/tty/serial/8250/8250_port.c."""
    uart.wr(Register.IER, 0)
    assert uart.rd(Register.IER) & 0x0F == 0
    uart.wr(Register.IER, 0x0F)
    assert uart.rd(Register.IER) & 0x0F == 0x0F
    uart.wr(Register.IER, 0)
    uart.wr(Register.MCR, Mcr.LOOP | 0x0A)
    assert uart.rd(Register.MSR) & 0xF0 == 0x90
    uart.wr(Register.MCR, 0)
    uart.wr(Register.LCR, 0xBF)
    uart.wr(2, 0)  # EFR on a 16650; FCR here
    uart.wr(Register.LCR, 0)
    uart.wr(Register.FCR, Fcr.FIFO_ENABLE)
    assert uart.rd(Register.IIR) >> 6 == 3  # -> autoconfig_16550a
    uart.wr(Register.LCR, Lcr.DLAB)
    assert uart.rd(2) != 0  # no EFR under DLAB: not an ST16C650V1
    uart.wr(Register.LCR, 0xBF)
    assert uart.rd(2) != 0  # no EFR under 0xBF: not a 16650V2/16850
    uart.wr(Register.LCR, 0)
    uart.wr(Register.FCR, Fcr.FIFO_ENABLE | 0x20)  # 64-byte FIFO bit
    assert uart.rd(Register.IIR) & 0xE0 == 0xC0  # not a 16750
    assert uart.rd(Register.LSR) != 0xFF  # the startup "LSR safety check"


def test_linux_startup_txen_test_sees_an_interrupt(driven: Uart) -> None:
    # serial8250_do_startup: IER=THRI; if LSR.TEMT and IIR says "none", the
    # driver assumes a broken UART (UART_BUG_TXEN).
    driven.wr(Register.IER, Ier.ETBEI)
    assert driven.rd(Register.LSR) & Lsr.TEMT
    assert not driven.rd(Register.IIR) & InterruptId.NONE


# -- concurrency and properties ---------------------------------------------------------------


def test_irq_line_consistent_after_concurrent_access(driven: Uart) -> None:
    driven.wr(Register.IER, Ier.ERBFI | Ier.ETBEI)

    def guest() -> None:
        for _ in range(2000):
            driven.rd(Register.IIR)
            driven.rd(Register.RBR)
            driven.wr(Register.THR, 0x2E)

    def host() -> None:
        for _ in range(2000):
            driven.dev.receive(b"k")

    threads = [threading.Thread(target=work) for work in (guest, guest, host)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    calls = driven.irq_calls
    assert all(a != b for a, b in zip(calls, calls[1:]))
    assert driven.line == driven.dev.irq_asserted
    assert len(driven.output) == 4000


# Values that switch things on (LOOP, OUT2, FIFO enable and reset, DLAB, all
# IER bits) are drawn often, so short sequences reach the interesting states.
_register_value = st.one_of(
    st.integers(0, 0xFF),
    st.sampled_from([0x00, 0x01, 0x03, 0x0F, 0x10, 0x18, 0x1B, 0x80, 0xC7]),
)
_register_access = st.one_of(
    st.tuples(st.just("read"), st.integers(0, 8), st.sampled_from([1, 2])),
    st.tuples(st.just("write"), st.integers(0, 8), _register_value),
    st.tuples(st.just("transmit"), st.integers(0, 0xFF), st.integers(1, 20)),
    st.tuples(st.just("receive"), st.binary(max_size=40), st.just(0)),
    st.tuples(st.just("break"), st.just(0), st.just(0)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_register_access, max_size=80))
def test_any_access_sequence_keeps_invariants(ops: list[tuple[str, object, int]]) -> None:
    uart = Uart()
    for op, arg, value in ops:
        if op == "read":
            uart.dev.read(arg, value)
        elif op == "write":
            uart.dev.write(arg, 1, value)
        elif op == "transmit":
            for _ in range(value):
                uart.dev.write(Register.THR, 1, arg)
        elif op == "receive":
            uart.dev.receive(arg)
        else:
            uart.dev.receive_break()

        assert uart.dev.rx_fifo_level <= RX_FIFO_SIZE
        if uart.dev.pending_interrupt != InterruptId.THR_EMPTY:  # else IIR reads clear it
            fifo_on = bool(uart.rd(Register.IIR) & 0xC0)
            assert fifo_on or uart.dev.rx_fifo_level <= 1
        pending = uart.dev.pending_interrupt != InterruptId.NONE
        out2 = bool(uart.rd(Register.MCR) & Mcr.OUT2)
        assert uart.line == uart.dev.irq_asserted == (pending and out2)
        calls = uart.irq_calls
        assert all(a != b for a, b in zip(calls, calls[1:]))
        assert not calls or calls[0] is True
