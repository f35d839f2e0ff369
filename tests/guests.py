"""Tiny guests for the integration tests: the helpers live in kvmpy/tiny.py (the labs use them too)."""

from kvmpy.tiny import (ENTRY, HIGH_RAM_START, LOW_RAM_END, MMIO_HOLE, RAM_SIZE, REAL_MODE_ENTRY, Guest,
                        RecordingPort, add_vcpu, entry_for, tiny_guest, write_ivt)

__all__ = ["ENTRY", "HIGH_RAM_START", "LOW_RAM_END", "MMIO_HOLE", "RAM_SIZE", "REAL_MODE_ENTRY", "Guest",
           "RecordingPort", "add_vcpu", "entry_for", "tiny_guest", "write_ivt"]
