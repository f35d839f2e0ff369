"""A sampling profiler of guest code: where the guest spends its time, not only where it exits.

A timer thread kicks every vCPU `hz` times a second (`Vcpu.kick`: KVM_RUN
returns EINTR); the loop's INTR handler reads the guest RIP and CPL and
lets the vCPU go on. On the PVM backend, where guest kernel code is
emulated and rarely exits, this is what shows which kernel functions a
slow boot spends its seconds in; on hardware hosts it works the same.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any, Iterable

from .._kvm import lib
from .profile import SymbolTable

_INTR = lib.KVM_EXIT_INTR
_SYNC_REGS = lib.KVM_SYNC_X86_REGS


class GuestSampler:
    """Samples guest RIPs of `loops` (VcpuLoops) at `hz` while running."""

    def __init__(self, loops: Iterable[Any], *, hz: float = 100.0, symbols: SymbolTable | None = None) -> None:
        if not 0 < hz <= 10_000:
            raise ValueError(f"sampling rate {hz} Hz: must be in (0, 10000]")
        self.loops = list(loops)
        self.interval = 1.0 / hz
        self.symbols = symbols
        self.rips: Counter[int] = Counter()
        self.user_samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        for loop in self.loops:
            loop.handlers[_INTR] = self._handler(loop.vcpu)

    def _handler(self, vcpu: Any):
        def on_kick(exit: Any) -> bool:
            run = vcpu.run_struct
            if run.kvm_valid_regs & _SYNC_REGS:
                rip = run.s.regs.regs.rip  # synced at this exit: no ioctl
            else:
                rip = vcpu.get_regs().rip
            self.rips[rip] += 1
            if rip < 1 << 63:
                self.user_samples += 1
            return True  # keep running: a sample is not a stop
        return on_kick

    def start(self) -> GuestSampler:
        self._thread = threading.Thread(target=self._tick, name="guest-sampler", daemon=True)
        self._thread.start()
        return self

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            for loop in self.loops:
                if not loop.stopping:
                    loop.vcpu.kick()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def samples(self) -> int:
        return sum(self.rips.values())

    def functions(self, n: int = 20) -> list[tuple[str, int]]:
        """The `n` guest functions with the most samples: [(name, samples)]."""
        by_function: Counter[str] = Counter()
        for rip, count in self.rips.items():
            name = self.symbols.function(rip) if self.symbols is not None else None
            by_function[name or ("[user]" if rip < 1 << 63 else f"{rip:#x}")] += count
        return by_function.most_common(n)

    def __enter__(self) -> GuestSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
