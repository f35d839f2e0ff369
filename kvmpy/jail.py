"""Confinement for the VMM process, as Firecracker's jailer does it: `kvmpy run --jail`.

Layers, in the order they are put on (docs/jail.md):

1. cgroup: a per-VM cgroup with memory and pids limits (v2 when its
   controllers are enabled, else the v1 memory and pids hierarchies, else a
   warning), made by the launcher and removed after the VMM exits.
2. namespaces: the launcher spawns a relay process in new mount, pid, ipc,
   uts and (when no TAP is asked for) network namespaces; the relay forks
   the VMM, which is pid 1 of the new pid namespace.
3. root: the VMM imports everything it will run, then mounts a tmpfs,
   puts in it only the device nodes (/dev/kvm, and /dev/net/tun,
   /dev/vhost-vsock, /dev/urandom when configured), bind mounts of the
   images (read-only where read-only) and its control-socket directory, and
   pivot_roots into it; the old root is detached.
4. rlimits: RLIMIT_NOFILE, RLIMIT_CORE 0, RLIMIT_MEMLOCK 0, set before the VMM builds its machine.
5. privileges: once the machine is built (images, /dev/kvm, TAPs opened as
   root), the VMM drops to an unprivileged uid/gid with no supplementary
   groups; every capability goes with the uid change.
6. seccomp: then a libseccomp filter (pyseccomp, ctypes over libseccomp2)
   allows only the system calls in `ALLOWED_SYSCALLS`, for every thread
   (TSYNC); anything else kills the process (or fails with EPERM, or is
   only logged, by `JailConfig.seccomp`).

The launcher stays outside, unconfined, to remove the cgroup, the jail
directory and any TAP left behind, and to say which system call a killed
VMM made (from the kernel's audit record).
"""

from __future__ import annotations

import ctypes
import enum
import errno
import json
import os
import re
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import KvmError

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_THREAD = 0x00010000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
SYS_PIVOT_ROOT = 155  # x86_64

DEFAULT_BASE = Path("/run/kvmpy-jail")
CGROUP_ROOT = Path("/sys/fs/cgroup")
HOSTNAME = "kvmpy-jail"

# Device nodes the jail may hold: name -> (major, minor), as in Documentation/admin-guide/devices.txt.
DEVICES = {
    "kvm": (10, 232),
    "net/tun": (10, 200),
    "vhost-vsock": (10, 241),
    "urandom": (1, 9),
}


class JailError(KvmError):
    """The jail could not be set up, or the jailed VMM was stopped by it (seccomp)."""


class SeccompViolation(JailError):
    """The jailed VMM made a system call outside `ALLOWED_SYSCALLS` and was killed."""

    def __init__(self, message: str, syscall: str | None) -> None:
        super().__init__(message)
        self.syscall = syscall


class SeccompAction(enum.Enum):
    KILL = "kill"    # SECCOMP_RET_KILL_PROCESS, as Firecracker: the VMM dies with SIGSYS
    ERRNO = "errno"  # the call fails with EPERM; the VMM's error path reports it
    LOG = "log"      # allowed but logged by the kernel: for measuring the list


@dataclass(frozen=True)
class JailConfig:
    """How to confine one VMM. Sizes in bytes; None means no limit of that kind."""

    uid: int = 65534  # nobody
    gid: int = 65534  # nogroup
    memory_max: int | None = None  # cgroup memory limit; None: guest RAM + MEMORY_OVERHEAD (set by the CLI)
    pids_max: int | None = 64  # threads count as pids: vCPUs, I/O threads, console
    nofile: int = 1024  # RLIMIT_NOFILE
    new_net: bool = True  # a network namespace of its own (no TAP possible then)
    seccomp: SeccompAction = SeccompAction.KILL
    base: Path = DEFAULT_BASE  # jails live in base/<id>/root, removed after
    devices: tuple[str, ...] = ("kvm",)

    def validate(self) -> None:
        for name in self.devices:
            if name not in DEVICES:
                raise JailError(f"jail device {name!r}: unknown (known: {', '.join(DEVICES)})")
        if self.uid == 0 or self.gid == 0:
            raise JailError("jail uid/gid 0: the jail drops root; pick an unprivileged uid, e.g. 65534")
        if self.uid < 0 or self.gid < 0:
            raise JailError(f"jail uid/gid {self.uid}/{self.gid}: must be >= 0")
        if self.pids_max is not None and self.pids_max < 8:
            raise JailError(f"jail pids_max {self.pids_max}: the VMM needs at least 8 (threads count)")
        if self.memory_max is not None and self.memory_max < 64 << 20:
            raise JailError(f"jail memory_max {self.memory_max}: less than 64 MiB cannot hold the VMM")


