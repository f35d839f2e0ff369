"""Exit decoding from a kvm_run built in a plain buffer (no /dev/kvm)."""

from __future__ import annotations

import pytest

from kvmpy._kvm import ffi, lib
from kvmpy.exits import (Exit, ExitReason, HltExit, InternalError, InternalErrorExit, IoExit, MmioExit,
                         MsrExit, SystemEvent, SystemEventExit, decode)

PAGE = 4096
DATA_OFFSET = PAGE  # where KVM puts port I/O data: the page after struct kvm_run


@pytest.fixture
def run():
    """(struct kvm_run *, memoryview of the whole 2-page area) over a bytearray."""
    buf = bytearray(2 * PAGE)
    assert ffi.sizeof("struct kvm_run") <= PAGE
    cdata = ffi.from_buffer(buf)
    view = memoryview(buf)
    yield ffi.cast("struct kvm_run *", cdata), view
    view.release()
    ffi.release(cdata)


def _io(r, *, direction, port, size, count, offset=DATA_OFFSET):
    r.exit_reason = lib.KVM_EXIT_IO
    r.io.direction, r.io.port, r.io.size, r.io.count, r.io.data_offset = direction, port, size, count, offset


def test_io_out_record_reads_the_values_at_the_data_offset(run):
    r, page = run
    _io(r, direction=lib.KVM_EXIT_IO_OUT, port=0x3F8, size=2, count=3)
    page[DATA_OFFSET:DATA_OFFSET + 6] = bytes.fromhex("3412 7856 bc9a")
    e = decode(r, page)
    assert isinstance(e, IoExit)
    assert (e.port, e.size, e.count, e.is_write) == (0x3F8, 2, 3, True)
    assert e.values() == [0x1234, 0x5678, 0x9ABC]


def test_io_in_complete_writes_each_value_into_the_page(run):
    r, page = run
    _io(r, direction=lib.KVM_EXIT_IO_IN, port=0x60, size=4, count=2)
    e = decode(r, page)
    assert e.is_write is False
    e.complete(0x1122_3344, 0x1_AABB_CCDD)  # the second is truncated to 4 bytes
    assert bytes(page[DATA_OFFSET:DATA_OFFSET + 8]) == bytes.fromhex("44332211 ddccbbaa")


def test_io_data_outside_the_page_is_a_value_error(run):
    r, page = run
    _io(r, direction=lib.KVM_EXIT_IO_OUT, port=0x80, size=1, count=2, offset=2 * PAGE - 1)
    with pytest.raises(ValueError, match="outside the kvm_run page"):
        decode(r, page)


def test_mmio_write_record_has_address_size_and_value(run):
    r, page = run
    r.exit_reason = lib.KVM_EXIT_MMIO
    r.mmio.phys_addr, r.mmio.len, r.mmio.is_write = 0xFEB0_0010, 4, 1
    r.mmio.data[0:4] = [0xEF, 0xBE, 0xAD, 0xDE]
    e = decode(r, page)
    assert isinstance(e, MmioExit)
    assert (e.address, e.size, e.is_write, e.value) == (0xFEB0_0010, 4, True, 0xDEAD_BEEF)


def test_mmio_read_complete_fills_run_mmio_data(run):
    r, page = run
    r.exit_reason = lib.KVM_EXIT_MMIO
    r.mmio.phys_addr, r.mmio.len, r.mmio.is_write = 0xD0000, 2, 0
    e = decode(r, page)
    assert e.is_write is False
    e.complete(0x12_ABCD)
    assert list(r.mmio.data[0:3]) == [0xCD, 0xAB, 0]


def test_internal_error_with_instruction_bytes(run):
    r, page = run
    r.exit_reason = lib.KVM_EXIT_INTERNAL_ERROR
    ef = r.emulation_failure
    ef.suberror, ef.ndata = lib.KVM_INTERNAL_ERROR_EMULATION, 3
    ef.flags = lib.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
    ef.insn_size = 3
    ef.insn_bytes[0:3] = [0x0F, 0xAE, 0x10]
    e = decode(r, page)
    assert isinstance(e, InternalErrorExit)
    assert e.is_emulation_failure
    assert e.insn_bytes == b"\x0f\xae\x10"


def test_internal_error_without_the_bytes_flag_has_no_instruction_bytes(run):
    r, page = run
    r.exit_reason = lib.KVM_EXIT_INTERNAL_ERROR
    ef = r.emulation_failure
    ef.suberror, ef.ndata, ef.flags, ef.insn_size = lib.KVM_INTERNAL_ERROR_EMULATION, 6, 0, 3
    ef.insn_bytes[0:3] = [0xCC, 0xCC, 0xCC]
    e = decode(r, page)
    assert e.insn_bytes == b""
    assert len(e.data) == 6


def test_internal_error_of_another_suberror_is_described_by_name(run):
    r, page = run
    r.exit_reason = lib.KVM_EXIT_INTERNAL_ERROR
    r.internal.suberror, r.internal.ndata = lib.KVM_INTERNAL_ERROR_DELIVERY_EV, 2
    r.internal.data[0:2] = [0x80000b0e, 0x10]
    e = decode(r, page)
    assert not e.is_emulation_failure
    assert e.data == (0x80000B0E, 0x10)
    assert e.describe() == "KVM internal error DELIVERY_EV data 0x80000b0e 0x10"
    assert InternalError(e.suberror) is InternalError.DELIVERY_EV


def test_system_event_record_has_type_and_data(run):
    r, page = run
    r.exit_reason = lib.KVM_EXIT_SYSTEM_EVENT
    r.system_event.type, r.system_event.ndata = lib.KVM_SYSTEM_EVENT_RESET, 2
    r.system_event.data[0:2] = [7, 9]
    e = decode(r, page)
    assert isinstance(e, SystemEventExit)
    assert (SystemEvent(e.type), e.data) == (SystemEvent.RESET, (7, 9))


def test_rdmsr_exit_complete_sets_the_value(run):
    r, page = run
    r.exit_reason = lib.KVM_EXIT_X86_RDMSR
    r.msr.index, r.msr.reason = 0xC000_0082, lib.KVM_MSR_EXIT_REASON_FILTER
    e = decode(r, page)
    assert isinstance(e, MsrExit)
    assert (e.index, e.is_write, e.msr_reason) == (0xC000_0082, False, lib.KVM_MSR_EXIT_REASON_FILTER)
    e.complete(0xFFFF_FFFF_8100_0000)
    assert (r.msr.data, r.msr.error) == (0xFFFF_FFFF_8100_0000, 0)


def test_wrmsr_exit_carries_the_written_value_and_can_inject_gp(run):
    r, page = run
    r.exit_reason = lib.KVM_EXIT_X86_WRMSR
    r.msr.index, r.msr.data = 0x10, 0x1234
    e = decode(r, page)
    assert (e.is_write, e.data) == (True, 0x1234)
    e.complete(error=True)
    assert r.msr.error == 1


def test_hlt_decodes_to_hlt_exit(run):
    r, page = run
    r.exit_reason = lib.KVM_EXIT_HLT
    assert type(decode(r, page)) is HltExit


def test_unknown_reason_decodes_to_the_base_exit(run):
    r, page = run
    r.exit_reason = 9999
    e = decode(r, page)
    assert type(e) is Exit
    assert (e.reason, e.name) == (9999, "EXIT_9999")


def test_exit_name_is_the_exit_reason_name(run):
    r, page = run
    r.exit_reason = lib.KVM_EXIT_SHUTDOWN
    assert decode(r, page).name == ExitReason.SHUTDOWN.name == "SHUTDOWN"
