"""Image locks across real processes, and against QEMU's own tools (which use the same lock bytes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from kvmpy.devices.virtio.blk import BlockDevice
from kvmpy.storage import ImageLockedError, create_qcow2, open_image
from kvmpy.storage.lock import lock_holders

from storage_helpers import needs_qemu_img

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def holder(path, readonly: bool) -> subprocess.Popen:
    """A second process that opens `path` and keeps it open until killed."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {ROOT!r})
        from kvmpy.storage import open_image
        img = open_image({str(path)!r}, readonly={readonly})
        print("ready", flush=True)
        time.sleep(120)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line.strip() == "ready", p.stderr.read()
    return p


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(bytes(1 << 20))
    return p


@pytest.fixture
def procs():
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_second_writer_is_refused_naming_image_and_holder_pid(image, procs):
    procs.append(p := holder(image, readonly=False))
    with pytest.raises(ImageLockedError) as e:
        BlockDevice(image)  # what a second VM does before it boots
    assert str(image) in str(e.value) and f"pid {p.pid}" in str(e.value)
    with pytest.raises(ImageLockedError, match=f"pid {p.pid}"):
        open_image(image, readonly=True)  # a writer refuses readers too (QEMU's rule)


def test_any_number_of_readers_share_and_keep_writers_out(image, procs):
    procs.extend([holder(image, readonly=True), holder(image, readonly=True)])
    with open_image(image, readonly=True) as mine:
        assert mine.read(0, 4) == bytes(4)
    with pytest.raises(ImageLockedError, match="refuses to share it for writing") as e:
        open_image(image)
    assert all(f"pid {p.pid}" in str(e.value) for p in procs)
    assert set(lock_holders(image, 100)) == {p.pid for p in procs}


def test_the_lock_goes_when_the_holder_is_sigkilled(image, procs):
    procs.append(p := holder(image, readonly=False))
    with pytest.raises(ImageLockedError):
        open_image(image)
    p.send_signal(signal.SIGKILL)
    p.wait()
    with open_image(image) as img:
        img.write(0, b"mine")


def test_two_opens_in_one_process_conflict_and_close_releases(image):
    first = open_image(image)
    with pytest.raises(ImageLockedError, match="this process"):
        open_image(image)
    first.close()
    open_image(image).close()


@needs_qemu_img
def test_qemu_and_kvmpy_refuse_each_other(tmp_path):
    p = create_qcow2(tmp_path / "shared.qcow2", 1 << 20)
    with open_image(p):
        r = subprocess.run(["qemu-io", "-c", "read 0 512", str(p)], capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and 'Failed to get "write" lock' in r.stderr
    qemu = subprocess.Popen(["qemu-io", str(p)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        qemu.stdin.write(b"read 0 512\n")
        qemu.stdin.flush()
        qemu.stdout.readline()  # it answered: the image is open and locked
        with pytest.raises(ImageLockedError, match=f"pid {qemu.pid}"):
            open_image(p)
    finally:
        qemu.kill()
        qemu.wait()