MEMORY_OVERHEAD = 256 << 20  # the Python VMM itself, beside guest RAM


@dataclass(frozen=True)
class Bind:
    """A host file or directory that appears at the same path inside the jail."""

    path: str
    read_only: bool = True


# -- the allow-list ----------------------------------------------------------------------------
# Measured with scripts/jail_syscalls.py: jailed boots of the guest to a shell (with and
# without a disk, rng, TAP net and userspace vsock), a command using each device,
# power-off, under `strace -f` with the filter in log mode; every call the VMM's
# threads made after the filter went in is listed here, plus a few for paths such a
# boot does not take (named in the comments). docs/jail.md has the counts.
ALLOWED_SYSCALLS: dict[str, tuple[str, ...]] = {
    # the vCPU run loop and every KVM/vhost/TAP/terminal request are ioctls (narrowed by IOCTL_TYPES)
    "kvm": ("ioctl",),
    # console, virtio-blk (pread/pwrite at offsets, preadv2/pwritev2, FLUSH = fdatasync), TAP frames
    # (readv/writev), eventfds for ioeventfd/irqfd when the guest resets a device
    "io": ("read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "preadv2",
           "pwritev2", "lseek", "fsync", "fdatasync", "close", "fstat", "newfstatat", "statx", "fcntl",
           "eventfd2", "openat", "getdents64"),
    # waiting: the I/O thread's epoll, the console's select (glibc: pselect6), queue waits
    "poll": ("ppoll", "pselect6", "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait"),
    # threads: vCPU threads start after set-up (clone only with CLONE_THREAD: no fork; clone3 gets
    # ENOSYS so that glibc falls back to clone), their locks, stacks freed at exit, vCPU kicks
    "threads": ("clone", "futex", "set_robust_list", "rseq", "gettid", "getpid", "tgkill", "sched_yield",
                "exit", "exit_group", "madvise"),
    # memory: Python's allocator (guest RAM is mapped before the filter)
    "memory": ("mmap", "munmap", "mprotect", "mremap", "brk"),
    # signals: Ctrl-C, Python's handlers
    "signals": ("rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack"),
    # time: sleeps and timeouts (clock_gettime/gettimeofday are vDSO calls unless the vDSO is missing)
    "time": ("clock_gettime", "gettimeofday", "clock_nanosleep", "nanosleep"),
    # the `kvmpy stat` control socket and the userspace vsock back end (AF_UNIX only: SOCKET_FAMILIES);
    # the control server looks for (access, mkdir) its directory and removes its socket at exit
    "unix sockets": ("socket", "bind", "listen", "accept4", "connect", "getsockname", "getsockopt",
                     "setsockopt", "sendto", "recvfrom", "sendmsg", "recvmsg", "shutdown", "unlink", "chmod",
                     "access", "mkdir"),
    # Python: entropy for hash seeds and uuid/random, identity queries
    "python": ("getrandom", "getuid", "geteuid", "getgid", "getegid"),
}

# ioctl types (the _IOC type byte) a running VMM issues: KVM, vhost, TAP, terminal ('T' is 0x54).
IOCTL_TYPES = {"kvm": 0xAE, "vhost": 0xAF, "tty/tun": 0x54}
# FIONBIO, FIOCLEX, FIONCLEX, FIONREAD are type 0x54 too (0x5421, 0x5451, 0x5450, 0x541B).
SOCKET_FAMILIES = {"AF_UNIX": socket.AF_UNIX}
CLONE3_ERRNO = errno.ENOSYS  # glibc falls back to clone(2), whose flags a filter can see

SECCOMP_MARKER = "/.kvmpy-seccomp-marker"  # stat()ed just before the filter goes in: scripts/jail_syscalls.py


