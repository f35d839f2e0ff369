"""KVM state structures as text and back: the raw bytes in base64, the size checked on the way in.

A component's `snapshot_state()` stores `struct kvm_regs`, `kvm_lapic_state`
and the like this way; a blob whose size differs from this build's struct
(another <linux/kvm.h>) is refused rather than misread.
"""

from __future__ import annotations

import base64
from typing import Any

from ._kvm import ffi
from .errors import SnapshotVersionError

# The KVM structures kept as raw bytes; their sizes guard the layout.
STRUCTS = {
    "regs": "struct kvm_regs", "sregs": "struct kvm_sregs", "fpu": "struct kvm_fpu",
    "lapic": "struct kvm_lapic_state", "vcpu_events": "struct kvm_vcpu_events",
    "debugregs": "struct kvm_debugregs", "xsave": "struct kvm_xsave", "irqchip": "struct kvm_irqchip",
    "pit2": "struct kvm_pit_state2", "clock": "struct kvm_clock_data",
}


def struct_sizes() -> dict[str, int]:
    return {name: ffi.sizeof(ctype) for name, ctype in STRUCTS.items()}


def to_blob(obj: Any) -> str:
    """A cffi struct (pointer) as base64 text."""
    return base64.b64encode(bytes(ffi.buffer(obj))).decode()


def from_blob(name: str, text: str) -> Any:
    """A new `STRUCTS[name]` holding the bytes of `text`; SnapshotVersionError if the size differs."""
    obj = ffi.new(STRUCTS[name] + " *")
    data = base64.b64decode(text)
    if len(data) != ffi.sizeof(obj[0]):
        raise SnapshotVersionError(f"{name}: {len(data)} bytes stored, this build's {STRUCTS[name]} "
                                   f"has {ffi.sizeof(obj[0])}")
    ffi.buffer(obj)[:] = data
    return obj


__all__ = ["STRUCTS", "from_blob", "struct_sizes", "to_blob"]
