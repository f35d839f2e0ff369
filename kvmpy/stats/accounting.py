"""Always-on, cheap exit accounting for one vCPU.

The timing half runs in C, around the KVM_RUN ioctl itself
(`kvmpy_run_acct` in kvmpy/_build_kvm.py): it reads CLOCK_MONOTONIC before
and after the ioctl and books, per exit, the guest time (inside KVM_RUN)
in the (reason, log2 ns) bucket of the guest table, whose row sums are the
exit counts, and the VMM time that ended at this entry (from the previous
exit to this KVM_RUN) in the previous reason's bucket of the VMM table and
its nanosecond total. Python only adds the port of an I/O exit and the
address of an MMIO exit (`count_mmio`, a dict update); port exits are
counted by port and direction in C too, in a small open-addressing table.

Cheapness is the design constraint (issue 6, item 7: at most 5% on the
exit loop; scripts/bench_stats_overhead.py measures it): done in Python,
the two clock reads and three list updates cost ~0.5 us of a ~8 us exit.

The total guest time is not summed per exit: from the first KVM_RUN to the
latest exit, every nanosecond is either in the guest or in a VMM interval
already booked, so guest time = elapsed - VMM time, exactly. Everything
else (names, dicts, per-device grouping) is computed when someone reads,
from another thread if need be: a snapshot is consistent to within an
exit. The time between one `VcpuLoop.run()` returning and the next
starting counts as VMM time of the exit that ended the first.
`NullAccounting` turns all of it off (for measuring what it costs).

Exits are booked by what kvmpy did with them, not only by KVM's reason:
a handler that consumed an exit names it (`Exit.handled_as`, e.g.
"syscall trap", "completion of int3": both arrive as KVM_EXIT_INTERNAL_ERROR)
and the loop calls `book_as(label)`, which moves the exit, and the VMM
time that follows it, from its KVM reason's row to a row of its own. The
raw KVM reason stays known for every row (`kvm_reason` in the snapshot,
`exits` still counts by KVM reason).
"""

from __future__ import annotations

from collections import Counter
from time import perf_counter_ns
from typing import Any

from .._kvm import ffi, lib
from ..exits import ExitReason

NBUCKETS = lib.KVMPY_ACCT_BUCKETS  # bucket b holds durations with bit_length b: [2^(b-1), 2^b) ns
MAX_REASONS = lib.KVMPY_ACCT_REASONS  # KVM_EXIT_* values are below this (the highest in 6.x is ~41)
_SHIFT = 6  # NBUCKETS == 1 << _SHIFT: table index = reason << _SHIFT | bucket
_DIR_SHIFT = 16  # io key = port | direction << 16 (no tuple per exit)

IO_IN, IO_OUT = 0, 1  # KVM_EXIT_IO_IN / _OUT
_PORT_SLOTS = lib.KVMPY_ACCT_PORT_SLOTS
# Rows of the C tables past every KVM_EXIT_* value hold exits booked under a
# label (`book_as`); the C code clamps unknown reasons to the last row.
LABEL_ROW0 = max(48, max(ExitReason) + 1)
LABEL_ROWS = MAX_REASONS - 1 - LABEL_ROW0


def reason_name(reason: int) -> str:
    """The KVM_EXIT_* name without the prefix ("IO", "HLT"), or EXIT_<n> if unknown."""
    try:
        return ExitReason(reason).name
    except ValueError:
        return f"EXIT_{reason}"


def bucket_bounds(bucket: int) -> tuple[int, int]:
    """[low, high) in ns of a log2 histogram bucket."""
    return (0, 1) if bucket == 0 else (1 << (bucket - 1), 1 << bucket)


