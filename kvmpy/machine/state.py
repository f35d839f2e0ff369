"""State records of a machine: what each component's `snapshot_state()` returned, gathered in one place.

Every component saves and restores its own state (`snapshot_state()` ->
JSON-able dict, `restore_state(dict)`): each `Vcpu` (kvmpy/vcpu.py), the `Vm`
(irqchip, PIT, clock: kvmpy/vm.py), every device on the buses, the MSR
filter and the syscall trap (kvmpy/x86/), the console log. `Machine`
(kvmpy/machine/machine.py) collects them into a `MachineState`;
kvmpy/snapshot.py only decides how it lies on disk.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import SnapshotCorruptError

STATE_VERSION = 1


@dataclass
class MachineState:
    vcpus: list[dict[str, Any]]
    vm: dict[str, Any]
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)
    msr_filter: dict[str, Any] = field(default_factory=dict)
    syscall_trap: dict[str, Any] | None = None
    console: dict[str, Any] = field(default_factory=lambda: {"end": 0, "base": 0, "scan_from": 0})

    def to_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MachineState:
        if not isinstance(d, dict) or d.get("version") != STATE_VERSION:
            raise SnapshotCorruptError(f"machine state version {d.get('version') if isinstance(d, dict) else d!r}; "
                                       f"this kvmpy reads version {STATE_VERSION}")
        try:
            return cls(vcpus=list(d["vcpus"]), vm=dict(d["vm"]), devices=dict(d["devices"]),
                       msr_filter=dict(d["msr_filter"]), syscall_trap=d["syscall_trap"], console=dict(d["console"]))
        except (KeyError, TypeError, ValueError) as e:
            raise SnapshotCorruptError(f"machine state: incomplete ({e})") from None


__all__ = ["MachineState", "STATE_VERSION"]
