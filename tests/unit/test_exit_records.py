"""Every exit reason <linux/kvm.h> names decodes to a typed record, from synthetic kvm_run contents.

For each reason the test writes the exit union's bytes itself, laid out with
`struct` as the header declares the member (natural alignment, little
endian), into a kvm_run in a plain buffer, and checks the record's fields.
So the cdef's view of each union member is checked against the header's
layout, independently of cffi's field accessors.
"""

from __future__ import annotations

import struct

import pytest

from kvmpy import exits as X
from kvmpy._kvm import ffi, lib

UNION = ffi.offsetof("struct kvm_run", "hw")  # every member starts at the union's start


def _run(reason: int, union: bytes):
    buf = bytearray(8192)
    buf[UNION:UNION + len(union)] = union
    run = ffi.cast("struct kvm_run *", ffi.from_buffer(buf))
    run.exit_reason = reason
    return run, memoryview(buf), buf


U64S = tuple(range(0x1000, 0x1000 + 32))

# reason name -> (union bytes, record class, expected fields)
CASES: dict[str, tuple[bytes, type, dict]] = {
    "UNKNOWN": (struct.pack("<Q", 0x77), X.UnknownExit, {"hardware_exit_reason": 0x77}),
    "EXCEPTION": (struct.pack("<II", 14, 6), X.ExceptionExit, {"exception": 14, "error_code": 6}),
    "IO": (struct.pack("<BBHIQ", 1, 2, 0x3F8, 1, 4096), X.IoExit,
           {"port": 0x3F8, "size": 2, "count": 1, "is_write": True}),
    "HYPERCALL": (struct.pack("<7Q", 9, 1, 2, 3, 4, 5, 6), X.HypercallExit, {"nr": 9, "args": (1, 2, 3, 4, 5, 6)}),
    "DEBUG": (struct.pack("<IIQQQ", 3, 0, 0xFFFF_8000_0000_1234, 0xFF0, 0x400), X.DebugExit,
              {"exception": 3, "pc": 0xFFFF_8000_0000_1234, "dr6": 0xFF0, "dr7": 0x400}),
    "HLT": (b"", X.HltExit, {}),
    "MMIO": (struct.pack("<Q8sIB", 0xD000_0010, bytes.fromhex("efbeadde00000000"), 4, 1), X.MmioExit,
             {"address": 0xD000_0010, "size": 4, "is_write": True, "value": 0xDEADBEEF}),
    "IRQ_WINDOW_OPEN": (b"", X.IrqWindowOpenExit, {}),
    "SHUTDOWN": (b"", X.ShutdownExit, {}),
    "FAIL_ENTRY": (struct.pack("<QI", 0x21, 1), X.FailEntryExit, {"hardware_entry_failure_reason": 0x21, "cpu": 1}),
    "INTR": (b"", X.IntrExit, {}),
    "SET_TPR": (b"", X.SetTprExit, {}),
    "TPR_ACCESS": (struct.pack("<QII", 0xFFFF_1000, 1, 0), X.TprAccessExit, {"rip": 0xFFFF_1000, "is_write": True}),
    "S390_SIEIC": (struct.pack("<BxHI", 4, 0xB2F0, 0x1234_5678), X.S390SieicExit,
                   {"icptcode": 4, "ipa": 0xB2F0, "ipb": 0x1234_5678}),
    "S390_RESET": (struct.pack("<Q", 0x11), X.S390ResetExit, {"flags": 0x11}),
    "S390_UCONTROL": (struct.pack("<QI", 0xABC0_0000, 0x11), X.S390UcontrolExit,
                      {"trans_exc_code": 0xABC0_0000, "pgm_code": 0x11}),
    "DCR": (struct.pack("<IIB", 0x80, 0x55AA, 1), X.DcrExit, {"dcrn": 0x80, "data": 0x55AA, "is_write": True}),
    "NMI": (b"", X.NmiExit, {}),
    "INTERNAL_ERROR": (struct.pack("<II3Q", lib.KVM_INTERNAL_ERROR_DELIVERY_EV, 3, 10, 20, 30), X.InternalErrorExit,
                       {"suberror": lib.KVM_INTERNAL_ERROR_DELIVERY_EV, "data": (10, 20, 30), "insn_bytes": b""}),
    "OSI": (struct.pack("<32Q", *U64S), X.OsiExit, {"gprs": U64S}),
    "PAPR_HCALL": (struct.pack("<11Q", 0x10, 0x20, *range(9)), X.PaprHcallExit,
                   {"nr": 0x10, "ret": 0x20, "args": tuple(range(9))}),
    "WATCHDOG": (b"", X.WatchdogExit, {}),
    "S390_TSCH": (struct.pack("<HHIIIB", 1, 2, 3, 4, 5, 1), X.S390TschExit,
                  {"subchannel_id": 1, "subchannel_nr": 2, "io_int_parm": 3, "io_int_word": 4, "ipb": 5,
                   "dequeued": True}),
    "EPR": (struct.pack("<I", 0x42), X.EprExit, {"epr": 0x42}),
    "SYSTEM_EVENT": (struct.pack("<II2Q", lib.KVM_SYSTEM_EVENT_RESET, 2, 7, 8), X.SystemEventExit,
                     {"type": lib.KVM_SYSTEM_EVENT_RESET, "data": (7, 8)}),
    "S390_STSI": (struct.pack("<QBBBBH", 0x8000, 1, 0, 3, 2, 0x101), X.S390StsiExit,
                  {"addr": 0x8000, "ar": 1, "fc": 3, "sel1": 2, "sel2": 0x101}),
    "IOAPIC_EOI": (struct.pack("<B", 0x31), X.IoapicEoiExit, {"vector": 0x31}),
    "HYPERV": (struct.pack("<II4Q", lib.KVM_EXIT_HYPERV_HCALL, 0, 0x10001, 0, 0xAA, 0xBB), X.HypervExit,
               {"type": lib.KVM_EXIT_HYPERV_HCALL, "info": X.HypervHcall(0x10001, 0, (0xAA, 0xBB))}),
    "ARM_NISV": (struct.pack("<QQ", 0x93, 0x900_0000), X.ArmNisvExit, {"esr_iss": 0x93, "fault_ipa": 0x900_0000}),
    "X86_RDMSR": (struct.pack("<B7xIIQ", 0, lib.KVM_MSR_EXIT_REASON_FILTER, 0xC000_0082, 0), X.MsrExit,
                  {"index": 0xC000_0082, "msr_reason": lib.KVM_MSR_EXIT_REASON_FILTER, "is_write": False}),
    "X86_WRMSR": (struct.pack("<B7xIIQ", 0, lib.KVM_MSR_EXIT_REASON_UNKNOWN, 0x10, 0x1234), X.MsrExit,
                  {"index": 0x10, "data": 0x1234, "is_write": True}),
    "DIRTY_RING_FULL": (b"", X.DirtyRingFullExit, {}),
    "AP_RESET_HOLD": (b"", X.ApResetHoldExit, {}),
    "X86_BUS_LOCK": (b"", X.BusLockExit, {}),
    "XEN": (struct.pack("<IIIIQQ6Q", lib.KVM_EXIT_XEN_HCALL, 0, 1, 0, 24, 0, *range(1, 7)), X.XenExit,
            {"type": lib.KVM_EXIT_XEN_HCALL, "longmode": 1, "cpl": 0, "input": 24, "params": tuple(range(1, 7))}),
    "RISCV_SBI": (struct.pack("<10Q", 0x10, 2, *range(6), 7, 8), X.RiscvSbiExit,
                  {"extension_id": 0x10, "function_id": 2, "args": tuple(range(6)), "ret": (7, 8)}),
    "RISCV_CSR": (struct.pack("<4Q", 0x15, 1, 0xFF, 9), X.RiscvCsrExit,
                  {"csr_num": 0x15, "new_value": 1, "write_mask": 0xFF, "ret_value": 9}),
    "NOTIFY": (struct.pack("<I", lib.KVM_NOTIFY_CONTEXT_INVALID), X.NotifyExit,
               {"flags": lib.KVM_NOTIFY_CONTEXT_INVALID, "context_invalid": True}),
}


