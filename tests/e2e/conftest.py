"""Fixtures for Linux boots: kvmpy's own guest kernel and initramfs, built (or taken from the cache) once."""

from __future__ import annotations

from pathlib import Path

import pytest

import kvmpy


@pytest.fixture(scope="session")
def guest_artifacts() -> tuple[Path, Path]:
    reason = kvmpy.kvm_available()
    if reason is not None:
        pytest.skip(f"needs a usable /dev/kvm: {reason}")
    from kvmpy.boot.initramfs import build_busybox_initramfs
    from kvmpy.guest.build import build_kernel

    # `make test` builds the kernel before pytest starts; here it is a cache hit.
    kernel = build_kernel(progress=False)
    return kernel.vmlinux, build_busybox_initramfs()