class ExitAccounting:
    """Exit counters and time histograms of one vCPU, fed by `VcpuLoop`.

    `c` is the `struct kvmpy_acct` the loop passes to the accounted
    KVM_RUN. Subclasses that need to see every exit set `per_exit_hook`
    and implement `after_exit(reason)` (the loop calls it after each
    exit is booked).
    """

    per_exit_hook = False

    def __init__(self, vcpu_id: int = 0) -> None:
        self.vcpu_id = vcpu_id
        self.assists = 0  # instructions completed by kvmpy.assists (the loop counts them)
        self.started_ns = perf_counter_ns()
        self.c: Any = ffi.new("struct kvmpy_acct *")
        self.c.last = -1
        self.c.fd = -1
        self._mmio: dict[int, int] = {}
        self._label_row: dict[tuple[int, str], int] = {}  # (KVM reason, label) -> row
        self._row_label: dict[int, tuple[int, str]] = {}  # row -> (KVM reason, label)
        self._by_label: dict[str, tuple[int, int]] = {}  # label -> (KVM reason, row) last booked: the fast path
        self._guest_cells: Any = self.c.guest  # one cdata view, not one per access

    def bind(self, vcpu: Any) -> None:
        """Point the C struct at `vcpu` (its fd and kvm_run), before the loop's first KVM_RUN."""
        self.c.fd = vcpu.fd
        self.c.run = vcpu.run_struct

    def after_exit(self, reason: int) -> None:
        """Called per exit when `per_exit_hook` is set; nothing here."""

    def carry_over(self, old: ExitAccounting) -> None:
        """Take over what `old` counted so far (an accounting that replaces the loop's before its run)."""
        self.assists, self.started_ns = old.assists, old.started_ns
        # SLF001 is wrong here: the same class reads its own state off another instance.
        self._mmio, self._label_row, self._row_label, self._by_label = (
            old._mmio, old._label_row, old._row_label, old._by_label)  # noqa: SLF001
        if old.c is not None:
            ffi.memmove(self.c, old.c, ffi.sizeof("struct kvmpy_acct"))

    # -- the C struct, as the readers below use it ---------------------------------

    @property
    def _guest(self) -> list[int]:
        return ffi.unpack(self.c.guest, MAX_REASONS * NBUCKETS)

    @property
    def _vmm(self) -> list[int]:
        return ffi.unpack(self.c.vmm, MAX_REASONS * NBUCKETS)

    @property
    def _vmm_total(self) -> list[int]:
        return ffi.unpack(self.c.vmm_total, MAX_REASONS)

    @property
    def _io(self) -> dict[int, int]:
        """{direction << 16 | port: count}, from the C table of port exits."""
        keys = ffi.unpack(self.c.io_key, _PORT_SLOTS)
        counts = ffi.unpack(self.c.io_count, _PORT_SLOTS)
        return {k - 1: n for k, n in zip(keys, counts) if k}

    @property
    def io_uncounted(self) -> int:
        """Port exits not counted by port: the table of ports was full (more than 512 ports)."""
        return self.c.io_other

    @property
    def _t_first(self) -> int:
        return self.c.t_first

    @property
    def _t_enter(self) -> int:
        return self.c.t_enter

    @property
    def _t_leave(self) -> int:
        return self.c.t_leave

    @property
    def _last(self) -> int:
        return self.c.last

    # -- the hot path's Python half (called by the loop on MMIO exits) ---------------

    def count_io(self, port: int, direction: int) -> None:
        """Count a port exit by hand (the accounted KVM_RUN counts the loop's own)."""
        lib.kvmpy_acct_count_port(self.c, (direction << _DIR_SHIFT | port) + 1)

    def count_mmio(self, addr: int) -> None:
        try:
            self._mmio[addr] += 1
        except KeyError:
            self._mmio[addr] = 1

    def book_as(self, label: str) -> None:
        """Book the latest exit (and the VMM time until the next KVM_RUN) under `label`.

        Called by the loop when the handler that consumed the exit named it
        (`Exit.handled_as`). Once per exit: the exit moves from its KVM
        reason's row to the label's row in the guest-time table, and the C
        code charges the VMM time that follows to the row in `last`. A vCPU
        has LABEL_ROWS label rows; exits of further labels stay under their
        KVM reason.
        """
        c = self.c
        reason = c.last
        if not 0 <= reason < LABEL_ROW0:
            return  # no exit yet, or this exit is booked already
        seen = self._by_label.get(label)
        if seen is not None and seen[0] == reason:
            row = seen[1]
        else:
            row = self._new_row(reason, label)
            if row is None:
                return
        b = (c.t_leave - c.t_enter).bit_length()  # the bucket the C code booked this exit in
        if b >= NBUCKETS:
            b = NBUCKETS - 1
        guest = self._guest_cells
        guest[reason << _SHIFT | b] -= 1
        guest[row << _SHIFT | b] += 1
        c.last = row

    def _new_row(self, reason: int, label: str) -> int | None:
        row = self._label_row.get((reason, label))
        if row is None:
            if len(self._label_row) >= LABEL_ROWS:
                return None
            row = LABEL_ROW0 + len(self._label_row)
            self._label_row[reason, label] = row
            self._row_label[row] = (reason, label)
        self._by_label[label] = (reason, row)
        return row

    # -- reading ------------------------------------------------------------------

    def kvm_reason(self, row: int) -> int:
        """The KVM_EXIT_* value of a table row (a label row's exits all had one reason)."""
        entry = self._row_label.get(row)
        return entry[0] if entry is not None else row

    def _by_kvm_reason(self, sums: dict[int, int]) -> Counter[int]:
        out: Counter[int] = Counter()
        for row, n in sums.items():
            out[self.kvm_reason(row)] += n
        return out

    @property
    def exits(self) -> Counter[int]:
        """{KVM_EXIT_* value: count} of the exits so far (reasons never seen are absent)."""
        return self._by_kvm_reason(_row_sums(self._guest[:]))

    @property
    def handled(self) -> Counter[str]:
        """{label: count} of the exits a handler named (`book_as`)."""
        sums = _row_sums(self._guest[:])
        out: Counter[str] = Counter()
        for row, (_, label) in self._row_label.copy().items():
            if sums.get(row):
                out[label] += sums[row]
        return out

    @property
    def total_exits(self) -> int:
        return sum(self._guest[:])

    @property
    def io(self) -> Counter[tuple[int, int]]:
        """{(port, direction): count}; direction 1 is out (KVM_EXIT_IO_OUT), 0 is in."""
        return Counter({(k & 0xFFFF, k >> _DIR_SHIFT): n for k, n in self._io.copy().items()})

    @property
    def mmio(self) -> Counter[int]:
        """{guest-physical address: count} of MMIO exits."""
        return Counter(self._mmio.copy())

    @property
    def vmm_ns_by_reason(self) -> Counter[int]:
        """{reason: nanoseconds the VMM spent handling exits of that reason}."""
        return self._by_kvm_reason({r: ns for r, ns in enumerate(self._vmm_total[:]) if ns})

    @property
    def vmm_ns_total(self) -> int:
        return sum(self._vmm_total[:])

    @property
    def elapsed_ns(self) -> int:
        """From the first KVM_RUN to the latest exit (0 before the first exit)."""
        if self._last < 0:
            return 0
        return self._t_leave - self._t_first

    @property
    def guest_ns_total(self) -> int:
        """Nanoseconds inside KVM_RUN (completed runs)."""
        return max(self.elapsed_ns - self.vmm_ns_total, 0)

    def _rows_of(self, reason: int) -> list[int]:
        return [reason] + [row for row, (r, _) in self._row_label.copy().items() if r == reason]

    def guest_hist(self, reason: int | None = None) -> list[int]:
        """Log2 histogram (NBUCKETS counts) of guest time before exits (of KVM `reason`, or all)."""
        table = self._guest[:]
        if reason is None:
            return _hist(table, None)
        return _sum_hists(table, self._rows_of(reason))

    def vmm_hist(self, reason: int | None = None) -> list[int]:
        """Log2 histogram of VMM handling time per exit (of KVM `reason`, or all)."""
        table = self._vmm[:]
        if reason is None:
            return _hist(table, None)
        return _sum_hists(table, self._rows_of(reason))

    def snapshot(self, pio: Any = None, mmio: Any = None) -> dict[str, Any]:
        """Everything as plain JSON-ready data.

        With the loop's buses (`pio`, `mmio`: `kvmpy.bus.Bus`), ports and
        MMIO addresses also carry the name of the device that claims them.
        """
        guest, vmm, vmm_total = self._guest[:], self._vmm[:], self._vmm_total[:]
        io, mm = self._io.copy(), self._mmio.copy()
        t_first, t_leave, last = self._t_first, self._t_leave, self._last
        elapsed = t_leave - t_first if last >= 0 else 0
        counts = _row_sums(guest)
        vmm_rows = _row_sums(vmm)
        vmm_sum = sum(vmm_total)
        labels = self._row_label.copy()
        reasons = {}
        kvm_reasons: dict[str, int] = {}
        for r in sorted(set(counts) | set(vmm_rows)):
            code, label = labels.get(r, (r, None))
            kvm_name = reason_name(code)
            name = label or kvm_name
            if name in reasons:  # one label used under two KVM reasons
                name = f"{label} ({kvm_name})"
            reasons[name] = {
                "code": code, "kvm_reason": kvm_name, "handled_as": label,
                "count": counts.get(r, 0), "vmm_ns": vmm_total[r],
                "guest_hist": _hist(guest, r), "vmm_hist": _hist(vmm, r)}
            if counts.get(r):
                kvm_reasons[kvm_name] = kvm_reasons.get(kvm_name, 0) + counts[r]
        ports = []
        for key, n in sorted(io.items()):
            port, direction = key & 0xFFFF, key >> _DIR_SHIFT
            ports.append({"port": port, "direction": "out" if direction == IO_OUT else "in", "count": n,
                          "device": _device(pio, port)})
        mmios = [{"addr": addr, "count": n, "device": _device(mmio, addr)} for addr, n in sorted(mm.items())]
        return {
            "vcpu": self.vcpu_id,
            "exits": sum(counts.values()),
            "elapsed_ns": elapsed,
            "guest_ns": max(elapsed - vmm_sum, 0),
            "vmm_ns": vmm_sum,
            "assists": self.assists,
            "reasons": reasons,
            "kvm_reasons": kvm_reasons,
            "guest_hist": _hist(guest, None),
            "vmm_hist": _hist(vmm, None),
            "io": ports,
            "mmio": mmios,
        }

    def __repr__(self) -> str:
        top = ", ".join(f"{reason_name(r)}={n}" for r, n in self.exits.most_common(4))
        return f"ExitAccounting(vcpu {self.vcpu_id}: {top or 'no exits'})"


