"""The statistics of a VM from Python: snapshots, and measuring a code region.

A *target* is anything with vCPU loops and a VM: the `Machine` (`.vm`,
`.loops`), a `VcpuLoop` or a list of them, a `Vm` (KVM counters only), or
any object with `.vm` and `.loop` (the tests' tiny guests).

    snap = vm_stats(machine)                 # dict: userspace accounting + KVM counters + profile
    with measure(machine) as m:
        ...                                  # let the guest do something
    m.result.exits["IO"], m.result.kvm["io_exits"], m.result.seconds

`MachineStats(machine)` keeps the KVM stats fds open between snapshots and
is what `ControlServer` serves (create it before the vCPUs run);
`stats_snapshot(machine)` is the one-shot builder for a machine that is
not running.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

from .kvmstats import StatsFd, Value, delta

SNAPSHOT_VERSION = 1


@dataclass
class _Parts:
    vm: Any
    loops: list[Any]
    vcpus: list[Any]


def _parts(target: Any) -> _Parts:
    """The VM, loops and vCPUs of a target, read now (a guest's loop may be replaced between runs)."""
    if isinstance(target, (list, tuple)):
        loops = list(target)
        vm = loops[0].vcpu.vm if loops else None
        return _Parts(vm, loops, [l.vcpu for l in loops])
    if hasattr(target, "loops"):  # Machine
        loops = list(target.loops)
        vcpus = list(getattr(target, "vcpus", None) or [l.vcpu for l in loops])
        return _Parts(target.vm, loops, vcpus)
    if hasattr(target, "accounting") and hasattr(target, "vcpu"):  # VcpuLoop
        return _Parts(target.vcpu.vm, [target], [target.vcpu])
    if hasattr(target, "loop") and hasattr(target, "vm"):  # a guest holding one loop
        loops = [target.loop] if target.loop is not None else []
        vcpus = [l.vcpu for l in loops] or list(getattr(target.vm, "vcpus", []))
        return _Parts(target.vm, loops, vcpus)
    if hasattr(target, "get_stats_fd") and hasattr(target, "vcpus"):  # Vm
        return _Parts(target, [], list(target.vcpus))
    raise TypeError(f"cannot take statistics of {type(target).__name__}: expected a Machine, "
                    "VcpuLoop(s), Vm or an object with .vm and .loop")


class KvmStats:
    """KVM's stats fds of a VM and its vCPUs, opened once, read on demand."""

    def __init__(self, vm: Any, vcpus: Iterable[Any]) -> None:
        self.vm: StatsFd | None = StatsFd.of(vm) if vm is not None else None
        self.vcpus: dict[int, StatsFd] = {}
        try:
            for v in vcpus:
                self.vcpus[v.id] = StatsFd.of(v)
        except BaseException:
            self.close()
            raise

    def read(self) -> dict[str, Any]:
        """{"vm": {name: value}, "vcpus": {id: {name: value}}}."""
        return {"vm": self.vm.read() if self.vm is not None else {},
                "vcpus": {i: s.read() for i, s in self.vcpus.items()}}

    def descriptors(self) -> dict[str, list[dict[str, Any]]]:
        """JSON-ready descriptors: {"vm": [...], "vcpu": [...]} (every vCPU has the same)."""
        first = next(iter(self.vcpus.values()), None)
        return {"vm": self.vm.describe() if self.vm is not None else [],
                "vcpu": first.describe() if first is not None else []}

    def close(self) -> None:
        if self.vm is not None:
            self.vm.close()
        for s in self.vcpus.values():
            s.close()
        self.vcpus.clear()

    def __enter__(self) -> KvmStats:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _jsonable(values: dict[str, Value]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def _snapshot(parts: _Parts, kvm: KvmStats | None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    kvm_values = kvm.read() if kvm is not None else {"vm": {}, "vcpus": {}}
    vcpus = []
    for loop in parts.loops:
        acct = loop.accounting
        snap = acct.snapshot(getattr(loop, "pio", None), getattr(loop, "mmio", None))
        snap["kvm"] = _jsonable(kvm_values["vcpus"].get(loop.vcpu.id, {}))
        profile = getattr(acct, "profile", None)
        snap["profile"] = profile.snapshot() if profile is not None else None
        vcpus.append(snap)
    looped = {l.vcpu.id for l in parts.loops}
    for vid, values in kvm_values["vcpus"].items():
        if vid not in looped:  # a vCPU without a loop: KVM counters only
            vcpus.append({"vcpu": vid, "kvm": _jsonable(values)})
    snap = {
        "version": SNAPSHOT_VERSION,
        "pid": os.getpid(),
        "time": time.time(),
        "monotonic_ns": time.monotonic_ns(),
        "vm": {"kvm": _jsonable(kvm_values["vm"])},
        "vcpus": vcpus,
        "kvm_descriptors": kvm.descriptors() if kvm is not None else {"vm": [], "vcpu": []},
    }
    if extra:
        snap.update(extra)
    return snap


def vm_stats(target: Any) -> dict[str, Any]:
    """One snapshot of `target`: per-vCPU exit accounting, KVM's VM and vCPU counters, profiles.

    Opens and closes the KVM stats fds; for repeated snapshots keep a
    `MachineStats`.
    """
    parts = _parts(target)
    with KvmStats(parts.vm, parts.vcpus) as kvm:
        return _snapshot(parts, kvm)


def _machine_extra(machine: Any) -> dict[str, Any]:
    cfg = getattr(machine, "config", None)
    if cfg is None:
        return {}
    config = {}
    for k in ("kernel", "initrd", "cmdline", "memory", "cpus", "quirks", "entry"):
        if hasattr(cfg, k):
            v = getattr(cfg, k)
            config[k] = v if isinstance(v, (int, float, str, type(None))) else str(v)
    return {"config": config}


def stats_snapshot(machine: Any) -> dict[str, Any]:
    """The snapshot the control socket serves for a `Machine` (one-shot: opens the stats fds)."""
    parts = _parts(machine)
    with KvmStats(parts.vm, parts.vcpus) as kvm:
        return _snapshot(parts, kvm, _machine_extra(machine))


class MachineStats:
    """A `ControlServer` source for a machine: `stats_snapshot()`, KVM stats fds kept open.

    Create it before the vCPUs run: KVM_GET_STATS_FD on a vCPU takes the
    vCPU's mutex, which KVM_RUN holds, so opening it later can wait as long
    as the guest runs without an exit (seconds, on a software backend).
    Reading an open stats fd takes no lock. `close()` before the VM closes.
    """

    def __init__(self, machine: Any) -> None:
        self.machine = machine
        parts = _parts(machine)
        self.kvm = KvmStats(parts.vm, parts.vcpus)

    def stats_snapshot(self) -> dict[str, Any]:
        return _snapshot(_parts(self.machine), self.kvm, _machine_extra(self.machine))

    def close(self) -> None:
        self.kvm.close()


# -- measuring a code region ------------------------------------------------------


@dataclass
class MeasureResult:
    """What happened between entering and leaving a `measure()` block."""

    seconds: float
    exits: Counter[str] = field(default_factory=Counter)  # by reason name or handled-as label, all vCPUs
    kvm_exits: Counter[str] = field(default_factory=Counter)  # by raw KVM_EXIT_* name ("INTERNAL_ERROR")
    io: Counter[tuple[int, str]] = field(default_factory=Counter)  # (port, "in"/"out")
    mmio: Counter[int] = field(default_factory=Counter)  # by guest-physical address
    vmm_ns: int = 0
    guest_ns: int = 0
    kvm: dict[str, Value] = field(default_factory=dict)  # vCPU counters summed over vCPUs
    kvm_vm: dict[str, Value] = field(default_factory=dict)
    kvm_vcpus: dict[int, dict[str, Value]] = field(default_factory=dict)

    @property
    def total_exits(self) -> int:
        return sum(self.exits.values())

    def rate(self, reason: str | None = None) -> float:
        """Exits per second (of `reason`, or all)."""
        n = self.total_exits if reason is None else self.exits[reason]
        return n / self.seconds if self.seconds > 0 else 0.0


class measure:
    """Context manager: `with measure(target) as m: ...`, then `m.result` (a `MeasureResult`).

    Exit counts come from the vCPU loops' accounting, KVM counter deltas
    from the stats fds (cumulative counters and histograms as differences,
    instant and peak values as read at the end), time from the wall clock.
    """

    def __init__(self, target: Any, *, kvm: bool = True, kvm_stats: KvmStats | None = None) -> None:
        self.target = target
        self.with_kvm = kvm
        self.result: MeasureResult | None = None
        # Open stats fds to reuse (a running machine's MachineStats: opening a
        # vCPU's stats fd while it runs waits for an exit; see MachineStats).
        if kvm_stats is None and isinstance(getattr(target, "stats", None), MachineStats):
            kvm_stats = target.stats.kvm
        self._shared = kvm_stats
        self._kvm: KvmStats | None = None

    def _read(self) -> tuple[dict[int, Any], dict[str, Any]]:
        parts = _parts(self.target)
        accts = {l.vcpu.id: l.accounting.snapshot() for l in parts.loops}
        kvm = self._kvm.read() if self._kvm is not None else {"vm": {}, "vcpus": {}}
        return accts, kvm

    def __enter__(self) -> measure:
        parts = _parts(self.target)
        if self.with_kvm:
            self._kvm = self._shared if self._shared is not None else KvmStats(parts.vm, parts.vcpus)
        self._t0 = time.perf_counter()
        self._before = self._read()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            after = self._read()
            seconds = time.perf_counter() - self._t0
            self.result = self._diff(self._before, after, seconds)
        finally:
            if self._kvm is not None and self._kvm is not self._shared:
                self._kvm.close()
            self._kvm = None

    def _diff(self, before: tuple, after: tuple, seconds: float) -> MeasureResult:
        kvm = self._kvm
        acct0, kvm0 = before
        acct1, kvm1 = after
        r = MeasureResult(seconds)
        for vid, a1 in acct1.items():
            a0 = acct0.get(vid) or {"reasons": {}, "io": [], "mmio": [], "vmm_ns": 0, "guest_ns": 0}
            for name, rec in a1["reasons"].items():
                n = rec["count"] - a0["reasons"].get(name, {}).get("count", 0)
                if n:
                    r.exits[name] += n
                    r.kvm_exits[rec.get("kvm_reason", name)] += n
            io0 = {(p["port"], p["direction"]): p["count"] for p in a0["io"]}
            for p in a1["io"]:
                n = p["count"] - io0.get((p["port"], p["direction"]), 0)
                if n:
                    r.io[p["port"], p["direction"]] += n
            mm0 = {m["addr"]: m["count"] for m in a0["mmio"]}
            for m in a1["mmio"]:
                n = m["count"] - mm0.get(m["addr"], 0)
                if n:
                    r.mmio[m["addr"]] += n
            r.vmm_ns += a1["vmm_ns"] - a0["vmm_ns"]
            r.guest_ns += a1["guest_ns"] - a0["guest_ns"]
        if kvm is not None:
            vm_desc = kvm.vm.by_name if kvm.vm is not None else {}
            r.kvm_vm = delta(kvm0["vm"], kvm1["vm"], vm_desc)
            for vid, v1 in kvm1["vcpus"].items():
                d = delta(kvm0["vcpus"].get(vid, {}), v1, kvm.vcpus[vid].by_name)
                r.kvm_vcpus[vid] = d
                for name, value in d.items():
                    prev = r.kvm.get(name)
                    if prev is None:
                        r.kvm[name] = value
                    elif isinstance(value, tuple):
                        r.kvm[name] = tuple(x + y for x, y in zip(prev, value))  # type: ignore[arg-type]
                    else:
                        r.kvm[name] = prev + value  # type: ignore[operator]
        return r