def allowed_syscalls() -> list[str]:
    return sorted({name for group in ALLOWED_SYSCALLS.values() for name in group})


# -- libc ----------------------------------------------------------------------------------------

_libc = ctypes.CDLL("libc.so.6", use_errno=True)  # not find_library: it forks, and a fork here would take pid 1


def _check(ret: int, what: str) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise JailError(f"{what}: {errno.errorcode.get(e, e)} ({os.strerror(e)})")


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), f"unshare({flags:#x})")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def enc(s: str | None) -> bytes | None:
        return s.encode() if s is not None else None

    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {source} on {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_libc.syscall(SYS_PIVOT_ROOT, new_root.encode(), put_old.encode()), f"pivot_root({new_root})")


def umount2(target: str, flags: int) -> None:
    _check(_libc.umount2(target.encode(), ctypes.c_int(flags)), f"umount {target}")


def set_pdeathsig(sig: int) -> None:
    _check(_libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(sig), 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")


def namespace_flags(config: JailConfig) -> int:
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    return flags | (CLONE_NEWNET if config.new_net else 0)


# -- cgroups ---------------------------------------------------------------------------------------

@dataclass
class Cgroup:
    """One VM's cgroup: v2 (one directory) or v1 (one per hierarchy). `dirs` empty: none was possible."""

    version: int
    dirs: list[Path] = field(default_factory=list)
    warning: str | None = None

    @classmethod
    def create(cls, name: str, memory_max: int | None, pids_max: int | None,
               root: Path = CGROUP_ROOT) -> Cgroup:
        want = {c for c, v in (("memory", memory_max), ("pids", pids_max)) if v is not None}
        v2 = _cgroup2_root(root, want)
        cg = cls(2 if v2 is not None else 1)
        try:
            if v2 is not None:
                d = v2 / f"kvmpy-{name}"
                d.mkdir()
                cg.dirs.append(d)
                if memory_max is not None:
                    (d / "memory.max").write_text(str(memory_max))
                if pids_max is not None:
                    (d / "pids.max").write_text(str(pids_max))
                return cg
            if want and all((root / c / "cgroup.procs").exists() for c in want):
                for c in sorted(want):  # v1: one directory per hierarchy
                    d = root / c / f"kvmpy-{name}"
                    d.mkdir()
                    cg.dirs.append(d)
                    if c == "memory":
                        (d / "memory.limit_in_bytes").write_text(str(memory_max))
                    else:
                        (d / "pids.max").write_text(str(pids_max))
                return cg
        except OSError as e:
            cg.remove()
            return cls(0, [], f"cgroup limits not applied: {e.filename}: {e.strerror}")
        return cls(0, [], f"cgroup limits not applied: no writable cgroup v2 with the {sorted(want)} "
                          f"controllers and no v1 hierarchies for them under {root}")

    def join(self, pid: int = 0) -> None:
        """Move `pid` (0: the caller) into every directory of this cgroup."""
        for d in self.dirs:
            (d / "cgroup.procs").write_text(str(pid or os.getpid()))

    def limits(self) -> dict[str, int | None]:
        """The limits in force, read back from the cgroup files."""
        out: dict[str, int | None] = {}
        for d in self.dirs:
            for key, fname in (("memory", "memory.max"), ("memory", "memory.limit_in_bytes"),
                               ("pids", "pids.max")):
                p = d / fname
                if p.exists():
                    text = p.read_text().strip()
                    out[key] = None if text == "max" else int(text)
        return out

    def remove(self) -> None:
        for d in self.dirs:
            for _ in range(50):  # the last process's exit is noticed asynchronously
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY:
                        raise
                    time.sleep(0.02)
        self.dirs = []


def _cgroup2_root(root: Path, want: set[str]) -> Path | None:
    for candidate in (root, root / "unified"):
        try:
            controllers = set((candidate / "cgroup.controllers").read_text().split())
            enabled = set((candidate / "cgroup.subtree_control").read_text().split())
        except OSError:
            continue
        if want <= controllers and want <= enabled and os.access(candidate, os.W_OK):
            return candidate
    return None


# -- the launcher (outside the jail) ---------------------------------------------------------------

@dataclass
class JailSpec:
    """What the launcher tells the jailed side (JSON on its command line)."""

    root: str
    uid: int
    gid: int
    binds: list[dict]
    devices: list[str]
    nofile: int
    seccomp: str
    status_fd: int
    runtime_dir: str  # host directory bound at /run/kvmpy (the control socket)


class JailedProcess:
    """A program run confined: `entry` ("module:function", called with `argv`) in a fresh jail.

    The function runs as pid 1 of the new pid namespace inside the private
    root, as root until it calls `lock_down()` (the VMM does it once its
    machine is built), then as `config.uid` under the seccomp filter.
    `popen` keywords (stdin, stdout, stderr) go to the relay process; the
    jailed program inherits them. `pid` is the jailed program's pid as the
    host sees it.
    """

    def __init__(self, config: JailConfig, entry: str, argv: Sequence[str], binds: Sequence[Bind] = (),
                 **popen: Any) -> None:
        config.validate()
        if os.geteuid() != 0:
            raise JailError("--jail needs root: namespaces, pivot_root and device nodes need CAP_SYS_ADMIN "
                            "and CAP_MKNOD (the VMM drops to the jail uid after set-up)")
        for b in binds:
            if not os.path.exists(b.path):
                raise JailError(f"jail bind {b.path}: no such file or directory")
        self.config = config
        self.id = uuid.uuid4().hex[:12]
        self.dir = Path(config.base) / self.id
        self.root = self.dir / "root"
        self.runtime_dir = self.dir / "run"
        self.pid: int | None = None
        self.proc: subprocess.Popen | None = None
        self._status: int | None = None
        self.cgroup = Cgroup(0)
        self.stale_removed = cleanup_stale_jails(Path(config.base))
        self.root.mkdir(parents=True, mode=0o700)
        (self.dir / "launcher.pid").write_text(str(os.getpid()))
        self.runtime_dir.mkdir(mode=0o700)
        os.chown(self.runtime_dir, config.uid, config.gid)
        try:
            self.cgroup = Cgroup.create(self.id, config.memory_max, config.pids_max)
            if self.cgroup.warning:
                print(f"kvmpy: warning: {self.cgroup.warning}", file=sys.stderr)
            r, w = os.pipe()
            self._status_r = r
            spec = JailSpec(root=str(self.root), uid=config.uid, gid=config.gid,
                            binds=[asdict(b) for b in binds], devices=list(config.devices),
                            nofile=config.nofile, seccomp=config.seccomp.value, status_fd=w,
                            runtime_dir=str(self.runtime_dir))
            flags = namespace_flags(config)
            cgroup = self.cgroup

            def in_child() -> None:  # the relay, between fork and exec
                set_pdeathsig(signal.SIGKILL)
                cgroup.join()
                unshare(flags)

            self.proc = subprocess.Popen([sys.executable, "-m", "kvmpy.jail", json.dumps(asdict(spec)),
                                          entry, *argv], preexec_fn=in_child, pass_fds=(w,), **popen)
            os.close(w)
            self.pid = self._read_pid()
        except BaseException:
            self.close()
            raise

    def _read_pid(self) -> int:
        line = b""
        while not line.endswith(b"\n"):
            chunk = os.read(self._status_r, 1)
            if not chunk:
                rc = self.proc.wait() if self.proc else None
                raise JailError(f"the jail's relay exited ({rc}) before starting the VMM")
            line += chunk
        return int(line.split()[1])

    def wait(self, timeout: float | None = None) -> int:
        """The jailed program's exit code; raises SeccompViolation if the filter killed it."""
        assert self.proc is not None
        self.proc.wait(timeout)
        if self._status is None:
            rest = b""
            while chunk := os.read(self._status_r, 64):
                rest += chunk
            m = re.search(rb"status (\d+)", rest)
            self._status = int(m.group(1)) if m else -1
        status = self._status
        if status < 0:
            raise JailError(f"the jail's relay died ({self.proc.returncode}) without the VMM's status")
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            if sig == signal.SIGSYS:
                name = seccomp_victim_syscall(self.pid)
                raise SeccompViolation(
                    f"jailed VMM (pid {self.pid}) killed by its seccomp filter: system call "
                    f"{name or '(see the kernel log: audit type=1326)'} is not in kvmpy.jail.ALLOWED_SYSCALLS",
                    name)
            return 128 + sig
        return os.WEXITSTATUS(status)

    def close(self) -> None:
        """Kill the jailed program if it still runs; remove the cgroup and the jail directory."""
        if self.proc is not None and self.proc.poll() is None:
            if self.pid:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.kill()
            self.proc.wait()
        if hasattr(self, "_status_r") and self._status_r >= 0:
            os.close(self._status_r)
            self._status_r = -1
        self.cgroup.remove()
        # the mounts lived in the jail's mount namespace: only empty directories are left here
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> JailedProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cgroup_dirs(jail_id: str, root: Path = CGROUP_ROOT) -> list[Path]:
    return [d for d in (*root.glob(f"kvmpy-{jail_id}"), *root.glob(f"*/kvmpy-{jail_id}")) if d.is_dir()]


def cleanup_stale_jails(base: Path = DEFAULT_BASE, root: Path = CGROUP_ROOT) -> list[str]:
    """Remove the directories and cgroups of jails whose launcher was killed; returns their ids.

    A jail is stale when its launcher (launcher.pid) is dead and its cgroups
    hold no process: the VMM dies with the launcher (PR_SET_PDEATHSIG).
    """
    removed = []
    try:
        entries = list(base.iterdir())
    except OSError:
        return removed
    for d in entries:
        try:
            launcher = int((d / "launcher.pid").read_text())
        except (OSError, ValueError):
            continue
        try:
            os.kill(launcher, 0)
            continue  # alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        cgroups = _cgroup_dirs(d.name, root)
        if any((c / "cgroup.procs").read_text().strip() for c in cgroups):
            continue  # a VMM still runs in it
        Cgroup(1, cgroups).remove()
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d.name)
    return removed


