"""Copy-on-write overlays: a qcow2 image whose backing file is a read-only base.

Writes land in the overlay; the base is opened read-only with a shared
lock, so any number of overlays (VMs, clones, forks) can use one base
while nobody can open the base for writing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .image import DiskImage, StorageError
from .qcow2 import Qcow2Image, create_qcow2


class OverlayImage(Qcow2Image):
    """A `Qcow2Image` made by `create_overlay`; a throwaway one deletes its file (and temp dir) on close."""

    def __init__(self, path: str | os.PathLike[str], *, base: Path, keep: bool = False,
                 tempdir: Path | None = None) -> None:
        self.base, self.keep, self._tempdir = base, keep, tempdir
        super().__init__(path)

    def _close(self) -> None:
        super()._close()
        if not self.keep:
            self.path.unlink(missing_ok=True)
            if self._tempdir is not None:
                shutil.rmtree(self._tempdir, ignore_errors=True)


def create_overlay(base: str | os.PathLike[str] | DiskImage, path: str | os.PathLike[str] | None = None, *,
                   keep: bool = False, base_format: str | None = None, cluster_bits: int = 16,
                   copy_base: bool = False) -> OverlayImage:
    """A new qcow2 overlay on `base`, opened read-write; `base` is opened read-only (shared lock).

    `path=None` puts it in a fresh temp directory. Unless `keep`, the file
    is removed when the overlay is closed (a process killed before that
    leaves it behind in the temp dir). The backing file is recorded as an
    absolute path with its format, so the overlay works from any directory.
    `copy_base` (with `path=None`): the overlay goes on a copy of `base` made
    in that temp dir and removed with it, for a base that will change (a
    forked VM's own overlay, which it writes on).
    """
    from . import detect_format, open_image

    if copy_base:
        if path is not None or isinstance(base, DiskImage):
            raise StorageError("create_overlay(copy_base=True) takes a base path and no overlay path")
        source = Path(base).resolve()
        tempdir = Path(tempfile.mkdtemp(prefix="kvmpy-overlay-"))
        try:
            frozen = tempdir / f"{source.stem}.base{source.suffix}"
            shutil.copyfile(source, frozen)
            img = create_overlay(frozen, tempdir / f"{source.stem}.overlay.qcow2", base_format=base_format,
                                 cluster_bits=cluster_bits)
        except BaseException:
            shutil.rmtree(tempdir, ignore_errors=True)
            raise
        img._tempdir = tempdir  # noqa: SLF001 (its own class's field: the copy goes with the overlay)
        return img

    base_path = Path(base.path if isinstance(base, DiskImage) else base).resolve()
    fmt = base_format or (base.format if isinstance(base, DiskImage) else detect_format(base_path).value)
    # Size and format from the base itself (opened read-only, which also proves no writer holds it).
    with open_image(base_path, format=fmt, readonly=True) as probe:
        size = probe.size
    tempdir: Path | None = None
    if path is None:
        tempdir = Path(tempfile.mkdtemp(prefix="kvmpy-overlay-"))
        path = tempdir / f"{base_path.stem}.overlay.qcow2"
    path = Path(path)
    if size % 512:
        raise StorageError(f"{base_path}: size {size} is not a multiple of 512; an overlay needs whole sectors")
    try:
        create_qcow2(path, size, backing=str(base_path), backing_format=fmt, cluster_bits=cluster_bits)
    except BaseException:
        if tempdir is not None:
            shutil.rmtree(tempdir, ignore_errors=True)
        raise
    try:
        img = OverlayImage(path, base=base_path, keep=keep, tempdir=tempdir)
    except BaseException:
        path.unlink(missing_ok=True)  # ours: create_qcow2 refuses an existing path
        if tempdir is not None:
            shutil.rmtree(tempdir, ignore_errors=True)
        raise
    return img


__all__ = ["OverlayImage", "create_overlay"]
