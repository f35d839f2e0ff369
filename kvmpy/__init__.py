"""kvmpy: a thin hypervisor in Python on Linux KVM.

The layers, bottom up: the cffi bindings (`kvmpy._kvm`), the file-descriptor
types `Kvm`, `Vm`, `Vcpu` and `GuestMemory`, the exit loop and device bus,
then x86 setup, boot loaders, devices and the assembled machine.
"""

from .bus import Bus, Device, mmio_bus, pio_bus
from .errors import (BootError, BusError, CapabilityError, GuestError, GuestMemoryError, KvmError,
                     KvmIoctlError, KvmUnavailableError)
from .exits import (DebugExit, Exit, ExitReason, FailEntryExit, HltExit, InternalErrorExit, IntrExit,
                    IoExit, IrqWindowOpenExit, MmioExit, MsrExit, ShutdownExit, SystemEventExit)
from .kvm import Capability, CpuidEntry, Kvm, kvm_available
from .memory import GuestMemory, MemoryRegion
from .runloop import VcpuLoop
from .vcpu import Vcpu
from .vm import Vm

__version__ = "0.1.0"

# The assembly layer (kvmpy/machine/) and the scripting layer (kvmpy/microvm.py) sit
# above everything imported here; they load on first use.
_LAZY = {"MicroVM": "microvm", "MicroVMConfig": "microvm", "Machine": "machine", "MachineConfig": "machine",
         "build": "machine"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'kvmpy' has no attribute {name!r}")

__all__ = [
    "BootError", "Bus", "BusError", "Capability", "CapabilityError", "CpuidEntry", "DebugExit",
    "Device", "Exit", "ExitReason", "FailEntryExit", "GuestError", "GuestMemory", "GuestMemoryError",
    "HltExit", "InternalErrorExit", "Machine", "MachineConfig", "MicroVM", "MicroVMConfig", "IntrExit", "IoExit", "IrqWindowOpenExit", "Kvm", "KvmError",
    "KvmIoctlError", "KvmUnavailableError", "MemoryRegion", "MmioExit", "MsrExit", "ShutdownExit",
    "SystemEventExit", "Vcpu", "VcpuLoop", "Vm", "build", "kvm_available", "mmio_bus", "pio_bus",
]