def seccomp_victim_syscall(pid: int | None, wait: float = 1.0) -> str | None:
    """The system call the kernel's seccomp audit record names for `pid` (dmesg), or None."""
    if pid is None:
        return None
    pattern = re.compile(rf"type=1326 .*\bpid={pid}\b.*\bsyscall=(\d+)")
    deadline = time.monotonic() + wait
    while True:
        try:
            out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        found = pattern.findall(out)
        if found:
            nr = int(found[-1])
            try:
                import pyseccomp

                return f"{pyseccomp.resolve_syscall(pyseccomp.system_arch(), nr).decode()} ({nr})"
            except Exception:
                return f"#{nr}"
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)


# -- the jailed side -------------------------------------------------------------------------------

_spec: JailSpec | None = None  # set in the jailed process
_locked = False


def jailed() -> bool:
    """True inside a jailed process (before and after lock_down)."""
    return _spec is not None


def _relay(spec: JailSpec, entry: str, argv: list[str]) -> None:
    """The relay (outside the new pid namespace): fork the jailed program, report its pid and status."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the jailed program handles Ctrl-C
    pid = os.fork()
    if pid == 0:
        try:
            set_pdeathsig(signal.SIGKILL)
            _jailed_main(spec, entry, argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, int) and e.code is not None:
                print(e.code, file=sys.stderr)
            _flush_and_exit(code)
        except BaseException as e:  # noqa: BLE001 - report and exit: nothing above us to catch it
            print(f"kvmpy: jail: {type(e).__name__}: {e}", file=sys.stderr)
            _flush_and_exit(1)
        _flush_and_exit(0)
    os.write(spec.status_fd, f"pid {pid}\n".encode())
    _, status = os.waitpid(pid, 0)
    os.write(spec.status_fd, f"status {status}\n".encode())
    os._exit(0)


def _flush_and_exit(code: int) -> None:
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(code)


def _jailed_main(spec: JailSpec, entry: str, argv: list[str]) -> None:
    global _spec
    _spec = spec
    import importlib

    module_name, _, func_name = entry.partition(":")
    module = importlib.import_module(module_name)
    func = getattr(module, func_name)
    _preimport()
    from .net.tap import leave_taps_to_kernel

    leave_taps_to_kernel()  # no sweep (host pids are invisible here), no netlink delete after the drop
    socket.sethostname(HOSTNAME)
    os.close(spec.status_fd)
    _build_root(spec)
    _set_rlimits(spec)
    result = func(argv)
    sys.exit(result if isinstance(result, int) else 0)


PREIMPORT_PACKAGES = ("kvmpy", "unicorn", "pyseccomp")  # walked whole: each imports parts lazily
PREIMPORT_SKIP = ("kvmpy._build", "kvmpy.boot._build", "kvmpy.stats.plot", "kvmpy.jail", "unicorn.unicorn_py2")


def _preimport() -> None:
    """Import what the running VMM may import lazily: after pivot_root nothing outside the jail is readable."""
    import importlib
    import pkgutil

    for top in PREIMPORT_PACKAGES:
        module = importlib.import_module(top)
        for info in pkgutil.walk_packages(getattr(module, "__path__", []), prefix=f"{top}."):
            if not info.name.startswith(PREIMPORT_SKIP):
                importlib.import_module(info.name)
    for name in ("encodings.idna", "json"):
        importlib.import_module(name)


def _build_root(spec: JailSpec) -> None:
    root = spec.root
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back to the host
    mount("kvmpy-jail", root, "tmpfs", MS_NOSUID, "mode=0755,size=16m")
    os.makedirs(f"{root}/dev/net", exist_ok=True)
    for name in spec.devices:
        major, minor = DEVICES[name]
        node = f"{root}/dev/{name}"
        os.mknod(node, 0o600 | stat.S_IFCHR, os.makedev(major, minor))
        os.chown(node, spec.uid, spec.gid)
    for b in spec.binds:
        src = b["path"]
        dst = root + os.path.abspath(src)
        os.makedirs(os.path.dirname(dst), mode=0o755, exist_ok=True)
        if os.path.isdir(src):
            os.makedirs(dst, exist_ok=True)
        else:
            open(dst, "w").close()
        mount(src, dst, None, MS_BIND)
        flags = MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV | MS_NOEXEC
        mount(None, dst, None, flags | (MS_RDONLY if b["read_only"] else 0))
    os.makedirs(f"{root}/run/kvmpy", mode=0o700, exist_ok=True)
    mount(spec.runtime_dir, f"{root}/run/kvmpy", None, MS_BIND)
    # /proc of the jail's own pid namespace (only its processes), read-only: psutil and Python read
    # /proc/self and /proc/meminfo (the guest RAM check)
    os.makedirs(f"{root}/proc")
    mount("proc", f"{root}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY)
    os.makedirs(f"{root}/tmp", exist_ok=True)  # the jail user's own: it removes sockets made before the drop
    os.chmod(f"{root}/tmp", 0o700)
    os.chown(f"{root}/tmp", spec.uid, spec.gid)
    os.chdir(root)
    pivot_root(".", ".")  # the old root ends up stacked on "/": detach it (pivot_root(2), NOTES)
    umount2(".", MNT_DETACH)
    os.chdir("/")
    os.environ.pop("XDG_RUNTIME_DIR", None)


def _set_rlimits(spec: JailSpec) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (spec.nofile, spec.nofile))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a SIGSYS kill leaves no core in the jail
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))


def lock_down() -> None:
    """Inside a jail: drop to the jail uid/gid and install the seccomp filter. No-op elsewhere.

    Call it once everything is opened (the VMM: after building the machine,
    before starting its vCPUs). TAPs are left to the kernel, which deletes a
    non-persistent TAP when its fd closes (kvmpy.net.tap.leave_taps_to_kernel,
    called when the jail was entered): deleting it over netlink would need
    the privileges dropped here.
    """
    global _locked
    if _spec is None or _locked:
        return
    os.setgroups([])
    os.setresgid(_spec.gid, _spec.gid, _spec.gid)
    os.setresuid(_spec.uid, _spec.uid, _spec.uid)
    set_pdeathsig(signal.SIGKILL)  # cleared by the uid change
    install_seccomp(SeccompAction(_spec.seccomp))
    _locked = True


def build_filter(action: SeccompAction = SeccompAction.KILL) -> Any:
    """The libseccomp filter for ALLOWED_SYSCALLS (pyseccomp.SyscallFilter, not loaded)."""
    import pyseccomp as sc

    default = {SeccompAction.KILL: sc.KILL_PROCESS, SeccompAction.ERRNO: sc.ERRNO(errno.EPERM),
               SeccompAction.LOG: sc.LOG}[action]
    f = sc.SyscallFilter(default)
    f.set_attr(sc.Attr.CTL_TSYNC, 1)  # every thread, also those already running
    for name in allowed_syscalls():
        if name == "ioctl":
            for ioc_type in IOCTL_TYPES.values():
                f.add_rule(sc.ALLOW, name, sc.Arg(1, sc.MASKED_EQ, 0xFF00, ioc_type << 8))
        elif name == "socket":
            for family in SOCKET_FAMILIES.values():
                f.add_rule(sc.ALLOW, name, sc.Arg(0, sc.EQ, family))
        elif name == "clone":
            f.add_rule(sc.ALLOW, name, sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, CLONE_THREAD))
        else:
            try:
                f.add_rule(sc.ALLOW, name)
            except (ValueError, OSError) as e:
                raise JailError(f"seccomp allow-list: {name!r}: {e}") from e
    f.add_rule(sc.ERRNO(CLONE3_ERRNO), "clone3")
    return f


def install_seccomp(action: SeccompAction = SeccompAction.KILL) -> None:
    """Load the filter into this process (all threads). Irreversible."""
    f = build_filter(action)
    try:
        os.stat(SECCOMP_MARKER)
    except OSError:
        pass
    f.load()


# -- the `kvmpy run --jail` glue -----------------------------------------------------------------

JAIL_OPTIONS = ("--jail-uid", "--jail-gid", "--jail-mem", "--jail-pids", "--jail-seccomp")


def add_arguments(run: Any) -> None:
    """`kvmpy run` options for the jail."""
    run.add_argument("--jail", action="store_true",
                     help="confine the VMM as Firecracker's jailer does: namespaces, a private root, cgroup "
                          "limits, an unprivileged uid and a seccomp filter (needs root; docs/jail.md)")
    run.add_argument("--jail-uid", type=int, default=65534, help="uid the jailed VMM runs as (default: %(default)s)")
    run.add_argument("--jail-gid", type=int, default=65534, help="gid the jailed VMM runs as (default: %(default)s)")
    run.add_argument("--jail-mem", help="the jail cgroup's memory limit, e.g. 512M (default: guest RAM + 256M)")
    run.add_argument("--jail-pids", type=int, default=64, help="the jail cgroup's pids limit (default: %(default)s)")
    run.add_argument("--jail-seccomp", choices=[a.value for a in SeccompAction], default="kill",
                     help="what an unlisted system call gets (default: %(default)s, as Firecracker)")


def _strip_jail_options(argv: Sequence[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--jail":
            continue
        if a in JAIL_OPTIONS:
            skip = True
            continue
        if a.split("=", 1)[0] in JAIL_OPTIONS:
            continue
        out.append(a)
    return out


def config_from_args(args: Any) -> JailConfig:
    from .memory import parse_size

    memory = parse_size(args.jail_mem) if args.jail_mem else parse_size(args.mem) + MEMORY_OVERHEAD
    devices = ["kvm"]
    if args.net:
        devices.append("net/tun")
    if args.vsock is not None and os.path.exists("/dev/vhost-vsock") and "userspace" not in args.vsock:
        devices.append("vhost-vsock")
    if args.rng:
        devices.append("urandom")
    return JailConfig(uid=args.jail_uid, gid=args.jail_gid, memory_max=memory, pids_max=args.jail_pids,
                      new_net=not args.net, seccomp=SeccompAction(args.jail_seccomp), devices=tuple(devices))


def vmm_binds(args: Any, kernel: Path, initrd: Path | None) -> list[Bind]:
    """The host files a `kvmpy run` needs inside its jail."""
    from .machine.config import DiskConfig

    binds = [Bind(str(Path(kernel).resolve()))]
    if initrd is not None:
        binds.append(Bind(str(Path(initrd).resolve())))
    for m in args.module:
        binds.append(Bind(str(Path(m.partition(",")[0]).resolve())))
    for d in args.disk:
        disk = DiskConfig.parse(d)  # ConfigError (a KvmError) names a bad --disk
        # an overlay's base is only read; the overlay itself lives in the jail's /tmp
        binds.append(Bind(str(Path(disk.path).resolve()), read_only=disk.read_only or bool(disk.overlay)))
    return binds


def vmm_argv(argv: Sequence[str], args: Any, kernel: Path, initrd: Path | None) -> list[str]:
    """The `kvmpy run` command line the jailed VMM gets: jail options out, resolved image paths in."""
    from .machine.config import DiskConfig

    out = _name_taps(_strip_jail_options(argv))
    if args.quirks == "auto":  # /sys/module, where the backend is detected, is not in the jail
        from .platform import Backend, detect_backend

        if detect_backend() is Backend.PVM:
            out += ["--quirks", "pvm"]
    if args.kernel is None:
        out += ["--kernel", str(Path(kernel).resolve())]
    if args.initrd is None and initrd is not None:
        out += ["--initrd", str(Path(initrd).resolve())]
    # relative image paths would not resolve from the jail's "/": each image argument, resolved
    resolved: dict[str, str] = {}
    for d in args.disk:
        path, comma, options = d.partition(",")
        DiskConfig.parse(d)  # refuses a bad --disk before anything runs
        resolved[d] = str(Path(path).resolve()) + comma + options
    for m in args.module:
        path, comma, string = m.partition(",")
        resolved[m] = str(Path(path).resolve()) + comma + string
    for value in (args.kernel, args.initrd):
        if value is not None:
            resolved[str(value)] = str(Path(value).resolve())
    return [resolved.get(a, a) for a in out]


def run_jailed(args: Any, argv: Sequence[str], kernel: Path, initrd: Path | None) -> int:
    """`kvmpy run --jail`: run this same command confined; returns its exit status."""
    import termios

    config = config_from_args(args)
    child_argv = vmm_argv(argv, args, kernel, initrd)
    saved = None
    if sys.stdin is not None and os.isatty(sys.stdin.fileno()):
        saved = termios.tcgetattr(sys.stdin.fileno())
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the VMM's to handle
    taps_before = _interfaces()
    try:
        with JailedProcess(config, "kvmpy.cli:main", child_argv, vmm_binds(args, kernel, initrd)) as jp:
            if not args.quiet:
                print(f"kvmpy: jail {jp.id}: VMM pid {jp.pid} as uid {config.uid}, "
                      f"{'new' if config.new_net else 'host'} network namespace, "
                      f"cgroup v{jp.cgroup.version} {jp.cgroup.limits()}, seccomp {config.seccomp.value}",
                      file=sys.stderr)
            return jp.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
        if saved is not None:  # a killed VMM cannot restore the terminal itself
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)
        _remove_left_taps(taps_before)


def _interfaces() -> set[str]:
    try:
        return set(os.listdir("/sys/class/net"))
    except OSError:
        return set()


def _remove_left_taps(before: set[str]) -> None:
    """Backstop: a TAP the jailed VMM made must not outlive it (the kernel normally deletes it)."""
    for name in _interfaces() - before:
        if os.path.exists(f"/sys/class/net/{name}/tun_flags"):
            from .net.tap import IPRoute

            with IPRoute() as ipr:
                for index in ipr.link_lookup(ifname=name):
                    ipr.link("del", index=index)


def _name_taps(argv: list[str]) -> list[str]:
    """Give each `--net tap` without a name a host-unique one: inside the jail every VMM is pid 1."""
    from .net.tap import generated_name

    out = []
    for i, a in enumerate(argv):
        prev = argv[i - 1] if i else ""
        for prefix in ("", "--net="):
            body = a[len(prefix):]
            if ((prefix and a.startswith(prefix)) or (not prefix and prev == "--net")) and \
                    (body == "tap" or body.startswith("tap,")):
                a = prefix + "tap=" + generated_name() + body[3:]
                break
        out.append(a)
    return out


def main(argv: list[str]) -> None:
    """`python -m kvmpy.jail SPEC ENTRY ARGV...`: the relay (started by JailedProcess)."""
    spec = JailSpec(**json.loads(argv[0]))
    _relay(spec, argv[1], argv[2:])


if __name__ == "__main__":
    # run as kvmpy.jail, not __main__: the VMM's `jail.lock_down` must see the state set here
    from kvmpy import jail as _jail

    _jail.main(sys.argv[1:])
