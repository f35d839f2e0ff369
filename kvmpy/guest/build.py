"""Build the kvmpy micro-VM guest kernel from Debian's linux-source tarball.

The recipe: extract /usr/src/linux-source-*.tar.xz, `make tinyconfig`, merge
microvm.config (scripts/kconfig/merge_config.sh -m, then `make olddefconfig`),
check that kconfig kept every option of the fragment, `make vmlinux bzImage`,
and copy the results into a cache directory keyed by a hash of the inputs.

Cache layout under the cache root (see `kvmpy.cache.cache_root`):

    kernel-<hash16>/            finished artifacts; appears by an atomic rename,
                                so a half-done build is never taken as done
    linux-src/<tarball>-<key>/  the extracted source tree, kept once, shared by
                                every build from that tarball (read-only use)
    linux-build/<key>/          kbuild's object directory (O=), reused so that a
                                fragment change recompiles only what changed
    build.lock                  serialises builds sharing the object directory

Run `python -m kvmpy.guest.build` to build and print the artifact paths.
"""

from __future__ import annotations

import argparse
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Protocol, Sequence

from ..cache import cache_root

# Bump when the recipe below changes in a way that changes the artifacts
# (make targets, ARCH, environment, steps): it is part of the cache key.
BUILD_RECIPE_VERSION = 1

FRAGMENT_PATH = Path(__file__).with_name("microvm.config")
SOURCE_GLOB = "/usr/src/linux-source-*.tar.xz"
# ARCH=x86_64 (not the host default ARCH=x86) makes tinyconfig 64-bit already.
KERNEL_ARCH = "x86_64"
MAKE_TARGETS = ("vmlinux", "bzImage")
MANIFEST_NAME = "manifest.json"
# Host tools the recipe runs, with the Debian package that provides each.
REQUIRED_TOOLS: Mapping[str, str] = {
    "tar": "tar",
    "xz": "xz-utils",
    "make": "make",
    "gcc": "gcc",
    "flex": "flex",
    "bison": "bison",
    "bc": "bc",
    "bash": "bash",
    "lz4": "lz4",  # CONFIG_KERNEL_LZ4: compresses the bzImage payload
}
# Fixed build identity so the banner does not leak the builder's host name.
KBUILD_ENV: Mapping[str, str] = {
    "KBUILD_BUILD_USER": "kvmpy",
    "KBUILD_BUILD_HOST": "kvmpy",
    "LC_ALL": "C",
}

_SET_LINE = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET_LINE = re.compile(r"^#\s*(CONFIG_[A-Za-z0-9_]+) is not set\s*$")
_BANNER = re.compile(rb"Linux version [^\n\x00]+")


class GuestBuildError(RuntimeError):
    """The guest kernel could not be built; the message says why and how to fix it."""


class ConfigFragmentError(GuestBuildError):
    """The kernel config fragment is malformed."""


class DroppedOptionsError(GuestBuildError):
    """kconfig silently dropped or changed options of the fragment."""

    def __init__(self, dropped: Sequence["DroppedOption"], config_path: Path | str) -> None:
        self.dropped = list(dropped)
        lines = "\n".join(f"  {d.describe()}" for d in self.dropped)
        super().__init__(
            f"{config_path}: {len(self.dropped)} option(s) of {FRAGMENT_PATH.name} did not "
            f"survive `make olddefconfig`:\n{lines}\nfix: edit {FRAGMENT_PATH}: add the "
            f"missing dependencies or drop the line (find them with `make menuconfig`, "
            f"'/' then the option name)"
        )


# --------------------------------------------------------------------------
# Kconfig text: parsing and the "did every option survive" check
# --------------------------------------------------------------------------

def parse_config_fragment(text: str, *, origin: str = "<fragment>") -> dict[str, str]:
    """Parse a kconfig fragment into {CONFIG_NAME: value}; "is not set" becomes "n".

    Strict, because the fragment is hand-written: malformed lines and
    options given twice are errors (kconfig would silently take the last).
    """
    options: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        parsed = _parse_config_line(raw)
        if parsed is None:
            continue
        if parsed == ():
            raise ConfigFragmentError(
                f"{origin}:{lineno}: not a kconfig line: {raw.strip()!r}; "
                f"expected CONFIG_NAME=value or '# CONFIG_NAME is not set'"
            )
        name, value = parsed
        if name in options:
            raise ConfigFragmentError(
                f"{origin}:{lineno}: {name} is given twice; keep one line"
            )
        options[name] = value
    return options


