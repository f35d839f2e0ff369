"""Host directories for the guest (`--share HOSTDIR[=TAG][,ro]`) and the virtiofsd daemon that serves each.

`ShareConfig` is one share as data; `parse_share_arg` reads the command
line's grammar and `validate_share` checks one (the directory exists, the
tag fits the 36 bytes of virtio-fs's configuration space). `Virtiofsd` owns
one daemon process: it is started with its vhost-user socket in a private
directory (mode 0700, so no other user can connect to it and serve or read
guest memory), waited for until the socket exists, and stopped (socket
closed, then SIGTERM, then SIGKILL) when the device closes.

Which daemon: `$KVMPY_VIRTIOFSD`, else the Rust virtiofsd
(/usr/libexec/virtiofsd, Debian's `virtiofsd` package, in releases after
12), else QEMU's C virtiofsd (/usr/lib/qemu/virtiofsd in
Debian 12's `qemu-system-common`), else `virtiofsd` on $PATH. Their
options differ and are mapped here (`daemon_argv`).

Read-only shares: QEMU 7.2's virtiofsd has no read-only option (kvmpy
does not rely on one in the Rust daemon either), and the guest is
untrusted, so a guest-side `mount -o ro` proves nothing. kvmpy
starts the daemon in a private mount namespace in which the shared
directory is a read-only bind mount: the host kernel then refuses every
write the daemon would make (EROFS), whatever the guest sends. This needs
CAP_SYS_ADMIN (root), as the daemons' own namespace sandbox does.
"""

from __future__ import annotations

import enum
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import KvmError

TAG_MAX = 36  # virtio 1.2 5.11.4: tag[36], UTF-8, NUL-padded
ENV_BINARY = "KVMPY_VIRTIOFSD"
CANDIDATES = ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd")
START_TIMEOUT = 10.0  # seconds for the daemon to create its socket
STOP_TIMEOUT = 2.0    # seconds for it to exit after the socket closed, before SIGTERM (and again before SIGKILL)


class ShareError(KvmError, ValueError):
    """A `--share` argument or `ShareConfig` is wrong (the message names the field and the fix)."""


class VirtiofsdError(KvmError):
    """virtiofsd is missing, would not start, or exited (the message says which and how to fix it)."""


class CacheMode(enum.StrEnum):
    """virtiofsd's cache policy (the guest's page cache of host files): Rust's names; the C daemon's 'none' is NEVER."""

    AUTO = "auto"
    ALWAYS = "always"
    NEVER = "never"


@dataclass(frozen=True)
class ShareConfig:
    """A host directory the guest mounts with `mount -t virtiofs TAG DIR`.

    `tag`: the name the guest mounts (default: the directory's name);
    `read_only`: the host refuses writes (a read-only bind mount, see the
    module's doc); `cache`: the daemon's cache mode.
    """

    host_dir: Path
    tag: str
    read_only: bool = False
    cache: CacheMode = CacheMode.AUTO


def default_tag(host_dir: str | os.PathLike[str]) -> str:
    """The directory's last path component, cut to fit the 36-byte tag ("share" for /)."""
    name = Path(os.path.abspath(host_dir)).name or "share"
    data = name.encode()[:TAG_MAX]
    return data.decode(errors="ignore")


def validate_share(share: ShareConfig, *, what: str = "share") -> ShareConfig:
    """The share with an absolute path and a normalised cache mode; `ShareError` naming the first problem."""
    p = Path(share.host_dir)
    if not p.exists():
        raise ShareError(f"{what} {str(p)!r}: no such directory")
    if not p.is_dir():
        raise ShareError(f"{what} {str(p)!r}: not a directory (virtio-fs shares a directory tree)")
    if not os.access(p, os.R_OK | os.X_OK):
        raise ShareError(f"{what} {str(p)!r}: not readable by this user")
    tag = share.tag
    if not isinstance(tag, str) or not tag or "\0" in tag or len(tag.encode()) > TAG_MAX:
        raise ShareError(f"{what} {str(p)!r}: tag {tag!r} must be 1 to {TAG_MAX} bytes of UTF-8 without NUL")
    if any(c.isspace() or c == "," for c in tag):
        raise ShareError(f"{what} {str(p)!r}: tag {tag!r} must not contain spaces or commas "
                         "(the guest names it on the mount command line)")
    try:
        cache = CacheMode("never" if share.cache == "none" else share.cache)
    except ValueError:
        raise ShareError(f"{what} {str(p)!r}: cache {share.cache!r}; one of "
                         f"{', '.join(m.value for m in CacheMode)}") from None
    return ShareConfig(p.resolve(), tag, bool(share.read_only), cache)


