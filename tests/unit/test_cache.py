"""The on-disk cache (kvmpy.cache): entries built by many threads at once."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from kvmpy.cache import store
from kvmpy.sandbox import compile_c
from kvmpy.x86.asm import assemble


def _all_at_once(n: int, fn) -> list:
    """Call fn(i) from n threads released together; their results (or exceptions)."""
    barrier, results = threading.Barrier(n), [None] * n

    def worker(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn(i)
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            results[i] = e

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_store_from_many_threads_leaves_one_complete_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "entry.bin"
    blobs = [bytes([i]) * 100_000 for i in range(32)]
    assert _all_at_once(32, lambda i: store(path, blobs[i])) == [None] * 32
    assert path.read_bytes() in blobs
    assert [p.name for p in path.parent.iterdir()] == ["entry.bin"]  # no temporary file left


def test_a_new_guest_function_compiled_by_many_threads_at_once(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # A pool's workers all call a GuestFunction the cache has never seen.
    monkeypatch.setenv("KVMPY_CACHE", str(tmp_path))
    images = _all_at_once(16, lambda i: compile_c("long guest_main(long x) { return x + 41; }"))
    assert not [r for r in images if isinstance(r, BaseException)], images
    assert len({r.segments for r in images}) == 1
    assert len(list((tmp_path / "sandbox").iterdir())) == 1


def test_new_assembly_by_many_threads_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVMPY_CACHE", str(tmp_path))
    codes = _all_at_once(8, lambda i: assemble(f"mov ${i}, %eax\nhlt"))
    assert codes == [assemble(f"mov ${i}, %eax\nhlt") for i in range(8)]
    assert len(list((tmp_path / "asm").iterdir())) == 8