def parse_dotconfig(text: str) -> dict[str, str]:
    """Parse a kconfig-generated .config; "is not set" becomes "n"."""
    options: dict[str, str] = {}
    for raw in text.splitlines():
        parsed = _parse_config_line(raw)
        if parsed:
            options[parsed[0]] = parsed[1]
    return options


def _parse_config_line(raw: str) -> tuple[str, str] | tuple[()] | None:
    """(name, value) for an option line, None for blank/comment, () if malformed."""
    line = raw.strip()
    if not line:
        return None
    if line.startswith("#"):
        unset = _UNSET_LINE.match(line)
        return (unset.group(1), "n") if unset else None
    match = _SET_LINE.match(line)
    if not match:
        return ()
    return match.group(1), match.group(2).strip()


@dataclass(frozen=True)
class DroppedOption:
    """One fragment option whose final value differs from the requested one."""

    name: str
    wanted: str
    got: str | None  # None: absent from the final .config (dependencies unmet)

    def describe(self) -> str:
        wanted = "is not set" if self.wanted == "n" else f"={self.wanted}"
        if self.got is None:
            why = "absent: its dependencies are not met (or the name is misspelt)"
        elif self.wanted == "n":
            why = f"={self.got}: another option selects it, or it cannot be turned off"
        else:
            why = f"={self.got}: a dependency, a range or a choice overrode it"
        return f"{self.name}: wanted {wanted}, got {why}"


def find_dropped_options(
    fragment: Mapping[str, str], final: Mapping[str, str]
) -> list[DroppedOption]:
    """Fragment options whose value in the final .config is not the requested one."""
    dropped: list[DroppedOption] = []
    for name, wanted in fragment.items():
        got = final.get(name)
        if wanted == "n":
            # An absent option is off too: its menu's dependency is off.
            if got not in (None, "n"):
                dropped.append(DroppedOption(name, wanted, got))
        elif got != wanted:
            dropped.append(DroppedOption(name, wanted, got))
    return dropped


def check_fragment_applied(fragment_text: str, config_text: str, *, config_path: Path | str) -> None:
    """Raise DroppedOptionsError unless every fragment option is in the final .config."""
    fragment = parse_config_fragment(fragment_text, origin=str(FRAGMENT_PATH))
    dropped = find_dropped_options(fragment, parse_dotconfig(config_text))
    if dropped:
        raise DroppedOptionsError(dropped, config_path)


# --------------------------------------------------------------------------
# Inputs and cache keys
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class SourceTarball:
    """The kernel source tarball, identified for caching by name, size and mtime."""

    path: Path
    size: int
    mtime_ns: int

    @classmethod
    def from_path(cls, path: Path) -> "SourceTarball":
        st = path.stat()
        return cls(path=path, size=st.st_size, mtime_ns=st.st_mtime_ns)

    @property
    def stem(self) -> str:
        """'linux-source-6.1' for linux-source-6.1.tar.xz."""
        return self.path.name.removesuffix(".tar.xz")

    def identity(self) -> str:
        return f"{self.path.name}:{self.size}:{self.mtime_ns}"

    def key(self) -> str:
        """Short hash naming the extracted tree and object directory of this tarball."""
        return hashlib.sha256(self.identity().encode()).hexdigest()[:12]


def find_linux_source(pattern: str = SOURCE_GLOB) -> SourceTarball:
    """The newest Debian linux-source tarball; clear error if none is installed."""
    candidates = [Path(p) for p in glob.glob(pattern)]
    if not candidates:
        raise GuestBuildError(
            f"no kernel source tarball matches {pattern}; "
            f"install it with `apt-get install linux-source`"
        )
    return SourceTarball.from_path(max(candidates, key=_version_sort_key))


def _version_sort_key(path: Path) -> tuple[int, ...]:
    """linux-source-6.10 sorts after linux-source-6.9 (numeric, not lexical)."""
    return tuple(int(n) for n in re.findall(r"\d+", path.name))


