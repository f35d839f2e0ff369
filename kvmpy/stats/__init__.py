"""VM-exit statistics: userspace exit accounting, KVM's stats fds, exit-site profile.

    accounting   ExitAccounting, fed by VcpuLoop on every exit
    kvmstats     StatsFd: the KVM_GET_STATS_FD reader; debugfs host-wide counters
    profile      ExitProfile: guest RIP of exits, symbolized (System.map / ELF)
    api          vm_stats(), measure(), MachineStats / stats_snapshot() for a Machine
    control      ControlServer: the per-process control socket; list_sockets(), query()
    stat_cli     `kvmpy stat`

The names below load their module on first use, so `kvmpy.runloop` can
import `accounting` without pulling in the rest.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ExitAccounting": "accounting",
    "StatsFd": "kvmstats", "Descriptor": "kvmstats", "StatType": "kvmstats", "StatUnit": "kvmstats",
    "StatBase": "kvmstats",
    "ExitProfile": "profile", "SymbolTable": "profile",
    "vm_stats": "api", "measure": "api", "MeasureResult": "api", "MachineStats": "api",
    "stats_snapshot": "api", "KvmStats": "api",
    "ControlServer": "control", "list_sockets": "control", "query": "control",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvmpy.stats' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
