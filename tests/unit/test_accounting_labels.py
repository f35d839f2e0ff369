"""`ExitAccounting.book_as` on the accounting's C struct, with exits booked as the C code books them."""

from __future__ import annotations

from kvmpy import ExitReason
from kvmpy.stats.accounting import _SHIFT, LABEL_ROW0, LABEL_ROWS, NBUCKETS, ExitAccounting, NullAccounting

HLT, INTERNAL, MSR = ExitReason.HLT, ExitReason.INTERNAL_ERROR, ExitReason.X86_RDMSR


def exit_(acct: ExitAccounting, reason: int, guest_ns: int) -> None:
    """What kvmpy_run_acct does for one exit (without the VMM-time half)."""
    c = acct.c
    c.t_enter, c.t_leave = 1_000, 1_000 + guest_ns
    c.guest[reason << _SHIFT | min(guest_ns.bit_length(), NBUCKETS - 1)] += 1
    c.last = reason


def test_the_exit_moves_to_the_labels_row_in_the_bucket_it_was_booked_in():
    acct = ExitAccounting()
    exit_(acct, INTERNAL, 70_000)  # bucket 17
    exit_(acct, INTERNAL, 300)  # bucket 9
    acct.book_as("syscall trap")
    row = acct.c.last
    assert row >= LABEL_ROW0
    snap = acct.snapshot()
    assert snap["reasons"]["syscall trap"]["guest_hist"][9] == 1
    assert snap["reasons"]["INTERNAL_ERROR"]["guest_hist"][17] == 1
    assert sum(snap["reasons"]["INTERNAL_ERROR"]["guest_hist"]) == 1
    assert acct.exits == {INTERNAL: 2} and acct.handled == {"syscall trap": 1}


def test_an_exit_is_booked_once():
    acct = ExitAccounting()
    exit_(acct, HLT, 5_000)
    acct.book_as("pause")
    acct.book_as("pause")
    acct.book_as("other")
    assert acct.handled == {"pause": 1}


def test_before_any_exit_there_is_nothing_to_book():
    acct = ExitAccounting()
    acct.book_as("syscall trap")
    assert acct.snapshot()["reasons"] == {} and acct.handled == {}
    NullAccounting().book_as("syscall trap")  # counts nothing, raises nothing


def test_labels_past_the_rows_stay_under_their_kvm_reason():
    acct = ExitAccounting()
    for i in range(LABEL_ROWS + 2):
        exit_(acct, INTERNAL, 1_000)
        acct.book_as(f"completion of insn{i}")
    snap = acct.snapshot()
    assert len(acct.handled) == LABEL_ROWS
    assert snap["reasons"]["INTERNAL_ERROR"]["count"] == 2
    assert snap["kvm_reasons"] == {"INTERNAL_ERROR": LABEL_ROWS + 2}


def test_one_label_under_two_kvm_reasons_gets_two_names():
    acct = ExitAccounting()
    exit_(acct, HLT, 1_000)
    acct.book_as("demo")
    exit_(acct, MSR, 1_000)
    acct.book_as("demo")
    reasons = acct.snapshot()["reasons"]
    assert reasons["demo"]["kvm_reason"] == "HLT"
    assert reasons["demo (X86_RDMSR)"]["kvm_reason"] == "X86_RDMSR"
    assert acct.exits == {HLT: 1, MSR: 1} and acct.handled == {"demo": 2}