def cache_key(
    fragment: bytes, source: SourceTarball, recipe_version: int = BUILD_RECIPE_VERSION
) -> str:
    """16 hex digits naming kernel-<key>/: changes iff an input of the build changes."""
    h = hashlib.sha256()
    # Length-prefixed fields so no two different inputs can concatenate equally.
    for field in (f"recipe={recipe_version}".encode(), source.identity().encode(), fragment):
        h.update(len(field).to_bytes(8, "little"))
        h.update(field)
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------
# Artifacts
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelArtifacts:
    """A finished guest kernel build in the cache."""

    directory: Path
    vmlinux: Path      # uncompressed ELF: the VMM loads this (64-bit entry or PVH note)
    bzimage: Path      # Linux boot-protocol image, LZ4 payload
    system_map: Path   # symbol addresses, for exit-site profiles and debugging
    config: Path       # the final .config
    version: str       # kernel release, e.g. "6.1.192"
    banner: str        # the "Linux version ..." line the kernel prints first
    build_seconds: float

    @classmethod
    def load(cls, directory: Path) -> "KernelArtifacts":
        manifest_path = directory / MANIFEST_NAME
        try:
            manifest = json.loads(manifest_path.read_text())
            manifest["version"], manifest["banner"], manifest["build_seconds"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise GuestBuildError(f"{manifest_path}: unreadable build manifest ({exc}); "
                                  f"delete {directory} to rebuild") from exc
        return cls(
            directory=directory,
            vmlinux=directory / "vmlinux",
            bzimage=directory / "bzImage",
            system_map=directory / "System.map",
            config=directory / "config",
            version=manifest["version"],
            banner=manifest["banner"],
            build_seconds=float(manifest["build_seconds"]),
        )

    def paths(self) -> dict[str, Path]:
        return {
            "vmlinux": self.vmlinux,
            "bzimage": self.bzimage,
            "system_map": self.system_map,
            "config": self.config,
        }


def load_cached_kernel(artifact_dir: Path) -> KernelArtifacts | None:
    """The artifacts in artifact_dir if that build completed, else None."""
    if not (artifact_dir / MANIFEST_NAME).is_file():
        return None
    artifacts = KernelArtifacts.load(artifact_dir)
    if not all(p.is_file() for p in artifacts.paths().values()):
        return None
    return artifacts


def find_cached_kernel(cache_dir: Path | None = None) -> KernelArtifacts | None:
    """The cached kernel for the current inputs, without building (None if absent)."""
    root = cache_dir if cache_dir is not None else cache_root()
    source = find_linux_source()
    key = cache_key(FRAGMENT_PATH.read_bytes(), source)
    return load_cached_kernel(root / f"kernel-{key}")


# --------------------------------------------------------------------------
# Progress display
# --------------------------------------------------------------------------

class Reporter(Protocol):
    def start(self, step: str, description: str, total: int | None = None) -> None: ...
    def advance(self, line: str) -> None: ...
    def finish(self, step: str, summary: str) -> None: ...
    def close(self) -> None: ...


class SilentReporter:
    def start(self, step: str, description: str, total: int | None = None) -> None:
        pass

    def advance(self, line: str) -> None:
        pass

    def finish(self, step: str, summary: str) -> None:
        pass

    def close(self) -> None:
        pass


class PlainReporter:
    """One line per step, for logs and CI (stdout is not a terminal)."""

    def __init__(self) -> None:
        self._started = 0.0

    def start(self, step: str, description: str, total: int | None = None) -> None:
        self._started = time.monotonic()
        print(f"[kvmpy guest] {step}: {description}", flush=True)

    def advance(self, line: str) -> None:
        pass

    def finish(self, step: str, summary: str) -> None:
        took = time.monotonic() - self._started
        print(f"[kvmpy guest] {step}: {summary} ({took:.1f} s)", flush=True)

    def close(self) -> None:
        pass


class RichReporter:
    """Live progress: one row per step, the compile row counts make's output lines."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
            TimeElapsedColumn,
        )

        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("[dim]{task.fields[last]}"),
        )
        self._progress.start()
        self._task: int | None = None

    def start(self, step: str, description: str, total: int | None = None) -> None:
        self._task = self._progress.add_task(f"{step}: {description}", total=total, last="")

    def advance(self, line: str) -> None:
        if self._task is not None:
            self._progress.update(self._task, advance=1, last=line.strip()[-60:])

    def finish(self, step: str, summary: str) -> None:
        if self._task is None:
            return
        # The bar's total was an estimate (the previous build's line count):
        # show what actually happened, e.g. 37/37 for an incremental rebuild.
        done = int(self._progress.tasks[-1].completed) or 1
        self._progress.update(self._task, description=f"{step}: {summary}", total=done,
                              completed=done, last="")
        self._task = None

    def close(self) -> None:
        self._progress.stop()


def make_reporter(progress: bool) -> Reporter:
    if not progress:
        return SilentReporter()
    return RichReporter() if sys.stdout.isatty() else PlainReporter()


# --------------------------------------------------------------------------
# The build steps
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class BuildPaths:
    """Where one build's pieces live under the cache root."""

    root: Path
    source_dir: Path
    object_dir: Path
    artifact_dir: Path

    @classmethod
    def for_inputs(cls, root: Path, source: SourceTarball, key: str) -> "BuildPaths":
        return cls(
            root=root,
            source_dir=root / "linux-src" / f"{source.stem}-{source.key()}",
            object_dir=root / "linux-build" / source.key(),
            artifact_dir=root / f"kernel-{key}",
        )


def check_host_tools(tools: Mapping[str, str] = REQUIRED_TOOLS) -> None:
    missing = {tool: pkg for tool, pkg in tools.items() if shutil.which(tool) is None}
    if missing:
        names = ", ".join(sorted(missing))
        pkgs = " ".join(sorted(set(missing.values())))
        raise GuestBuildError(
            f"guest kernel build needs {names} on PATH; install with `apt-get install {pkgs}`"
        )


def extract_source(source: SourceTarball, dest: Path, reporter: Reporter) -> None:
    """Extract the tarball to dest once; the rename makes a partial extract invisible."""
    if (dest / "Makefile").is_file():
        return
    reporter.start("extract", f"{source.path.name} -> {dest}")
    _remove_stale_siblings(dest)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # System tar + xz: several times faster than tarfile for ~80k members.
    _run(["tar", "-xJf", str(source.path), "-C", str(tmp), "--strip-components=1"],
         what=f"extracting {source.path}")
    if not (tmp / "Makefile").is_file():
        raise GuestBuildError(f"{source.path}: no top-level Makefile after extraction; "
                              f"the tarball is not a kernel source tree (reinstall linux-source)")
    tmp.rename(dest)
    reporter.finish("extract", "done")


def _remove_stale_siblings(keep: Path) -> None:
    """Drop trees of older tarballs so the cache holds one source tree, not several."""
    parent = keep.parent
    parent.mkdir(parents=True, exist_ok=True)
    for entry in parent.iterdir():
        if entry != keep and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def make_command(paths: BuildPaths, *targets: str, jobs: int | None = None) -> list[str]:
    cmd = ["make", "-C", str(paths.source_dir), f"O={paths.object_dir}", f"ARCH={KERNEL_ARCH}"]
    if jobs is not None:
        cmd.append(f"-j{jobs}")
    return cmd + list(targets)


def configure(paths: BuildPaths, fragment: Path, reporter: Reporter) -> None:
    """tinyconfig + fragment + olddefconfig, then prove every fragment option stuck."""
    reporter.start("configure", f"tinyconfig + {fragment.name}")
    _remove_stale_siblings(paths.object_dir)
    paths.object_dir.mkdir(parents=True, exist_ok=True)
    dotconfig = paths.object_dir / ".config"
    _run(make_command(paths, "tinyconfig"), what="make tinyconfig")
    # -m: merge only; olddefconfig below resolves the dependencies. cwd is the
    # object dir because merge_config.sh drops its temp files in the cwd.
    merge = paths.source_dir / "scripts" / "kconfig" / "merge_config.sh"
    _run(["bash", str(merge), "-m", "-O", str(paths.object_dir), str(dotconfig), str(fragment)],
         what="merge_config.sh", cwd=paths.object_dir)
    _run(make_command(paths, "olddefconfig"), what="make olddefconfig")
    check_fragment_applied(fragment.read_text(), dotconfig.read_text(), config_path=dotconfig)
    reporter.finish("configure", f"all {len(parse_config_fragment(fragment.read_text()))} "
                                 f"fragment options present in .config")


def compile_kernel(paths: BuildPaths, jobs: int, reporter: Reporter) -> int:
    """make vmlinux bzImage; returns the number of output lines (for the next bar)."""
    expected = _read_expected_lines(paths.root)
    reporter.start("compile", f"make -j{jobs} {' '.join(MAKE_TARGETS)}", total=expected)
    log_path = paths.object_dir / "kvmpy-make.log"
    run = StreamedCommand(make_command(paths, *MAKE_TARGETS, jobs=jobs), log_path)
    count = 0
    tail: deque[str] = deque(maxlen=30)
    for line in run.lines():
        count += 1
        tail.append(line)
        reporter.advance(line)
    if run.returncode != 0:
        raise GuestBuildError(
            f"make {' '.join(MAKE_TARGETS)} failed (exit {run.returncode}) in {paths.object_dir}; "
            f"last lines:\n{''.join(tail)}full log: {log_path}"
        )
    _write_expected_lines(paths.root, count)
    reporter.finish("compile", f"{count} make steps")
    return count


class StreamedCommand:
    """A command whose merged stdout/stderr is read line by line and teed to a log."""

    def __init__(self, cmd: list[str], log_path: Path) -> None:
        self.cmd = cmd
        self.log_path = log_path
        self.returncode: int | None = None

    def lines(self) -> Iterator[str]:
        env = {**os.environ, **KBUILD_ENV}
        with self.log_path.open("w") as log, subprocess.Popen(
            self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=env, errors="replace",
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                yield line
        self.returncode = proc.returncode


def _expected_lines_file(root: Path) -> Path:
    return root / "compile-lines.json"


def _read_expected_lines(root: Path) -> int | None:
    """Line count of the previous full build: turns the spinner into a bar."""
    try:
        return int(json.loads(_expected_lines_file(root).read_text())["lines"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_expected_lines(root: Path, count: int) -> None:
    # Only a from-scratch build's count is a useful estimate; an incremental
    # rebuild prints far fewer lines, so keep the larger number.
    previous = _read_expected_lines(root) or 0
    _expected_lines_file(root).write_text(json.dumps({"lines": max(count, previous)}))


def read_kernel_version(object_dir: Path) -> str:
    release = object_dir / "include" / "config" / "kernel.release"
    try:
        return release.read_text().strip()
    except OSError as exc:
        raise GuestBuildError(f"{release}: cannot read the kernel release ({exc}); "
                              f"the build did not finish, rerun it") from exc


def read_banner(vmlinux: Path) -> str:
    """The linux_banner string embedded in vmlinux ("Linux version 6.1... #1 SMP ...")."""
    banners = [m.group(0).decode(errors="replace").strip()
               for m in _BANNER.finditer(vmlinux.read_bytes())]
    if not banners:
        raise GuestBuildError(f"{vmlinux}: no 'Linux version' banner found; not a Linux vmlinux")
    # 6.1 links a placeholder banner ("... # SMP") into the first vmlinux pass
    # and the real one ("#1 SMP <date>") in init/version-timestamp.c: prefer it.
    stamped = [b for b in banners if re.search(r"#\d+ ", b)]
    return (stamped or banners)[-1]


def publish_artifacts(paths: BuildPaths, *, inputs: Mapping[str, object], build_seconds: float,
                      reporter: Reporter) -> KernelArtifacts:
    """Copy the results into kernel-<key>/ and mark it complete by renaming it into place."""
    reporter.start("copy", f"artifacts -> {paths.artifact_dir}")
    obj = paths.object_dir
    tmp = paths.artifact_dir.with_name(f".{paths.artifact_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sources = {
        "vmlinux": obj / "vmlinux",
        "bzImage": obj / "arch" / "x86" / "boot" / "bzImage",
        "System.map": obj / "System.map",
        "config": obj / ".config",
    }
    for name, src in sources.items():
        if not src.is_file():
            raise GuestBuildError(f"{src}: expected build output is missing; "
                                  f"see {obj / 'kvmpy-make.log'}")
        shutil.copy2(src, tmp / name)
    manifest = {
        "version": read_kernel_version(obj),
        "banner": read_banner(tmp / "vmlinux"),
        "build_seconds": round(build_seconds, 1),
        "inputs": dict(inputs),
    }
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    _fsync_tree(tmp)
    if paths.artifact_dir.exists():
        # Another process finished the same build first; theirs is as good.
        shutil.rmtree(tmp)
    else:
        tmp.rename(paths.artifact_dir)
    reporter.finish("copy", "done")
    return KernelArtifacts.load(paths.artifact_dir)


def _fsync_tree(directory: Path) -> None:
    """Flush files before the rename publishes them, so a crash can't leave a torn build."""
    for entry in directory.iterdir():
        with entry.open("rb") as f:
            os.fsync(f.fileno())


def _run(cmd: list[str], *, what: str, cwd: Path | None = None) -> None:
    env = {**os.environ, **KBUILD_ENV}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, errors="replace")
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr).strip().splitlines()[-25:]
        raise GuestBuildError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                              + "\n".join(output))


class _BuildLock:
    """An exclusive flock on <root>/build.lock: builds share the object directory."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self._path = root / "build.lock"
        self._fd: int | None = None

    def __enter__(self) -> "_BuildLock":
        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None


def default_jobs() -> int:
    """What `nproc` reports: the CPUs this process may run on."""
    return len(os.sched_getaffinity(0))


def build_kernel(cache_dir: Path | None = None, *, jobs: int | None = None,
                 progress: bool = True) -> KernelArtifacts:
    """Build (or fetch from the cache) the micro-VM guest kernel.

    Returns immediately when kernel-<key>/ for the current inputs exists.
    """
    if jobs is not None and jobs < 1:
        raise ValueError(f"jobs={jobs}: must be at least 1 (or None for nproc)")
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    fragment_bytes = FRAGMENT_PATH.read_bytes()
    # Fail on a malformed fragment before spending minutes on extraction.
    parse_config_fragment(fragment_bytes.decode(), origin=str(FRAGMENT_PATH))
    source = find_linux_source()
    key = cache_key(fragment_bytes, source)
    paths = BuildPaths.for_inputs(root, source, key)
    cached = load_cached_kernel(paths.artifact_dir)
    if cached is not None:
        return cached
    check_host_tools()
    with _BuildLock(root):
        # A concurrent build may have finished while this one waited for the lock.
        cached = load_cached_kernel(paths.artifact_dir)
        if cached is not None:
            return cached
        return _build_locked(paths, source, key, jobs or default_jobs(), make_reporter(progress))


def _build_locked(paths: BuildPaths, source: SourceTarball, key: str, jobs: int,
                  reporter: Reporter) -> KernelArtifacts:
    started = time.monotonic()
    try:
        extract_source(source, paths.source_dir, reporter)
        configure(paths, FRAGMENT_PATH, reporter)
        compile_kernel(paths, jobs, reporter)
        inputs = {
            "cache_key": key,
            "recipe_version": BUILD_RECIPE_VERSION,
            "source": source.identity(),
            "fragment_sha256": hashlib.sha256(FRAGMENT_PATH.read_bytes()).hexdigest(),
            "jobs": jobs,
        }
        return publish_artifacts(paths, inputs=inputs, build_seconds=time.monotonic() - started,
                                 reporter=reporter)
    finally:
        reporter.close()


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------

def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m kvmpy.guest.build",
        description="Build the kvmpy micro-VM guest kernel (cached) and print its paths.",
    )
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="cache root (default: $KVMPY_CACHE, $XDG_CACHE_HOME/kvmpy "
                             "or ~/.cache/kvmpy)")
    parser.add_argument("-j", "--jobs", type=int, default=None,
                        help="parallel make jobs (default: nproc)")
    parser.add_argument("--no-progress", action="store_true", help="print nothing while building")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        artifacts = build_kernel(args.cache_dir, jobs=args.jobs, progress=not args.no_progress)
    except (GuestBuildError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; the partial build is not marked done and will be redone",
              file=sys.stderr)
        return 130
    print(f"version:    {artifacts.version}")
    print(f"banner:     {artifacts.banner}")
    for name, path in artifacts.paths().items():
        print(f"{name + ':':<11} {path}")
    print(f"built in:   {artifacts.build_seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
