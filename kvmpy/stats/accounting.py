"""Always-on, cheap exit accounting for one vCPU.

Per exit the loop calls `enter()` just before KVM_RUN and `leave(reason)`
just after it; I/O and MMIO exits also report their port or address. From
that come: exits by reason, port I/O by (port, direction), MMIO by address,
time in the guest (inside KVM_RUN) and time in the VMM (handling the exit
before the next KVM_RUN), each as a log2 histogram of nanoseconds, and VMM
time per exit reason.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from time import perf_counter_ns

NBUCKETS = 64  # bucket b holds durations with bit_length b: [2^(b-1), 2^b) ns


@dataclass
class ExitAccounting:
    vcpu_id: int = 0
    exits: Counter[int] = field(default_factory=Counter)
    io: Counter[tuple[int, int]] = field(default_factory=Counter)
    mmio: Counter[int] = field(default_factory=Counter)
    guest_ns: list[int] = field(default_factory=lambda: [0] * NBUCKETS)
    vmm_ns: list[int] = field(default_factory=lambda: [0] * NBUCKETS)
    vmm_ns_by_reason: Counter[int] = field(default_factory=Counter)
    guest_ns_total: int = 0
    vmm_ns_total: int = 0
    assists: int = 0
    started_ns: int = field(default_factory=perf_counter_ns)
    _t_enter: int = 0
    _t_leave: int = 0
    _last: int = -1

    def enter(self) -> None:
        t = perf_counter_ns()
        if self._last >= 0:
            d = t - self._t_leave
            self.vmm_ns[d.bit_length()] += 1
            self.vmm_ns_total += d
            self.vmm_ns_by_reason[self._last] += d
        self._t_enter = t

    def leave(self, reason: int) -> None:
        t = perf_counter_ns()
        d = t - self._t_enter
        self.guest_ns[d.bit_length()] += 1
        self.guest_ns_total += d
        self.exits[reason] += 1
        self._last = reason
        self._t_leave = t

    def count_io(self, port: int, direction: int) -> None:
        self.io[port, direction] += 1

    def count_mmio(self, addr: int) -> None:
        self.mmio[addr] += 1