def parse_share_arg(text: str) -> ShareConfig:
    """`--share HOSTDIR[=TAG][,ro][,cache=auto|always|never]` -> a validated `ShareConfig`."""
    first, *opts = text.split(",")
    path, eq, tag = first.rpartition("=")
    if not eq or "/" in tag:
        path, tag = first, ""
    if not path:
        raise ShareError(f"--share {text!r}: expected HOSTDIR[=TAG][,ro], e.g. /srv/data=data,ro")
    read_only, cache = False, CacheMode.AUTO.value
    for opt in opts:
        key, _, value = opt.partition("=")
        if opt in ("ro", "rw"):
            read_only = opt == "ro"
        elif key == "cache" and value:
            cache = value
        else:
            raise ShareError(f"--share {text!r}: unknown option {opt!r} (ro, rw, cache=auto|always|never)")
    return validate_share(ShareConfig(Path(path), tag or default_tag(path), read_only, cache),  # type: ignore[arg-type]
                          what="--share")


def check_tags_unique(shares: list[ShareConfig]) -> None:
    """Two shares with one tag could not be told apart by the guest's mount."""
    seen: dict[str, Path] = {}
    for s in shares:
        if s.tag in seen:
            raise ShareError(f"share tag {s.tag!r} is used by {str(seen[s.tag])!r} and {str(s.host_dir)!r}; "
                             "give one of them another tag (HOSTDIR=TAG)")
        seen[s.tag] = s.host_dir


def validate_shares(shares: list[ShareConfig | str]) -> list[ShareConfig]:
    """Each share validated (a string is parsed as `--share`), tags unique; `ShareError` for the first problem."""
    out = [parse_share_arg(s) if isinstance(s, str) else validate_share(s, what=f"shares[{i}]")
           for i, s in enumerate(shares)]
    check_tags_unique(out)
    return out


# -- the daemon ------------------------------------------------------------------------

class Flavour(enum.Enum):
    RUST = "rust"  # virtiofsd 1.x (gitlab.com/virtio-fs/virtiofsd)
    QEMU = "qemu"  # QEMU's C virtiofsd (QEMU 5.0 to 7.2)


@dataclass(frozen=True)
class VirtiofsdBinary:
    path: str
    flavour: Flavour
    version: str


def find_virtiofsd() -> VirtiofsdBinary:
    """The daemon to use (see the module's doc), or a one-line `VirtiofsdError` saying how to get one."""
    env = os.environ.get(ENV_BINARY)
    if env:
        if not (os.path.isfile(env) and os.access(env, os.X_OK)):
            raise VirtiofsdError(f"${ENV_BINARY}={env}: not an executable file")
        candidates = [env]
    else:
        candidates = [c for c in CANDIDATES if os.path.isfile(c) and os.access(c, os.X_OK)]
        found = shutil.which("virtiofsd")
        if found:
            candidates.append(found)
    if not candidates:
        raise VirtiofsdError("virtio-fs: no virtiofsd found (looked for $KVMPY_VIRTIOFSD, "
                             f"{', '.join(CANDIDATES)}, and on $PATH); install Debian's 'virtiofsd' or "
                             "'qemu-system-common' package (scripts/install-deps.sh does)")
    path = candidates[0]
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise VirtiofsdError(f"{path} --version: {e}") from None
    text = (out.stdout + out.stderr).strip().splitlines()
    first = text[0] if text else ""
    # QEMU's: "virtiofsd version 7.2.22 (...)"; Rust's: "virtiofsd 1.10.1".
    flavour = Flavour.QEMU if " version " in f" {first} " else Flavour.RUST
    return VirtiofsdBinary(path, flavour, first)


def daemon_argv(binary: VirtiofsdBinary, share: ShareConfig, socket_path: str, *, sandbox: str) -> list[str]:
    """The daemon's command line for `share` on `socket_path` (`sandbox`: namespace, chroot or none)."""
    if binary.flavour is Flavour.QEMU:
        cache = "none" if share.cache is CacheMode.NEVER else share.cache.value
        if sandbox == "none":
            raise VirtiofsdError(f"{binary.path}: QEMU's virtiofsd has no sandbox=none; use namespace or chroot")
        return [binary.path, f"--socket-path={socket_path}", "-o", f"source={share.host_dir}",
                "-o", f"cache={cache}", "-o", f"sandbox={sandbox}", "-o", "log_level=warn",
                "--thread-pool-size=0",  # requests served on the queue thread: fewer context switches here
                "-f"]
    return [binary.path, f"--socket-path={socket_path}", f"--shared-dir={share.host_dir}",
            f"--cache={share.cache.value}", f"--sandbox={sandbox}", "--log-level=warn", "--thread-pool-size=0"]


def default_sandbox() -> str:
    """namespace as root (the daemons' strongest); none otherwise (only the Rust daemon runs unprivileged)."""
    return "namespace" if os.geteuid() == 0 else "none"


# Run as `python -c _READ_ONLY_EXEC DIR ARGV...`: in a new mount namespace, DIR becomes a read-only
# bind mount, then the daemon is exec'ed (same pid). A separate interpreter rather than a preexec_fn:
# nothing runs between fork and exec in a process that has threads.
_READ_ONLY_EXEC = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
path = sys.argv[1].encode()
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE, CLONE_NEWNS = 1, 32, 4096, 16384, 1 << 18, 0x20000
steps = (("unshare(CLONE_NEWNS)", lambda: libc.unshare(CLONE_NEWNS)),
         ("make / private", lambda: libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None)),
         ("bind-mount the share", lambda: libc.mount(path, path, None, MS_BIND | MS_REC, None)),
         ("remount it read-only", lambda: libc.mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY, None)))
