"""Shared fixtures.

`kvm`: a `kvmpy.Kvm` for the session. When /dev/kvm is unusable, every test
that needs it, and the whole of tests/integration, is skipped with the
reason `kvmpy.kvm_available()` gives (missing module, permissions, ...).

`guest`: a factory for tiny guests (see tests/guests.py) that closes each
VM and its memory when the test ends, pass or fail.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kvmpy  # noqa: E402
from guests import Guest, tiny_guest  # noqa: E402

_INTEGRATION = Path(__file__).resolve().parent / "integration"
_KVM_REASON: str | None | bool = False  # False: not probed yet


def kvm_unavailable_reason() -> str | None:
    global _KVM_REASON
    if _KVM_REASON is False:
        _KVM_REASON = kvmpy.kvm_available(os.environ.get("KVMPY_DEVICE", "/dev/kvm"))
    return _KVM_REASON  # type: ignore[return-value]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    integration = [i for i in items if _INTEGRATION in Path(str(i.fspath)).resolve().parents]
    for item in integration:
        item.add_marker(pytest.mark.kvm)
    if integration:
        reason = kvm_unavailable_reason()
        if reason is not None:
            skip = pytest.mark.skip(reason=f"/dev/kvm unusable: {reason}")
            for item in integration:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def kvm() -> Iterator[kvmpy.Kvm]:
    reason = kvm_unavailable_reason()
    if reason is not None:
        pytest.skip(f"/dev/kvm unusable: {reason}")
    k = kvmpy.Kvm(os.environ.get("KVMPY_DEVICE", "/dev/kvm"))
    yield k
    k.close()


@pytest.fixture
def guest(kvm: kvmpy.Kvm) -> Iterator[Any]:
    """`guest(mode, source, **tiny_guest options)` -> a `Guest`, closed after the test."""
    made: list[Guest] = []

    def make(mode: str, source: str, **kwargs: Any) -> Guest:
        g = tiny_guest(kvm, mode, source, **kwargs)
        made.append(g)
        return g

    yield make
    for g in made:
        g.close()