def test_every_exit_reason_of_the_header_has_a_case_here():
    assert {r.name for r in X.ExitReason} == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_exit_reason_decodes_to_its_typed_record(name):
    union, cls, fields = CASES[name]
    run, page, _buf = _run(X.ExitReason[name], union)
    record = X.decode(run, page)
    assert type(record) is cls and type(record) is not X.Exit and type(record) is not X.RawExit
    assert record.reason == X.ExitReason[name] and record.name == name
    for attr, want in fields.items():
        assert getattr(record, attr) == want, attr


def test_hyperv_synic_and_syndbg_members_decode():
    run, page, _ = _run(X.ExitReason.HYPERV, struct.pack("<IIIIQQ", lib.KVM_EXIT_HYPERV_SYNIC, 0, 0x40000080, 0,
                                                         1, 0x5000))
    assert X.decode(run, page).info == X.HypervSynic(0x40000080, 1, 0x5000, 0)
    run, page, _ = _run(X.ExitReason.HYPERV, struct.pack("<IIII5Q", lib.KVM_EXIT_HYPERV_SYNDBG, 0, 0x400000F1, 0,
                                                         2, 3, 4, 5, 6))
    assert X.decode(run, page).info == X.HypervSyndbg(0x400000F1, 2, 3, 4, 5, 6)
    run, page, _ = _run(X.ExitReason.HYPERV, struct.pack("<II", 99, 0))
    assert X.decode(run, page).info is None  # a Hyper-V exit type this header does not know


def test_emulation_failure_overlay_gives_the_instruction_bytes():
    union = struct.pack("<IIQB15s", lib.KVM_INTERNAL_ERROR_EMULATION, 3,
                        lib.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES, 2, b"\x0f\x0b")
    run, page, _ = _run(X.ExitReason.INTERNAL_ERROR, union)
    e = X.decode(run, page)
    assert e.is_emulation_failure and e.insn_bytes == b"\x0f\x0b"
