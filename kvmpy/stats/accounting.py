"""Always-on, cheap exit accounting for one vCPU.

Per exit the loop calls `enter()` just before KVM_RUN and `leave(reason)`
just after it; I/O and MMIO exits also report their port or address. From
that come: exits by reason, port I/O by (port, direction), MMIO by address,
time in the guest (inside KVM_RUN) and time in the VMM (handling the exit
before the next KVM_RUN), each as a log2 histogram of nanoseconds per exit
reason, and VMM time per exit reason.

Cheapness is the design constraint (issue 6, item 7: at most 5% on the
exit loop; scripts/bench_stats_overhead.py measures it). A Python
attribute update costs ~100 ns here against a ~20 us exit, so the hot
methods do the least that keeps every figure exact:

- `enter` only reads the clock.
- `leave` does one list update for this exit, bucket (reason, log2 of
  guest time) of the guest table, whose row sums are the exit counts, and
  two for the VMM interval that ended at this entry: the (previous
  reason, log2 VMM time) bucket and that reason's VMM nanoseconds.
- The total guest time is not summed per exit: from the first KVM_RUN to
  the latest exit, every nanosecond is either in the guest (enter..leave)
  or in a VMM interval already booked (leave..enter), so guest time =
  elapsed - VMM time, exactly.

Everything else (names, dicts, per-device grouping) is computed when
someone reads, from another thread if need be: the readers copy lists in
one step under the GIL, so a snapshot is consistent to within an exit.
The time between one `VcpuLoop.run()` returning and the next starting
counts as VMM time of the exit that ended the first.
"""

from __future__ import annotations

from collections import Counter
from time import perf_counter_ns
from typing import Any

from ..exits import ExitReason

NBUCKETS = 64  # bucket b holds durations with bit_length b: [2^(b-1), 2^b) ns; bucket 0 is 0 ns
MAX_REASONS = 256  # KVM_EXIT_* values are below this (the highest in 6.x headers is ~41)
_SHIFT = 6  # NBUCKETS == 1 << _SHIFT: table index = reason << _SHIFT | bucket
_DIR_SHIFT = 16  # io key = port | direction << 16 (no tuple per exit)

IO_IN, IO_OUT = 0, 1  # KVM_EXIT_IO_IN / _OUT


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
    """Exit counters and time histograms of one vCPU, fed by `VcpuLoop`."""

    __slots__ = ("vcpu_id", "assists", "started_ns", "_guest", "_vmm", "_vmm_total", "_io", "_mmio",
                 "_t_first", "_t_enter", "_t_leave", "_last", "__dict__")

    def __init__(self, vcpu_id: int = 0) -> None:
        self.vcpu_id = vcpu_id
        self.assists = 0  # instructions completed by kvmpy.assists (the loop counts them)
        self.started_ns = perf_counter_ns()
        self._guest = [0] * (MAX_REASONS << _SHIFT)  # (reason, bucket of guest ns before it)
        self._vmm = [0] * (MAX_REASONS << _SHIFT)  # (reason, bucket of VMM ns handling it)
        self._vmm_total = [0] * MAX_REASONS
        self._io: dict[int, int] = {}
        self._mmio: dict[int, int] = {}
        self._t_first = 0
        self._t_enter = 0
        self._t_leave = 0
        self._last = -1

    # -- the hot path (called by the loop on every exit) ------------------------

    def enter(self) -> None:
        self._t_enter = perf_counter_ns()

    def leave(self, reason: int) -> None:
        t = perf_counter_ns()
        t_enter = self._t_enter
        self._guest[reason << _SHIFT | (t - t_enter).bit_length()] += 1
        last = self._last
        if last >= 0:
            # The VMM interval that ended at this entry belongs to the previous exit.
            d = t_enter - self._t_leave
            self._vmm[last << _SHIFT | d.bit_length()] += 1
            self._vmm_total[last] += d
        else:
            self._t_first = t_enter
        self._last = reason
        self._t_leave = t

    def count_io(self, port: int, direction: int) -> None:
        key = port | direction << _DIR_SHIFT
        try:
            self._io[key] += 1
        except KeyError:
            self._io[key] = 1

    def count_mmio(self, addr: int) -> None:
        try:
            self._mmio[addr] += 1
        except KeyError:
            self._mmio[addr] = 1

    # -- reading ------------------------------------------------------------------

    @property
    def exits(self) -> Counter[int]:
        """{KVM_EXIT_* value: count} of the exits so far (reasons never seen are absent)."""
        return Counter(_row_sums(self._guest[:]))

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
        return Counter({r: ns for r, ns in enumerate(self._vmm_total[:]) if ns})

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

    def guest_hist(self, reason: int | None = None) -> list[int]:
        """Log2 histogram (NBUCKETS counts) of guest time before exits (of `reason`, or all)."""
        return _hist(self._guest[:], reason)

    def vmm_hist(self, reason: int | None = None) -> list[int]:
        """Log2 histogram of VMM handling time per exit (of `reason`, or all)."""
        return _hist(self._vmm[:], reason)

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
        reasons = {}
        for r in sorted(set(counts) | set(vmm_rows)):
            reasons[reason_name(r)] = {
                "code": r, "count": counts.get(r, 0), "vmm_ns": vmm_total[r],
                "guest_hist": _hist(guest, r), "vmm_hist": _hist(vmm, r)}
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
            "guest_hist": _hist(guest, None),
            "vmm_hist": _hist(vmm, None),
            "io": ports,
            "mmio": mmios,
        }

    def __repr__(self) -> str:
        top = ", ".join(f"{reason_name(r)}={n}" for r, n in self.exits.most_common(4))
        return f"ExitAccounting(vcpu {self.vcpu_id}: {top or 'no exits'})"


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


def _device(bus: Any, addr: int) -> str | None:
    if bus is None:
        return None
    r = bus.find(addr)
    return r.name if r is not None else None