class NullAccounting(ExitAccounting):
    """No accounting at all: the loop issues plain KVM_RUNs and counts nothing."""

    def __init__(self, vcpu_id: int = 0) -> None:
        super().__init__(vcpu_id)
        self.c = None
        self._guest_cells = None

    def count_io(self, port: int, direction: int) -> None:
        pass

    def count_mmio(self, addr: int) -> None:
        pass

    def book_as(self, label: str) -> None:
        pass

    @property
    def _io(self) -> dict[int, int]:
        return {}

    @property
    def _guest(self) -> list[int]:
        return [0] * (MAX_REASONS * NBUCKETS)

    _vmm = _guest

    @property
    def _vmm_total(self) -> list[int]:
        return [0] * MAX_REASONS

    _t_first = _t_enter = _t_leave = property(lambda self: 0)
    _last = property(lambda self: -1)


def _row_sums(table: list[int]) -> dict[int, int]:
    sums = {}
    for r in range(MAX_REASONS):
        s = sum(table[r << _SHIFT:(r + 1) << _SHIFT])
        if s:
            sums[r] = s
    return sums


def _hist(table: list[int], reason: int | None) -> list[int]:
    if reason is not None:
        return table[reason << _SHIFT:(reason + 1) << _SHIFT]
    return [sum(table[b::NBUCKETS]) for b in range(NBUCKETS)]


def _sum_hists(table: list[int], rows: list[int]) -> list[int]:
    out = [0] * NBUCKETS
    for r in rows:
        for b, n in enumerate(table[r << _SHIFT:(r + 1) << _SHIFT]):
            out[b] += n
    return out


def _device(bus: Any, addr: int) -> str | None:
    if bus is None:
        return None
    r = bus.find(addr)
    return r.name if r is not None else None
