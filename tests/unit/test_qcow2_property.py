"""Property: any sequence of writes through kvmpy's qcow2 reads back like the same writes into a raw file
and like the same writes done by qemu-io, and leaves an image `qemu-img check` finds clean."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy.storage import create_qcow2, open_image

from storage_helpers import assert_clean, assert_same_content, needs_qemu_img, qemu_img, qemu_io_writes

pytestmark = needs_qemu_img
SIZE = 1 << 20

write = st.tuples(st.integers(0, SIZE - 1), st.integers(1, 20000), st.integers(0, 255)).map(
    lambda w: (w[0], min(w[1], SIZE - w[0]), w[2]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(writes=st.lists(write, min_size=1, max_size=30), cluster_bits=st.sampled_from([9, 12, 16]),
       backed=st.booleans(), flush_every=st.integers(1, 10))
def test_random_writes_match_a_raw_file(writes, cluster_bits, backed, flush_every):
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        base_content = os.urandom(SIZE) if backed else bytes(SIZE)
        model = bytearray(base_content)
        if backed:
            (d / "base.raw").write_bytes(base_content)
            create_qcow2(d / "t.qcow2", SIZE, backing=str(d / "base.raw"), backing_format="raw",
                         cluster_bits=cluster_bits)
        else:
            qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={1 << cluster_bits}", d / "t.qcow2",
                     str(SIZE))
        shutil.copy(d / "t.qcow2", d / "qemu.qcow2")  # the backing file name is absolute: the copy shares it
        with open_image(d / "t.qcow2") as img:
            for i, (off, length, byte) in enumerate(writes):
                img.write(off, bytes([byte]) * length)
                model[off:off + length] = bytes([byte]) * length
                if i % flush_every == 0:
                    img.flush()
            assert img.read(0, SIZE) == model
        (d / "model.raw").write_bytes(model)
        assert_clean(d / "t.qcow2")
        assert_same_content(d / "t.qcow2", d / "model.raw")
        qemu_io_writes(d / "qemu.qcow2", writes)
        assert_same_content(d / "t.qcow2", d / "qemu.qcow2")
        with open_image(d / "t.qcow2", readonly=True) as again:  # reopened: the metadata on disk says the same
            assert again.read(0, SIZE) == model
