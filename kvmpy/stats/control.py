"""The control socket of a VM process: statistics for `kvmpy stat` and other clients.

Each running VM listens on an AF_UNIX stream socket named
`<pid>-<vmname>.sock` in the first usable of

    $XDG_RUNTIME_DIR/kvmpy/    (a user session)
    /run/kvmpy/                (root)
    /tmp/kvmpy-<uid>/          (anything else)

made mode 0700, so only the same user (or root) can connect. Names are
unique per process: a second live server of the same name in one process
(two VMs booting kernels of the same file name) is `<vmname>-2`, then `-3`. The protocol
is JSON lines: the client sends one object per line, `{"cmd": "snapshot"}`
or `{"cmd": "ping"}`, and reads one object per line back,
`{"ok": true, "pid": ..., "name": ..., "data": {...}}` or
`{"ok": false, "error": "..."}`. A connection may ask any number of times
(`kvmpy stat`'s live view keeps one open).

Sockets of processes that no longer exist are removed when a server
starts and when a client lists them.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import psutil

from ..errors import KvmError

PROTOCOL_VERSION = 1
_NAME_RE = re.compile(r"^(\d+)-(.+)\.sock$")
_MAX_LINE = 1 << 20

# Socket paths of this process's live servers: a second server of a name must not unlink the first's.
_live_paths: set[Path] = set()
_live_lock = threading.Lock()


class StatsSource(Protocol):
    def stats_snapshot(self) -> dict[str, Any]: ...


def candidate_dirs() -> list[Path]:
    """Where control sockets may live, in the order a server tries them."""
    dirs = []
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        dirs.append(Path(xdg) / "kvmpy")
    dirs.append(Path("/run/kvmpy"))
    dirs.append(Path(f"/tmp/kvmpy-{os.getuid()}"))
    return dirs


def socket_dir(create: bool = True) -> Path:
    """The directory a server of this process uses (created 0700 if `create`)."""
    last: OSError | None = None
    for d in candidate_dirs():
        if d.is_dir() and os.access(d, os.W_OK | os.X_OK):
            return d
        if create:
            try:
                d.mkdir(mode=0o700, parents=False, exist_ok=True)
                if os.access(d, os.W_OK | os.X_OK):
                    return d
            except OSError as e:
                last = e
    raise KvmError(f"no directory for the control socket (tried {', '.join(map(str, candidate_dirs()))})"
                   + (f": {last.strerror}" if last else ""))



@dataclass(frozen=True)
class SocketInfo:
    pid: int
    name: str
    path: Path


def _scan(directory: Path, clean: bool) -> list[SocketInfo]:
    found = []
    try:
        entries = sorted(directory.iterdir())
    except OSError:
        return found
    for p in entries:
        m = _NAME_RE.match(p.name)
        if not m:
            continue
        pid = int(m.group(1))
        if not psutil.pid_exists(pid):
            if clean:
                try:
                    p.unlink()
                except OSError:
                    pass
            continue
        found.append(SocketInfo(pid, m.group(2), p))
    return found


def list_sockets(directory: str | Path | None = None, *, clean: bool = True) -> list[SocketInfo]:
    """The control sockets of live VM processes (in `directory`, or every candidate directory)."""
    dirs = [Path(directory)] if directory is not None else candidate_dirs()
    out: list[SocketInfo] = []
    seen: set[Path] = set()
    for d in dirs:
        for info in _scan(d, clean):
            if info.path not in seen:
                seen.add(info.path)
                out.append(info)
    return out


class ControlClient:
    """One connection to a control socket; `request()` as often as needed."""

    def __init__(self, path: str | Path, timeout: float = 5.0) -> None:
        self.path = Path(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(self.path))
        except OSError as e:
            self.sock.close()
            raise KvmError(f"control socket {self.path}: cannot connect ({e.strerror or e}); "
                           "is the VM still running?") from e
        self._file = self.sock.makefile("rb")

    def request(self, cmd: str = "snapshot", **args: Any) -> dict[str, Any]:
        """Send one request; the reply's `data` (raises `KvmError` on an error reply)."""
        line = json.dumps({"cmd": cmd, **args}).encode() + b"\n"
        try:
            self.sock.sendall(line)
            reply = self._file.readline(_MAX_LINE * 64)
        except OSError as e:
            raise KvmError(f"control socket {self.path}: {e.strerror or e}") from e
        if not reply:
            raise KvmError(f"control socket {self.path}: the VM process closed the connection")
        msg = json.loads(reply)
        if not msg.get("ok"):
            raise KvmError(f"control socket {self.path}: {msg.get('error', 'error')}")
        data = msg.get("data", {})
        if isinstance(data, dict):
            data.setdefault("pid", msg.get("pid"))
            data["name"] = msg.get("name")
        return data

    def close(self) -> None:
        self._file.close()
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def query(path: str | Path, cmd: str = "snapshot", timeout: float = 5.0) -> dict[str, Any]:
    """One request on a fresh connection: the snapshot (or ping reply) of the VM at `path`."""
    with ControlClient(path, timeout) as c:
        return c.request(cmd)


