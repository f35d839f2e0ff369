"""kvmpy's on-disk cache: where built artifacts live and how they are stored.

The root is $KVMPY_CACHE, else $XDG_CACHE_HOME/kvmpy, else ~/.cache/kvmpy;
assembled guests, compiled sandbox functions and guest kernels each have a
directory under it. Entries are keyed by a hash of their inputs, so a
stale entry is never read, and written with `store`: any number of threads
and processes may build the same entry at once, and a reader sees either
no file or a complete one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Mapping


def cache_root(env: Mapping[str, str] | None = None) -> Path:
    """$KVMPY_CACHE, else $XDG_CACHE_HOME/kvmpy, else ~/.cache/kvmpy."""
    env = os.environ if env is None else env
    if env.get("KVMPY_CACHE"):
        return Path(env["KVMPY_CACHE"]).expanduser()
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]).expanduser() / "kvmpy"
    return Path.home() / ".cache" / "kvmpy"


def store(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically and durably (a temporary file of our own, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