for what, step in steps:
    if step() != 0:
        sys.exit(f"kvmpy read-only share {sys.argv[1]}: {what}: {os.strerror(ctypes.get_errno())}")
os.execv(sys.argv[2], sys.argv[2:])
"""


def read_only_argv(host_dir: str | os.PathLike[str], argv: list[str]) -> list[str]:
    """`argv` run with `host_dir` read-only in a private mount namespace (see the module's doc)."""
    return [sys.executable, "-c", _READ_ONLY_EXEC, os.fspath(host_dir), *argv]


class Virtiofsd:
    """One running virtiofsd serving `share` on a vhost-user socket at `socket_path`."""

    def __init__(self, share: ShareConfig, *, binary: VirtiofsdBinary | None = None,
                 sandbox: str | None = None) -> None:
        self.share = share
        self.binary = binary or find_virtiofsd()
        self.sandbox = sandbox or default_sandbox()
        if share.read_only and os.geteuid() != 0:
            raise VirtiofsdError(f"share {str(share.host_dir)!r},ro: a read-only share is a read-only bind "
                                 "mount in the daemon's mount namespace, which needs root")
        self.dir = tempfile.mkdtemp(prefix="kvmpy-virtiofs-")  # mode 0700: only this user reaches the socket
        self.socket_path = os.path.join(self.dir, "vhost-user.sock")
        self.log_path = os.path.join(self.dir, "virtiofsd.log")
        argv = daemon_argv(self.binary, share, self.socket_path, sandbox=self.sandbox)
        if share.read_only:
            argv = read_only_argv(share.host_dir, argv)
        log = open(self.log_path, "wb")
        self._log = open(self.log_path, "rb")  # read through this fd, also once the path is gone
        try:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True,
                start_new_session=True)  # the terminal's Ctrl-C goes to kvmpy, which stops the daemon in order
        except OSError as e:
            shutil.rmtree(self.dir, ignore_errors=True)
            self._log.close()
            raise VirtiofsdError(f"{self.binary.path}: cannot start it for {str(share.host_dir)!r}: {e}") from None
        finally:
            log.close()
        try:
            self._wait_for_socket()
        except BaseException:
            self.stop()
            raise

    def _wait_for_socket(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(self.socket_path):
            if self.process.poll() is not None:
                raise VirtiofsdError(f"{self.binary.path} exited with status {self.process.returncode} before "
                                     f"creating its socket: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise VirtiofsdError(f"{self.binary.path}: no socket at {self.socket_path} after "
                                     f"{START_TIMEOUT:g} s: {self.log_tail()}")
            time.sleep(0.01)

    def unlink_paths(self) -> None:
        """Remove the socket, the log's name and the directory once the front end is connected.

        The daemon accepts one connection, so nothing needs the path after
        it, and nothing is left in /tmp even if kvmpy is killed (the kernel
        then closes the socket, and the daemon exits on its own).
        """
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def pid(self) -> int:
        return self.process.pid

    def exited(self) -> int | None:
        """The exit status once the daemon has ended (negative: killed by that signal), else None."""
        return self.process.poll()

    def describe_exit(self) -> str:
        """A phrase for error messages: how the daemon ended and what it last logged."""
        status = self.process.poll()
        if status is None:
            how = "is still running but closed its socket"
        elif status < 0:
            how = f"was killed by {signal.Signals(-status).name}"
        else:
            how = f"exited with status {status}"
        tail = self.log_tail()
        return f"virtiofsd (pid {self.pid}) {how}" + (f": {tail}" if tail else "")

    def log_tail(self) -> str:
        """The daemon's last log line (its stderr), or ''."""
        try:
            fd = self._log.fileno()
            size = os.fstat(fd).st_size
            data = os.pread(fd, 4096, max(0, size - 4096))
        except (OSError, ValueError):
            return ""
        lines = [ln for ln in data.decode(errors="replace").splitlines() if ln.strip()]
        return lines[-1].strip() if lines else ""

    def stop(self) -> None:
        """End the daemon (it exits by itself once the front end closed the socket) and remove its directory."""
        if self.process.poll() is None:
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if sig is not None:
                    try:
                        os.killpg(self.process.pid, sig)  # its own session: the daemon and any helper it forked
                    except ProcessLookupError:
                        pass
                try:
                    self.process.wait(STOP_TIMEOUT)
                    break
                except subprocess.TimeoutExpired:
                    continue
        shutil.rmtree(self.dir, ignore_errors=True)
        self._log.close()

    def __enter__(self) -> Virtiofsd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Virtiofsd({str(self.share.host_dir)!r}, tag={self.share.tag!r}, pid={self.pid})"


__all__ = ["CacheMode", "ShareConfig", "ShareError", "Virtiofsd", "VirtiofsdBinary", "VirtiofsdError",
           "check_tags_unique", "daemon_argv", "default_tag", "find_virtiofsd", "parse_share_arg", "read_only_argv",
           "validate_share", "validate_shares"]
