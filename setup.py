"""cffi's out-of-line API mode is wired through setuptools' `cffi_modules`;
everything else about the package is in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=[
    "kvmpy/_build_kvm.py:ffibuilder",
    "kvmpy/boot/_build_bootparam.py:ffibuilder",
])