class ControlServer:
    """Serves `source.stats_snapshot()` on this process's control socket, from a daemon thread.

    Starts listening at construction; `close()` stops the thread and
    removes the socket file.
    """

    def __init__(self, source: StatsSource, name: str = "vm", *, directory: str | Path | None = None) -> None:
        self.source = source
        base = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:48] or "vm"
        d = Path(directory) if directory is not None else socket_dir()
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        _scan(d, clean=True)
        with _live_lock:
            self.name, n = base, 1
            while (path := d / f"{os.getpid()}-{self.name}.sock") in _live_paths:
                n += 1
                self.name = f"{base}-{n}"
            self.path = path
            _live_paths.add(path)
        try:
            self.path.unlink()  # no live server of ours: left from before an exec with the same pid, or a crash
        except FileNotFoundError:
            pass
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind(str(self.path))
            os.chmod(self.path, 0o600)
            self._sock.listen(8)
        except OSError as e:
            self._sock.close()
            self._release()
            raise KvmError(f"control socket {self.path}: {e.strerror or e}") from e
        self._closing = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.requests = 0
        self._thread = threading.Thread(target=self._accept_loop, name=f"kvmpy-control-{self.name}", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closing.is_set():
                    conn.close()
                    return
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="kvmpy-control-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn, conn.makefile("rb") as f:
                for line in f:
                    if len(line) > _MAX_LINE:
                        self._send(conn, {"ok": False, "error": "request too long"})
                        return
                    self._send(conn, self._handle(line))
        except OSError:
            pass  # the client went away
        finally:
            with self._lock:
                self._conns.discard(conn)

    def _handle(self, line: bytes) -> dict[str, Any]:
        self.requests += 1
        base = {"pid": os.getpid(), "name": self.name, "version": PROTOCOL_VERSION}
        try:
            req = json.loads(line)
            cmd = req.get("cmd") if isinstance(req, dict) else None
        except ValueError as e:
            return {**base, "ok": False, "error": f"not JSON: {e}"}
        if cmd == "ping":
            return {**base, "ok": True, "data": {}}
        if cmd == "snapshot":
            try:
                return {**base, "ok": True, "data": self.source.stats_snapshot()}
            except Exception as e:  # report to the client; never kill the server thread
                return {**base, "ok": False, "error": f"snapshot failed: {type(e).__name__}: {e}"}
        return {**base, "ok": False, "error": f"unknown command {cmd!r} (ping, snapshot)"}

    @staticmethod
    def _send(conn: socket.socket, msg: dict[str, Any]) -> None:
        conn.sendall(json.dumps(msg, separators=(",", ":")).encode() + b"\n")

    def close(self) -> None:
        if self._closing.is_set():
            return
        self._closing.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        with self._lock:
            for c in list(self._conns):
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._thread.join(2)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        self._release()

    def _release(self) -> None:
        with _live_lock:
            _live_paths.discard(self.path)

    def __enter__(self) -> ControlServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ControlServer({self.path})"
