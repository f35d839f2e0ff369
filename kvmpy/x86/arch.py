"""The x86 vocabulary where the x86 code looks for it: kvmpy/arch.py, re-exported.

The definitions live in kvmpy/arch.py, a leaf below every layer, because the
fd layer uses them too (memory.py's page walk, Vcpu.cpu_mode); x86-level
code imports them from here or from there, the same objects.
"""

from ..arch import ERROR_CODE_VECTORS, CpuMode, Cr0, Cr4, Efer, Rflags, Vector, cpl, cpu_mode

__all__ = ["ERROR_CODE_VECTORS", "Cr0", "Cr4", "CpuMode", "Efer", "Rflags", "Vector", "cpl", "cpu_mode"]
